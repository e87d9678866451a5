"""Runs opened at the same moment in one experiment get distinct names and versions.

Against the session's real MLflow server: `tracking.open_run` from 2 and 8 threads released
together (new runs, adopted job runs, model and step labels), and two real `cnnflow train`
processes started together.
"""

from __future__ import annotations

import subprocess
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import BIN, make_image_folder, subprocess_env
from mlflow import MlflowClient

from components import tracking
from components.names import MODEL_TAG, STEP_TAG, VERSION_TAG


@pytest.fixture
def client(mlflow_server: str) -> MlflowClient:
    return tracking.connect(mlflow_server)


def open_together(client: MlflowClient, calls: list[dict]) -> list[tracking.OpenedRun]:
    """Each call's `open_run` in its own thread, all released by one barrier."""
    barrier = threading.Barrier(len(calls))

    def one(kwargs: dict) -> tracking.OpenedRun:
        barrier.wait()
        return tracking.open_run(client, **kwargs)

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(one, calls))


def stored(client: MlflowClient, run_id: str) -> tuple[str, str]:
    run = client.get_run(run_id)
    return run.info.run_name, run.data.tags[VERSION_TAG]


@pytest.mark.parametrize("n", [2, 8])
def test_simultaneous_model_runs_get_distinct_versions(client: MlflowClient, n: int):
    experiment = f"race-{uuid.uuid4().hex[:8]}"
    opened = open_together(client, [dict(step="train", model="lenet5", experiment=experiment)
                                     for _ in range(n)])
    assert sorted(o.name for o in opened) == sorted(f"lenet5-v{i}" for i in range(1, n + 1))
    for o in opened:  # what MLflow holds agrees with what open_run said
        name, version = stored(client, o.run_id)
        assert name == o.name and name == f"lenet5-v{version}"
        assert tracking.CLAIM_TAG not in client.get_run(o.run_id).data.tags
    assert len({o.experiment_id for o in opened}) == 1
    # the next run continues after them
    assert tracking.open_run(client, step="train", model="lenet5",
                             experiment=experiment).name == f"lenet5-v{n + 1}"


def test_simultaneous_adopted_and_new_runs_share_one_count(client: MlflowClient):
    """Job runs `mlflow run` opened, new runs and another label, all released together:
    each label counts its own runs, 1..N without a gap or a repeat."""
    experiment = f"race-{uuid.uuid4().hex[:8]}"
    exp_id = tracking.experiment_id(client, experiment)
    jobs = [client.create_run(exp_id).info.run_id for _ in range(3)]
    calls = ([dict(step="preprocess", adopt=job) for job in jobs]
             + [dict(step="preprocess", experiment=experiment) for _ in range(3)]
             + [dict(step="train", model="custom_cnn", experiment=experiment)
                for _ in range(2)])
    opened = open_together(client, calls)
    steps = [o for o in opened[:6]]
    assert [o.run_id for o in steps[:3]] == jobs
    assert sorted(o.name for o in steps) == [f"preprocess-v{i}" for i in range(1, 7)]
    assert sorted(o.name for o in opened[6:]) == ["custom_cnn-v1", "custom_cnn-v2"]
    for o in opened:
        tags = client.get_run(o.run_id).data.tags
        assert o.name.endswith(f"-v{tags[VERSION_TAG]}")
        assert tags[STEP_TAG] in ("preprocess", "train")
    assert client.get_run(opened[6].run_id).data.tags[MODEL_TAG] == "custom_cnn"
    assert len(client.search_runs([exp_id])) == 8  # nothing created beyond the runs asked for


def test_a_dead_claim_blocks_nobody(client: MlflowClient):
    """A process killed between creating its run and settling its version leaves a claim
    without a version: it is stale, so later runs do not wait for it."""
    experiment = f"race-{uuid.uuid4().hex[:8]}"
    exp_id = tracking.experiment_id(client, experiment)
    client.create_run(exp_id, tags={STEP_TAG: "eda", tracking.CLAIM_TAG: "1000:1"})  # long dead
    assert tracking.open_run(client, step="eda", experiment=experiment).name == "eda-v1"


def test_two_trainings_started_together_are_v1_and_v2(mlflow_server: str, client: MlflowClient,
                                                      tmp_path: Path):
    data = make_image_folder(tmp_path / "race16", {"a": 6, "b": 6}, size=16)
    experiment = f"race-train-{uuid.uuid4().hex[:8]}"
    command = [str(BIN / "cnnflow"), "train", "--data", str(data), "--experiment", experiment,
               "--model", "lenet5", "--weights", "none", "--epochs", "1", "--image-size", "16",
               "--batch-size", "8", "--num-workers", "0", "--augmentation", "none"]
    env = subprocess_env(mlflow_server)
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([exp_id])
    assert sorted(r.info.run_name for r in runs) == ["lenet5-v1", "lenet5-v2"]
    assert sorted(r.data.tags[VERSION_TAG] for r in runs) == ["1", "2"]
    assert all(r.info.status == "FINISHED" for r in runs)
