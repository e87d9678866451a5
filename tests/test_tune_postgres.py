"""`cnnflow tune` on a real PostgreSQL study: workers in separate processes share one study
and one parent run; a database that refuses, never answers or rejects the password is one
masked line, in bounded time, before any run exists."""

from __future__ import annotations

import re
import socket
import subprocess
import time

import optuna
import pytest
from click.testing import CliRunner
from helpers import BIN, free_port, runs_of, subprocess_env
from mlflow import MlflowClient

from components.settings import sqlalchemy_url
from pipelines.cli import cli

FAST = ["--image-size", "16", "--num-workers", "0", "--weights", "none", "--augmentation",
        "none", "--patience", "0", "--epochs", "1"]
TRIALS_PER_WORKER = 3


def test_two_workers_share_one_postgres_study_and_one_parent_run(
        postgres_server, mlflow_server, image_folder):
    storage = postgres_server.uri("tune_shared")
    data = image_folder({"red": 6, "green": 6})
    cmd = [str(BIN / "cnnflow"), "tune", "--data", str(data), "--experiment", "pg-shared",
           "--n-trials", str(TRIALS_PER_WORKER), "--space", "lr: loguniform(1e-3, 1e-1)",
           "--pruner", "none", "--storage", storage, "--study", "pg", *FAST]
    env = subprocess_env(mlflow_server)
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert postgres_server.password not in out + err
        assert "optuna storage postgresql://" in err and ":***@" in err and "(--storage)" in err

    # Each worker ran its own trials; Optuna numbered them once each, 0..5, across both.
    ran = [{int(n) for n in re.findall(r"^trial (\d+):", err, re.M)} for _, err in outs]
    assert [len(r) for r in ran] == [TRIALS_PER_WORKER] * 2 and not ran[0] & ran[1]
    study = optuna.load_study(study_name="pg", storage=sqlalchemy_url(storage))
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(2 * TRIALS_PER_WORKER)) == sorted(ran[0] | ran[1])
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    # Interleaved: each worker's trials span a time the other worker's trials also ran in.
    spans = [(min(study.trials[n].datetime_start for n in r),
              max(study.trials[n].datetime_complete for n in r)) for r in ran]
    assert spans[0][0] < spans[1][1] and spans[1][0] < spans[0][1], spans

    # One parent run for the study; the trial runs under it are exactly the study's trials.
    client = MlflowClient(mlflow_server)
    runs = runs_of(client, "pg-shared")
    (parent,) = [r for r in runs if r.data.tags.get("cnnflow.step") == "tune"]
    trials = [r for r in runs if "cnnflow.trial" in r.data.tags]
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}
    assert sorted(int(r.data.tags["cnnflow.trial"]) for r in trials) == sorted(numbers)
    assert {r.info.run_id for r in trials} == {t.user_attrs["run_id"] for t in study.trials}
    # Whichever worker ended last, the parent holds the study's best.
    best = study.best_trial
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    assert parent.data.metrics["n_trials_complete"] == 2 * TRIALS_PER_WORKER
    assert parent.data.tags["cnnflow.best.lr"] == str(best.params["lr"])
    assert parent.data.tags["cnnflow.best_trial"] == str(best.number)
    assert parent.data.tags["cnnflow.best_run_id"] == best.user_attrs["run_id"]
    assert postgres_server.password not in str(parent.data.params) + str(parent.data.tags)


def _silent_port() -> tuple[socket.socket, int]:
    """A port that accepts connections and never says a word: the server that hangs."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock, sock.getsockname()[1]


@pytest.mark.parametrize("case", ["closed port", "silent port", "wrong password"])
def test_bad_database_is_one_masked_line_fast_and_creates_no_run(
        postgres_server, tracking, image_folder, case):
    silent = None
    if case == "closed port":
        storage = f"postgresql://cnnflow:s3cret-pw@127.0.0.1:{free_port()}/optuna"
        secret, message = "s3cret-pw", "Connection refused"
    elif case == "silent port":
        silent, port = _silent_port()
        storage = f"postgresql://cnnflow:s3cret-pw@127.0.0.1:{port}/optuna"
        secret, message = "s3cret-pw", "timeout"
    else:
        good = postgres_server.uri("tune_bad")
        secret = f"not-{postgres_server.password}"
        storage = good.replace(f":{postgres_server.password}@", f":{secret}@")
        assert storage != good
        message = "password authentication failed"
    experiment = f"pg-bad-{case.replace(' ', '-')}"
    start = time.monotonic()
    try:
        result = CliRunner().invoke(cli, [
            "tune", "--data", str(image_folder({"a": 4, "b": 4})), "--experiment", experiment,
            "--storage", storage, "--study", "s", *FAST])
    finally:
        if silent is not None:
            silent.close()
    elapsed = time.monotonic() - start
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert "cannot open Optuna storage postgresql://cnnflow:***@127.0.0.1" in errors[0]
    assert message in errors[0], errors[0]
    assert secret not in result.output and postgres_server.password not in result.output
    assert elapsed < 15, f"{case}: {elapsed:.1f} s"
    assert runs_of(tracking, experiment) == []


def test_auto_storage_without_a_postgres_from_up_is_the_sqlite_file(tmp_path, monkeypatch):
    from components.settings import state_dir
    from components.steps.params import TuneParams
    from components.steps.tune import describe_storage

    monkeypatch.setenv("CNNFLOW_HOME", str(tmp_path / "home"))
    params = TuneParams(storage="auto")
    url = params.storage_url()
    assert url == f"sqlite:///{state_dir() / 'optuna.db'}"
    assert "auto: no PostgreSQL started by `cnnflow up`" in describe_storage(params, url)


def test_auto_storage_is_an_optuna_database_on_the_postgres_that_up_started(
        postgres_server, tracking, image_folder, monkeypatch):
    import shutil
    import tempfile
    from pathlib import Path

    from components import services
    from components.steps.params import TuneParams

    # Under /tmp, not pytest's 0700 folders: as root the server runs as `postgres`.
    home = Path(tempfile.mkdtemp(prefix="cnnflow-auto-"))
    home.chmod(0o711)
    monkeypatch.setenv("CNNFLOW_HOME", str(home))
    try:
        [pg] = services.up(names=["postgres"], home=home, ports={"postgres": free_port()},
                           timeout=120)
        assert pg.state == "running", pg
        result = CliRunner().invoke(cli, [
            "tune", "--data", str(image_folder({"a": 4, "b": 4})), "--experiment", "pg-auto",
            "--n-trials", "1", "--space", "lr: [0.01]", "--pruner", "none",
            "--storage", "auto", "--study", "auto", *FAST])
        assert result.exit_code == 0, result.output
        server = services.postgres_uri(home)
        password = server.split("@")[0].rsplit(":", 1)[1]
        assert password and password not in result.output
        assert re.search(r"optuna storage postgresql://\w+:\*\*\*@127\.0\.0\.1:\d+/optuna "
                         r"\(auto: the PostgreSQL", result.output), result.output
        url = TuneParams(storage="auto").storage_url()
        study = optuna.load_study(study_name="auto", storage=sqlalchemy_url(url))
        assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]
    finally:
        services.down(["postgres"], home=home)
        shutil.rmtree(home, ignore_errors=True)
