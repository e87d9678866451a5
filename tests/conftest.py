"""Shared fixtures: isolated state folders, tiny real image folders, real servers.

Fixtures only; the helpers tests share are in helpers.py (`from helpers import ...`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import free_port, make_image_folder, make_messy_folder


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
    os.environ.pop("MLFLOW_RUN_ID", None)
    yield root
    os.environ.clear()
    os.environ.update(saved)


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


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL on 127.0.0.1 (password auth) for the whole session.

    Yields a `components.services.LocalPostgres`: `.uri(dbname)` creates the database on first
    use and returns `postgresql://cnnflow:<password>@127.0.0.1:<port>/<dbname>`; `.password`,
    `.port`, `.host`. Skips with the reason when PostgreSQL is not installed or cannot start.
    """
    import shutil
    import tempfile

    from components import services

    try:
        services.postgres_binary("postgres")
        services.postgres_binary("initdb")
        services.postgres_process_user()
    except services.ServiceError as exc:
        pytest.skip(str(exc))
    # Under /tmp, not pytest's 0700 folders: as root the server runs as `postgres`, who
    # must be able to enter its data folder.
    root = Path(tempfile.mkdtemp(prefix="cnnflow-pg-"))
    root.chmod(0o711)
    server = services.LocalPostgres(root / "data", port=free_port(),
                                    password=services.new_password(), durable=False)
    try:
        server.start()
    except services.ServiceError as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {exc}")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


# --------------------------------------------------------------------------- messy datasets


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    """A fresh `make_messy_folder` dataset (helpers.MESSY_EXPECTED holds its numbers)."""
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

    from components.steps.params import TrainParams
    from components.steps.train import train

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


# --------------------------------------------------------------------------- MLflow clients


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
