"""Opening a step's run (`tracking.open_run`) and the explicit hand-over of the job's run.

Against the session's real MLflow server: new `<name>-vN` runs, versions counted per model and
per step, adopting a run someone else opened, children of a parent, reopening for a resume;
and `MLFLOW_RUN_ID` read in exactly one module, at the command-line boundary.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from components import tracking
from components.names import MODEL_TAG, STEP_TAG, VERSION_TAG
from pipelines.options import job_run_id

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def client(mlflow_server: str) -> MlflowClient:
    return tracking.connect(mlflow_server)


@pytest.fixture
def experiment() -> str:
    """A fresh experiment name per test: versions count from 1."""
    return f"runs-{uuid.uuid4().hex[:8]}"


def test_new_step_runs_are_named_step_vN(client: MlflowClient, experiment: str):
    first = tracking.open_run(client, step="eda", experiment=experiment,
                              tags={"cnnflow.data_root": "/data/x"})
    second = tracking.open_run(client, step="eda", experiment=experiment)
    assert (first.name, second.name) == ("eda-v1", "eda-v2")
    assert first.run_id != second.run_id
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None and first.experiment_id == exp.experiment_id
    run = client.get_run(first.run_id)
    assert run.info.run_name == "eda-v1" and run.info.status == "RUNNING"
    assert run.data.tags[STEP_TAG] == "eda" and run.data.tags[VERSION_TAG] == "1"
    assert run.data.tags["cnnflow.data_root"] == "/data/x"
    assert MODEL_TAG not in run.data.tags and MLFLOW_PARENT_RUN_ID not in run.data.tags


def test_versions_count_per_model_and_per_step(client: MlflowClient, experiment: str):
    names = [tracking.open_run(client, step=step, model=model, experiment=experiment).name
             for step, model in [("train", "lenet5"), ("train", "custom_cnn"),
                                 ("train", "lenet5"), ("ensemble", "ensemble"),
                                 ("preprocess", None), ("train", "lenet5"),
                                 ("preprocess", None)]]
    assert names == ["lenet5-v1", "custom_cnn-v1", "lenet5-v2", "ensemble-v1",
                     "preprocess-v1", "lenet5-v3", "preprocess-v2"]
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    [third] = client.search_runs([exp_id], filter_string="attributes.run_name = 'lenet5-v3'")
    assert third.data.tags[STEP_TAG] == "train" and third.data.tags[MODEL_TAG] == "lenet5"
    assert third.data.tags[VERSION_TAG] == "3"


def test_adopts_the_run_opened_for_the_job(client: MlflowClient, experiment: str):
    """As `mlflow run` (or the main pipeline) hands a run over: it keeps its id and
    experiment, gets the step's name and tags, and no run or experiment is created."""
    exp_id = tracking.experiment_id(client, experiment)
    tracking.open_run(client, step="preprocess", experiment=experiment)  # preprocess-v1
    job = client.create_run(exp_id).info.run_id  # what `mlflow run` opens: a random name
    elsewhere = f"{experiment}-not-used"
    opened = tracking.open_run(client, step="preprocess", experiment=elsewhere, adopt=job,
                               tags={"cnnflow.dataset": "digits"})
    assert opened == (job, exp_id, "preprocess-v2")
    run = client.get_run(job)
    assert run.info.run_name == "preprocess-v2"
    assert run.data.tags[STEP_TAG] == "preprocess" and run.data.tags[VERSION_TAG] == "2"
    assert run.data.tags["cnnflow.dataset"] == "digits"
    assert client.get_experiment_by_name(elsewhere) is None
    assert len(client.search_runs([exp_id])) == 2

    model_job = client.create_run(exp_id).info.run_id
    trained = tracking.open_run(client, step="train", model="lenet5", adopt=model_job)
    assert trained == (model_job, exp_id, "lenet5-v1")
    assert client.get_run(model_job).data.tags[MODEL_TAG] == "lenet5"


def test_child_of_a_parent_run(client: MlflowClient, experiment: str):
    parent = tracking.open_run(client, step="tune", experiment=experiment)
    assert parent.name == "tune-v1"
    child = tracking.open_run(client, step="train", model="lenet5", parent=parent.run_id,
                              experiment=f"{experiment}-not-used")
    assert child.experiment_id == parent.experiment_id and child.name == "lenet5-v1"
    tags = client.get_run(child.run_id).data.tags
    assert tags[MLFLOW_PARENT_RUN_ID] == parent.run_id and tags[STEP_TAG] == "train"
    assert MLFLOW_PARENT_RUN_ID not in client.get_run(parent.run_id).data.tags
    # a child counts among its model's runs like any other
    assert tracking.open_run(client, step="train", model="lenet5",
                             experiment=experiment).name == "lenet5-v2"


def test_the_environment_is_not_read_below_the_command_line(
        client: MlflowClient, experiment: str, monkeypatch: pytest.MonkeyPatch):
    exp_id = tracking.experiment_id(client, experiment)
    job = client.create_run(exp_id).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", job)
    assert job_run_id() == job  # the command line reads it ...
    opened = tracking.open_run(client, step="eda", experiment=experiment)
    assert opened.run_id != job  # ... and only what it hands over is adopted
    assert client.get_run(job).data.tags.get(STEP_TAG) is None
    monkeypatch.setenv("MLFLOW_RUN_ID", "")
    assert job_run_id() is None
    monkeypatch.delenv("MLFLOW_RUN_ID")
    assert job_run_id() is None


def test_reopen_keeps_name_and_version(client: MlflowClient, experiment: str):
    opened = tracking.open_run(client, step="train", model="lenet5", experiment=experiment)
    tracking.finish_run(client, opened.run_id, "KILLED", "stopped")
    again = tracking.reopen_run(client, opened.run_id)
    assert again == opened
    run = client.get_run(opened.run_id)
    assert run.info.status == "RUNNING" and run.data.tags[VERSION_TAG] == "1"


def test_mlflow_run_id_is_read_in_one_module():
    """The job's run is read at the command-line boundary and handed down as an argument."""
    readers = sorted(str(path.relative_to(ROOT))
                     for folder in ("components", "pipelines")
                     for path in (ROOT / folder).rglob("*.py")
                     if "MLFLOW_RUN_ID" in path.read_text(encoding="utf-8"))
    assert readers == ["pipelines/options.py"], (
        f"MLFLOW_RUN_ID appears in {readers}: read it only through "
        "pipelines.options.job_run_id() and pass the run id down")


def test_a_reserved_child_is_opened_by_its_step(client: MlflowClient, experiment: str):
    parent = tracking.open_run(client, step="pipeline", experiment=experiment)
    child = tracking.reserve_child(client, parent.run_id, parent.experiment_id, "evaluate",
                                   {"cnnflow.step_key": "k"})
    tags = client.get_run(child).data.tags
    assert tags[MLFLOW_PARENT_RUN_ID] == parent.run_id and VERSION_TAG not in tags
    opened = tracking.open_run(client, step="evaluate", adopt=child)
    assert opened == (child, parent.experiment_id, "evaluate-v1")
    with pytest.raises(ValueError, match="not both"):
        tracking.open_run(client, step="train", model="lenet5", adopt=child,
                          parent=parent.run_id)


def test_runs_are_created_in_tracking_only():
    """Every other module opens runs through tracking.open_run / reserve_child."""
    creators = sorted(str(path.relative_to(ROOT))
                      for folder in ("components", "pipelines")
                      for path in (ROOT / folder).rglob("*.py")
                      if "create_run(" in path.read_text(encoding="utf-8"))
    assert creators == ["components/tracking/__init__.py"], creators
