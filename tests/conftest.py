"""Shared fixtures: isolated state folders, tiny real image folders, real servers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
