"""Shared fixtures: isolated state folders, tiny real image folders, real servers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.services import free_port  # noqa: F401 - tests import it from here

BIN = Path(sys.executable).parent  # the venv's bin: python, mlflow, cnnflow, torchrun


def subprocess_env(tracking_uri: str, **extra: str) -> dict[str, str]:
    """The environment for a command a test starts: the venv's bin first on PATH, this
    tracking server, unbuffered output, plus `extra` variables."""
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, PYTHONUNBUFFERED="1", **extra)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env

# Class colours differ strongly so a tiny model learns them in one or two epochs.
_PALETTE = [(220, 30, 30), (30, 200, 40), (30, 60, 220), (230, 210, 30), (200, 40, 200)]


@pytest.fixture(scope="session", autouse=True)
def _isolated_env(tmp_path_factory: pytest.TempPathFactory):
    """Keep every test away from the user's ~/.cache and ./.cnnflow, and off the network."""
    root = tmp_path_factory.mktemp("cnnflow-env")
    saved = dict(os.environ)
    os.environ["CNNFLOW_HOME"] = str(root / "home")
    os.environ["CNNFLOW_DATA_DIR"] = str(root / "data")
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ["TORCH_HOME"] = str(root / "torch-home")  # empty hub cache: no weights
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("MONGO_URI", None)
    yield root
    os.environ.clear()
    os.environ.update(saved)


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


@pytest.fixture
def image_folder(tmp_path: Path):
    """Factory: `image_folder(classes={...}, layout="flat"|"split")` -> a fresh dataset path."""
    counter = iter(range(1000))

    def _make(classes: dict[str, int] | None = None, **kwargs) -> Path:
        return make_image_folder(tmp_path / f"dataset{next(counter)}", classes, **kwargs)

    return _make


# --------------------------------------------------------------------------- real servers



@pytest.fixture(scope="session")
def services_home(_isolated_env: Path) -> Path:
    """State folder of the session's servers: not CNNFLOW_HOME, so no test's `down` stops them."""
    return _isolated_env / "services"


def _serve(name: str, home: Path, **ports: int):
    """Start one real service with components.services.up, yield its URL, stop it at the end."""
    from components import services

    with pytest.MonkeyPatch.context() as mp:  # an env var here would make up() skip the start
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MONGO_URI", raising=False)
        [started] = services.up(names=[name], home=home, timeout=120, **ports)
    try:
        assert started.state == "running", started
        yield started.url
    finally:
        services.down([name], home=home)


@pytest.fixture(scope="session")
def mlflow_server(services_home: Path):
    """URI (http://127.0.0.1:<port>) of a real MLflow tracking server for the whole session."""
    yield from _serve("mlflow", services_home, mlflow_port=free_port())


@pytest.fixture(scope="session")
def mongo_server(services_home: Path):
    """URI (mongodb://127.0.0.1:<port>) of a real MongoDB-wire server for the whole session."""
    yield from _serve("mongo", services_home, mongo_port=free_port())


# --------------------------------------------------------------------------- messy datasets


# What `messy_folder` holds, counted by hand (tests/test_eda.py checks EDA against it).
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
    import shutil

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


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """A fresh `make_messy_folder` dataset (see MESSY_EXPECTED for its numbers)."""
    return make_messy_folder(tmp_path / "messy")


# --------------------------------------------------------------------------- trained models


@pytest.fixture(scope="session")
def trained_pair(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory):
    """Two models (custom_cnn, lenet5) trained once per session on one tiny 6-class dataset.

    Shared by the evaluate, registry and ensemble tests so each model trains only once. Six
    classes make Top-5 meaningful; the sixth reuses the first class's colour, so the models
    make real mistakes to draw and count.
    """
    from types import SimpleNamespace

    from components.steps.train import TrainParams, train

    data = make_image_folder(tmp_path_factory.mktemp("pair") / "pair6",
                             {f"k{i}": 10 for i in range(6)})
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        for model in ("custom_cnn", "lenet5"):
            params = TrainParams(data=str(data), experiment="pair", model=model, epochs=2,
                                 image_size=16, batch_size=8, num_workers=0, weights="none",
                                 patience=0, augmentation="none")
            runs[model] = train(params, mlflow_server, progress=False, log=lambda s: None).run_id
    return SimpleNamespace(data=data, experiment="pair", runs=runs, uri=mlflow_server)


# --------------------------------------------------------------------------------------------
# MLflow helpers shared by the step tests
# --------------------------------------------------------------------------------------------


@pytest.fixture
def pair_client(trained_pair, monkeypatch: pytest.MonkeyPatch):
    """A client on `trained_pair`'s server, also the fluent API's and the commands' server."""
    import mlflow
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained_pair.uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(trained_pair.uri)
    return MlflowClient(trained_pair.uri)


@pytest.fixture
def tracking(mlflow_server: str, monkeypatch: pytest.MonkeyPatch):
    """A client on the session's MLflow server, which the commands under test also use."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return MlflowClient(mlflow_server)


def runs_of(client, experiment: str) -> list:
    """The experiment's runs, oldest first (none when it does not exist yet)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def history(client, run_id: str, metric: str) -> list[tuple[int, float]]:
    """(step, value) pairs of one metric, in step order."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric))
