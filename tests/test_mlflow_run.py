"""`mlflow run` without surprises, through the real thing: `mlflow run <repo> -e train` as a
subprocess against the session's MLflow server, and `cnnflow eda` against a local store.

- `--experiment-name X` puts the run in X, which is tagged as model training;
- `-P experiment=Y` that differs from the experiment `mlflow run` opened its run in stops the
  step before any work, in one line naming `--experiment-name`, and ends that run FAILED with
  the reason as its `cnnflow.error` tag;
- a command tracking to a local store while `cnnflow up`'s server runs says so in one note.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
from helpers import BIN, runs_of, subprocess_env
from mlflow import MlflowClient

from components import services
from components.names import ERROR_TAG

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model": "lenet5", "image_size": 16, "epochs": 1, "batch_size": 8, "num_workers": 0,
        "weights": "none", "augmentation": "none"}


@pytest.fixture
def experiment() -> str:
    """A fresh experiment name per test on the shared server."""
    return f"mlrun-{uuid.uuid4().hex[:8]}"


def mlflow_run(uri: str, cwd: Path, *args: str, **params: object) -> subprocess.CompletedProcess:
    """`mlflow run <repo root> -e train --env-manager local <args> -P k=v ...`, run from `cwd`."""
    command = [str(BIN / "mlflow"), "run", str(ROOT), "-e", "train", "--env-manager", "local",
               *args]
    for key, value in {**TINY, **params}.items():
        command += ["-P", f"{key}={value}"]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300,
                          env=subprocess_env(uri))


def test_experiment_name_picks_the_experiment(mlflow_server: str, image_folder, tmp_path: Path,
                                              experiment: str):
    data = image_folder({"red": 8, "green": 8})
    proc = mlflow_run(mlflow_server, tmp_path, "--experiment-name", experiment, data=data)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    [run] = runs_of(client, experiment)
    assert run.info.status == "FINISHED" and run.info.run_name == "lenet5-v1"
    assert "val_acc" in run.data.metrics
    exp = client.get_experiment_by_name(experiment)
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to the default store


def test_experiment_param_that_disagrees_fails_the_run_before_work(
        mlflow_server: str, image_folder, tmp_path: Path, experiment: str):
    data = image_folder({"red": 8, "green": 8})
    other = f"{experiment}-other"
    proc = mlflow_run(mlflow_server, tmp_path, "--experiment-name", experiment, data=data,
                      experiment=other)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    named = [line for line in output.splitlines() if "--experiment-name" in line]
    assert len(named) == 1, output[-3000:]
    assert f"-P experiment={other} but mlflow run opened its run in experiment " \
           f"'{experiment}': pass --experiment-name {other} to mlflow run" in named[0]
    client = MlflowClient(mlflow_server)
    [run] = runs_of(client, experiment)
    assert run.info.status == "FAILED"
    assert "--experiment-name" in run.data.tags[ERROR_TAG]
    assert run.data.metrics == {}  # stopped before training: no epoch, no model
    exp_id = run.info.experiment_id
    assert client.search_logged_models(experiment_ids=[exp_id]) == []
    assert client.get_experiment_by_name(other) is None


def test_local_store_while_the_server_runs_is_one_note(mlflow_server: str, services_home: Path,
                                                       image_folder, tmp_path: Path):
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = subprocess_env(store, CNNFLOW_HOME=str(services_home))
    proc = subprocess.run([str(BIN / "cnnflow"), "eda", "--data", str(image_folder()),
                           "--reports-dir", str(tmp_path / "reports"), "--num-workers", "0"],
                          capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)  # the store's artifacts go to ./mlruns: not the repo's
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = [line for line in proc.stderr.splitlines() if line.startswith("note: tracking to")]
    assert notes == [f"note: tracking to {store} (a local store), not the cnnflow server at "
                     f"{mlflow_server} that is running: eval \"$(cnnflow env)\" and run again"]
    assert "note: tracking to" not in proc.stdout


def test_the_note_names_mlflow_default_store_and_only_when_a_server_runs(
        mlflow_server: str, services_home: Path, tmp_path: Path):
    note = services.local_store_note("sqlite:///mlflow.db", home=services_home)
    assert note.startswith("note: tracking to sqlite:///mlflow.db (MLflow's default store)")
    assert mlflow_server in note
    assert "(MLflow's default store)" in services.local_store_note(
        "file:///work/mlruns", home=services_home)
    assert services.local_store_note(mlflow_server, home=services_home) == ""
    assert services.local_store_note("sqlite:///mlflow.db", home=tmp_path / "empty") == ""
