"""MLflow on a real PostgreSQL: `cnnflow up --backend postgresql | --backend-store-uri`, the
pipeline on it (same results as on SQLite), and bad URIs as one masked line."""

from __future__ import annotations

import math
import shutil
import stat
import tempfile
import time
from pathlib import Path
from uuid import uuid4

import pytest
from click.testing import CliRunner
from helpers import free_port, make_image_folder
from mlflow import MlflowClient
from pymongo import MongoClient

from components import services
from components.mirror.dashboard import data as dashboard
from components.settings import sqlalchemy_url
from pipelines.cli import cli

MODELS = ("custom_cnn", "lenet5")
# What the two backends must agree on, per model (deterministic on CPU with the same seed).
COMPARED = ("train_accuracy", "val_accuracy", "test_accuracy", "best_val_loss", "test_loss")


def cnnflow(*args: str, env: dict[str, str] | None = None):
    return CliRunner(env=env).invoke(cli, list(args), catch_exceptions=False)


def one_line(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    return lines[0]


@pytest.fixture
def pg_home(postgres_server, monkeypatch: pytest.MonkeyPatch):
    """A private CNNFLOW_HOME the `postgres` account can enter (as root the server runs as
    that user), removed afterwards; nothing of the session's servers lives there."""
    root = Path(tempfile.mkdtemp(prefix="cnnflow-up-"))
    root.chmod(0o711)
    home = root / "home"
    monkeypatch.setenv("CNNFLOW_HOME", str(home))
    try:
        yield home
    finally:
        services.down(home=home)
        shutil.rmtree(root, ignore_errors=True)


def files_holding(folder: Path, secret: str, skip: tuple[str, ...]) -> list[str]:
    """Files under `folder` (not the PostgreSQL data, not `skip`) whose bytes hold `secret`."""
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if path.is_file() and rel.parts[0] != "postgres" and str(rel) not in skip:
            if secret.encode() in path.read_bytes():
                found.append(str(rel))
    return found


def test_up_backend_postgresql_starts_status_down(pg_home: Path):
    pg_port, mlflow_port = free_port(), free_port()
    args = ["mlflow", "--backend", "postgresql", "--postgres-port", str(pg_port),
            "--mlflow-port", str(mlflow_port)]
    result = cnnflow("up", *args)
    password = (pg_home / "postgres.password").read_text().strip()
    try:
        assert result.exit_code == 0, result.output
        # The password: generated, kept 0600, never printed, never on a command line.
        assert len(password) >= 24
        for name in ("postgres.password", "postgres.json"):
            assert stat.S_IMODE((pg_home / name).stat().st_mode) == 0o600, name
        masked = f"postgresql://cnnflow:***@127.0.0.1:{pg_port}/mlflow"
        shown = {ln.split()[0]: ln.split() for ln in cnnflow("status").output.splitlines()}
        assert shown["postgres"][1:3] == ["running", masked]
        assert shown["mlflow"][1:3] == ["running", f"http://127.0.0.1:{mlflow_port}"]
        env_out = cnnflow("env").output
        assert env_out.splitlines() == [f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{mlflow_port}"]
        pids = {n: int((pg_home / f"{n}.pid").read_text()) for n in ("postgres", "mlflow")}
        for pid in pids.values():
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            assert password.encode() not in cmdline
        assert password not in result.output + env_out
        assert files_holding(pg_home, password, ("postgres.password", "postgres.json")) == []

        # MLflow really keeps its runs in PostgreSQL: the experiment is a row there.
        uri = services.postgres_uri()
        assert uri == f"postgresql://cnnflow:{password}@127.0.0.1:{pg_port}/mlflow"
        exp_id = MlflowClient(f"http://127.0.0.1:{mlflow_port}").create_experiment("on-pg")
        import psycopg2

        with psycopg2.connect(uri) as conn, conn.cursor() as cur:
            cur.execute("SELECT name FROM experiments WHERE experiment_id = %s", (int(exp_id),))
            assert cur.fetchone() == ("on-pg",)
        assert not (pg_home / "mlflow.db").exists()
        # Asking for SQLite while MLflow runs on PostgreSQL is refused, not silently ignored.
        clash = one_line(cnnflow("up", "mlflow", "--backend", "sqlite"))
        assert "mlflow is already running on postgresql://cnnflow:***@" in clash
        assert "cnnflow down mlflow" in clash
    finally:
        stopped = cnnflow("down")
    assert stopped.exit_code == 0, stopped.output
    for pid in pids.values():
        assert not services._alive(pid)
    assert "database system is shut down" in (pg_home / "logs" / "postgres.log").read_text()
    assert services.postgres_uri() is None
    assert not list(pg_home.glob("*.pid")) and not list(pg_home.glob("*.json"))

    # The second start reuses the cluster and its password: the experiment is still there.
    again = cnnflow("up", *args)
    try:
        assert again.exit_code == 0, again.output
        assert (pg_home / "postgres.password").read_text().strip() == password
        client = MlflowClient(f"http://127.0.0.1:{mlflow_port}")
        assert client.get_experiment_by_name("on-pg").experiment_id == exp_id
    finally:
        assert cnnflow("down").exit_code == 0
    assert files_holding(pg_home, password, ("postgres.password",)) == []


@pytest.mark.parametrize("case", ["closed port", "wrong password"])
def test_bad_backend_store_uri_is_one_masked_line_and_starts_nothing(
        postgres_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str):
    home = tmp_path / "home"
    monkeypatch.setenv("CNNFLOW_HOME", str(home))
    secret = f"not-{postgres_server.password}"
    port = free_port() if case == "closed port" else postgres_server.port
    postgres_server.uri("bad")  # the database exists: only the port or the password is wrong
    uri = f"postgresql://cnnflow:{secret}@127.0.0.1:{port}/bad"
    mlflow_port = free_port()
    started = time.monotonic()
    line = one_line(cnnflow("up", "mlflow", "--backend-store-uri", uri,
                            "--mlflow-port", str(mlflow_port)))
    assert time.monotonic() - started < 20
    assert line.startswith(f"Error: PostgreSQL at postgresql://cnnflow:***@127.0.0.1:{port}/bad "
                           "is not usable (")
    reason = {"closed port": "connection refused",
              "wrong password": 'password authentication failed for user "cnnflow"'}[case]
    assert reason in line
    assert secret not in line and postgres_server.password not in line
    assert not (home / "mlflow.pid").exists() and not (home / "logs").exists()
    assert services._port_problem(services.SERVICES["mlflow"], "127.0.0.1", mlflow_port,
                                  home / "x.log") is None  # nobody listens: nothing started


def test_backend_and_backend_store_uri_together_is_one_line(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CNNFLOW_HOME", str(tmp_path / "home"))
    line = one_line(cnnflow("up", "--backend", "postgresql", "--backend-store-uri",
                            "postgresql://u:hunter2@127.0.0.1:1/db"))
    assert line == "Error: give either --backend or --backend-store-uri, not both"


def test_sqlalchemy_url_names_the_installed_driver():
    assert sqlalchemy_url("postgresql://u:p@h:5/db") == "postgresql+psycopg2://u:p@h:5/db"
    assert sqlalchemy_url("postgres://u@h/db") == "postgresql+psycopg2://u@h/db"
    for kept in ("postgresql+psycopg2://u@h/db", "sqlite:///x.db", "mysql://u@h/db"):
        assert sqlalchemy_url(kept) == kept


# --------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def pg_mlflow(postgres_server, tmp_path_factory: pytest.TempPathFactory):
    """An MLflow server (`cnnflow up --backend-store-uri`) on a database of the session's
    PostgreSQL, artifacts in its own state folder."""
    home = tmp_path_factory.mktemp("pg-mlflow")
    store = postgres_server.uri(f"mlflow_{uuid4().hex[:8]}")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        [started] = services.up(names=["mlflow"], home=home, mlflow_port=free_port(),
                                backend_store_uri=store, timeout=120)
    try:
        assert started.state == "running", started
        assert services._read_record(home, "mlflow")["store"].startswith(
            "postgresql://cnnflow:***@")
        yield started.url
    finally:
        services.down(["mlflow"], home=home)


def pipeline(tracking: str, mongo: str, data: Path, experiment: str, reports: Path) -> dict:
    """`cnnflow run` (two tiny models), then `cnnflow sync` and `cnnflow report` on its own:
    the mirror's rows for the experiment, by model name."""
    env = {"MLFLOW_TRACKING_URI": tracking, "MONGO_URI": mongo}
    run = cnnflow("run", "--data", str(data), "--experiment", experiment,
                  "--models", ",".join(MODELS), "--weights", "none", "--image-size", "16",
                  "--epochs", "2", "--batch-size", "8", "--num-workers", "0",
                  "--augmentation", "none", "--reports-dir", str(reports),
                  "--sync", "false", "--report", "false", env=env)
    assert run.exit_code == 0, run.output
    synced = cnnflow("sync", "--experiments", experiment, env=env)
    assert synced.exit_code == 0, synced.output
    report = cnnflow("report", "--experiment", experiment, "--reports-dir", str(reports),
                     "--pdf", "false", env=env)
    assert report.exit_code == 0, report.output
    html = (reports / experiment / "report.html").read_text()
    for model in MODELS:
        assert model in html
    with MongoClient(mongo, serverSelectionTimeoutMS=5000) as client:
        frame = dashboard.load_runs(client[mongo.rsplit("/", 1)[1]], experiments=[experiment])
    rows = {row["model_name"]: row for row in frame.to_dict("records")}
    assert set(MODELS) <= set(rows), rows.keys()
    return rows


def test_pipeline_on_postgresql_matches_sqlite(pg_mlflow: str, mlflow_server: str,
                                               mongo_server: str, tmp_path: Path):
    data = make_image_folder(tmp_path / "tiny", {"red": 8, "green": 8, "blue": 8})
    results = {}
    for backend, tracking in (("postgresql", pg_mlflow), ("sqlite", mlflow_server)):
        experiment = f"pg-vs-sqlite-{backend}-{uuid4().hex[:6]}"
        mongo = f"{mongo_server}/mirror_{uuid4().hex[:8]}"
        results[backend] = pipeline(tracking, mongo, data, experiment, tmp_path / backend)
    pg, lite = results["postgresql"], results["sqlite"]
    assert set(pg) == set(lite)  # the models and the ensemble
    for model in pg:
        assert pg[model]["status"] == lite[model]["status"] == "completed"
        for metric in COMPARED:
            mine, theirs = pg[model][metric], lite[model][metric]
            if model in MODELS or not math.isnan(theirs):  # an ensemble has no train_accuracy
                assert mine == pytest.approx(theirs, rel=1e-6, abs=1e-9), (model, metric)
            else:
                assert math.isnan(mine), (model, metric)
    # The PostgreSQL-backed runs are really in PostgreSQL's MLflow: their run ids differ.
    assert {pg[m]["run_id"] for m in MODELS}.isdisjoint({lite[m]["run_id"] for m in MODELS})
