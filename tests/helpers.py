"""Helpers the tests share: `from helpers import ...` (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from components.services import free_port

__all__ = [
    "BIN", "MESSY_EXPECTED", "free_port", "history", "make_image_folder", "make_messy_folder",
    "CHROMIUM", "SCREENSHOTS", "launch_chromium", "playwright_or_skip", "runs_of",
    "serve_model", "subprocess_env", "write_image",
]

BIN = Path(sys.executable).parent  # the venv's bin: python, mlflow, cnnflow, torchrun

# Class colours differ strongly so a tiny model learns them in one or two epochs.
_PALETTE = [(220, 30, 30), (30, 200, 40), (30, 60, 220), (230, 210, 30), (200, 40, 200)]


def subprocess_env(tracking_uri: str, **extra: str) -> dict[str, str]:
    """The environment for a command a test starts: the venv's bin first on PATH, this
    tracking server, unbuffered output, plus `extra` variables."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, PYTHONUNBUFFERED="1", **extra)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


# --------------------------------------------------------------------------- image folders


def write_image(path: Path, rgb: tuple[int, int, int], size: int = 16, seed: int = 0,
                mode: str = "RGB") -> Path:
    """A real image file: a class colour plus noise, so samples of a class differ."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb)[None, None, :] + rng.normal(0, 20, (size, size, 3)), 0, 255)
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def make_image_folder(root: Path, classes: dict[str, int] | None = None, *,
                      layout: str = "flat", size: int = 16, ext: str = ".png") -> Path:
    """Write a dataset folder.

    layout="flat": root/<class>/*; layout="split": root/{train,val,test}/<class>/* with the
    given counts in train and a third of them (at least 2) in val and test.
    """
    classes = classes or {"red": 12, "green": 12, "blue": 12}
    splits = {"": 1.0} if layout == "flat" else {"train": 1.0, "val": 1 / 3, "test": 1 / 3}
    seed = 0
    for split, frac in splits.items():
        for ci, (name, count) in enumerate(classes.items()):
            n = count if frac == 1.0 else max(2, round(count * frac))
            for i in range(n):
                seed += 1
                write_image(root / split / name / f"img{i:03d}{ext}", _PALETTE[ci % 5], size, seed)
    return root


# What `make_messy_folder` holds, counted by hand (tests/test_eda.py checks EDA against it).
MESSY_EXPECTED = {
    "n_images": 47, "n_classes": 3, "imbalance_ratio": 1.5, "n_corrupt": 1, "n_duplicates": 4,
    "n_cross_split_duplicates": 2, "n_distinct_sizes": 2, "n_within_class_duplicates": 3,
    "n_label_conflicts": 1, "n_off_size": 1, "n_other_files": 1,
}


def make_messy_folder(root: Path) -> Path:
    """A pre-split folder with every problem EDA and preprocess must find, in known numbers.

    train/val/test of red (9/3/3), green (9/3/3), blue (6/2/2) distinct 16-px PNGs, plus:
    a copy of a train image in test (red) and one in val (green) - leakage; a copy inside
    train/red - a within-class duplicate; a red train image copied into train/green - a label
    conflict; a truncated PNG and a text file in train/blue; RGBA and palette images in
    train/blue; a 24-px grayscale image in train/green.
    """
    make_image_folder(root, {"red": 9, "green": 9, "blue": 6}, layout="split")
    tr = root / "train"
    shutil.copy(tr / "red" / "img000.png", root / "test" / "red" / "leak.png")
    shutil.copy(tr / "green" / "img001.png", root / "val" / "green" / "leak.png")
    shutil.copy(tr / "red" / "img002.png", tr / "red" / "dup.png")
    shutil.copy(tr / "red" / "img003.png", tr / "green" / "conflict.png")
    good = (tr / "blue" / "img000.png").read_bytes()
    (tr / "blue" / "truncated.png").write_bytes(good[: len(good) // 2])
    (tr / "blue" / "notes.txt").write_text("not an image\n")
    write_image(tr / "blue" / "rgba.png", (30, 60, 220), 16, seed=901, mode="RGBA")
    write_image(tr / "blue" / "palette.png", (30, 60, 220), 16, seed=902, mode="P")
    write_image(tr / "green" / "gray.png", (30, 200, 40), 24, seed=903, mode="L")
    return root


# --------------------------------------------------------------------------- MLflow


def runs_of(client, experiment: str, step: str | None = None) -> list:
    """The experiment's runs, oldest first (none when it does not exist yet); only those
    tagged `cnnflow.step=<step>` when `step` is given."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    return [r for r in runs if step is None or r.data.tags.get("cnnflow.step") == step]


def history(client, run_id: str, metric: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric, in step order."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric))


@contextlib.contextmanager
def serve_model(model_uri: str, tracking_uri: str, log: Path) -> Iterator[str]:
    """A real `mlflow models serve --env-manager local` of `model_uri` on a free loopback port,
    output in `log`; yields its URL once /ping answers, and stops its process group after."""
    import requests

    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port)],
            env=subprocess_env(tracking_uri), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --------------------------------------------------------------------------- browser tests

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[1] / "reports" / "screenshots"


def playwright_or_skip():
    """`sync_playwright`, or skip the test saying why (`make test` tries to install chromium)."""
    import pytest

    if not CHROMIUM.exists():
        print(f"skipping: {CHROMIUM} is missing (make test tries `apt-get install chromium`)")
        pytest.skip(f"{CHROMIUM} is missing")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("skipping: the `playwright` package is not installed (pip install -e '.[dev]')")
        pytest.skip("playwright is not installed")
    return sync_playwright


def launch_chromium(pw):
    """The system Chromium, headless, with nothing that reaches the network."""
    return pw.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                              args=["--headless", "--no-sandbox", "--disable-gpu",
                                    "--disable-background-networking",
                                    "--disable-component-update", "--disable-sync"])
