"""`cnnflow run`: the whole pipeline as child runs of one parent, reused and resumed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import uuid4

import pytest
from click.testing import CliRunner
from helpers import BIN, free_port, history, make_image_folder, runs_of, subprocess_env
from mlflow import MlflowClient
from pymongo import MongoClient

from components.mirror.sync import TRAININGS
from pipelines.cli import cli

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("custom_cnn", "lenet5")
STEPS = 10  # eda, preprocess, 2 x train, 2 x evaluate, ensemble + its evaluation, promote, sync


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("pipeline") / "tiny",
                             {"red": 8, "green": 8, "blue": 8})


def run_args(data: Path, experiment: str, reports: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--experiment", experiment, "--models", ",".join(MODELS),
            "--weights", "none", "--image-size", "16", "--epochs", "1", "--batch-size", "8",
            "--num-workers", "0", "--augmentation", "none", "--reports-dir", str(reports),
            *extra]


def invoke(env: dict[str, str], *args: str):
    return CliRunner(env=env).invoke(cli, ["run", *args])


def children(client: MlflowClient, parent: str) -> list:
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")


def pipelines(client: MlflowClient, experiment: str) -> list:
    return [r for r in runs_of(client, experiment) if r.data.tags.get("cnnflow.step") == "pipeline"]


@pytest.fixture
def env(mlflow_server: str, mongo_server: str) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": mlflow_server,
            "MONGO_URI": f"{mongo_server}/mirror_{uuid4().hex[:8]}"}


def test_main_runs_every_step_under_one_parent_then_reuses_them(tiny, env, tmp_path):
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = f"pipe-{uuid4().hex[:6]}"
    result = invoke(env, *run_args(tiny, experiment, tmp_path))
    assert result.exit_code == 0, result.output
    [parent] = pipelines(client, experiment)
    assert parent.info.status == "FINISHED"
    kids = children(client, parent.info.run_id)
    steps = sorted(r.data.tags["cnnflow.step"] for r in kids)
    assert steps == sorted(["eda", "preprocess", "train", "train", "evaluate", "evaluate",
                            "ensemble", "evaluate", "promote", "sync"])
    assert all(r.info.status == "FINISHED" for r in kids)
    step = {r.info.run_id: r.data.tags["cnnflow.step"] for r in kids}
    trains = {r.data.tags["cnnflow.model"]: r for r in kids if step[r.info.run_id] == "train"}
    assert set(trains) == set(MODELS)
    prep = next(r for r in kids if r.data.tags["cnnflow.step"] == "preprocess")
    assert all(r.data.params["preprocess_run"] == prep.info.run_id for r in trains.values())
    # Terminal: one line per step, then the final table with a champion.
    out = result.output
    assert f"[{STEPS}/{STEPS}] sync: ran" in out and f"{STEPS} steps ran, 0 reused" in out
    for model in MODELS:
        assert f"train {model}: ran" in out and f"{model}-v1" in out
    assert "champion: models:/" in out
    # The registry has a champion, and it is one of this pipeline's models.
    name = f"{experiment}-classifier"
    champion = client.get_model_version_by_alias(name, "champion")
    evaluated = {run_id for run_id, s in step.items() if s in ("train", "ensemble")}
    assert champion.run_id in evaluated
    assert parent.data.tags["cnnflow.champion_uri"] == f"models:/{name}@champion"
    # The mirror holds the models (not the bookkeeping runs).
    mongo = MongoClient(env["MONGO_URI"], serverSelectionTimeoutMS=5000)
    db = mongo[env["MONGO_URI"].rsplit("/", 1)[1]]
    mirrored = {d["_id"] for d in db[TRAININGS].find({}, {"_id": 1})}
    assert {r.info.run_id for r in trains.values()} <= mirrored
    bookkeeping = {run_id for run_id, s in step.items() if s not in ("train", "ensemble")}
    assert not mirrored & (bookkeeping | {parent.info.run_id})
    versions = db[TRAININGS].find_one({"_id": champion.run_id})["registry"]["versions"]
    [mirrored_version] = [v for v in versions if v["version"] == int(champion.version)]
    assert "champion" in mirrored_version["aliases"]
    compared = CliRunner(env=env).invoke(cli, ["compare", "--experiment", experiment,
                                                 "--out", str(tmp_path)])
    assert f"{name} v{champion.version} @challenger @champion" in compared.output
    # The parent carries the summary: per-model and champion metrics, which metric chose and
    # which judged, the final table as an MLflow table, and every model's curves in one figure.
    assert "candidate chosen by val_acc (validation split); promotion judged on test_acc " \
        "(test split)" in out
    tags, metrics = parent.data.tags, parent.data.metrics
    assert tags["cnnflow.selection_metric"] == "val_acc"
    assert tags["cnnflow.judgement_metric"] == "test_acc"
    for label in (*MODELS, "ensemble", "champion"):
        assert {f"summary.{label}.val_acc", f"summary.{label}.test_acc"} <= set(metrics), label
    assert metrics["summary.champion.test_acc"] == float(champion.tags["test_acc"])
    assert {"pipeline/comparison.json", "figures/curves_all_models.png"} <= {
        f.path for d in ("pipeline", "figures") for f in client.list_artifacts(
            parent.info.run_id, d)}
    table = json.loads(Path(client.download_artifacts(
        parent.info.run_id, "pipeline/comparison.json", str(tmp_path / "t"))).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [r["model"] for r in rows] == [*MODELS, "ensemble"]
    for row in rows:
        assert metrics[f"summary.{row['model']}.test_acc"] == pytest.approx(row["test_acc"])
    # The challenger is this pipeline's best by validation accuracy (first of equals).
    [chosen] = [r for r in rows if "@challenger" in r["aliases"]]
    assert chosen is next(r for r in rows if r["val_acc"] == max(x["val_acc"] for x in rows))
    # The report is the parent's artifact.
    logged = {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/report.html"} <= logged
    assert (tmp_path / experiment / "report.html").is_file()

    # Same command again: every step is reused, nothing new is trained or registered.
    before = {r.info.run_id for r in runs_of(client, experiment)}
    versions = len(client.search_model_versions(f"name = '{name}'"))
    again = invoke(env, *run_args(tiny, experiment, tmp_path))
    assert again.exit_code == 0, again.output
    assert f"0 steps ran, {STEPS} reused" in again.output
    new = {r.info.run_id for r in runs_of(client, experiment)} - before
    assert [client.get_run(r).data.tags["cnnflow.step"] for r in new] == ["pipeline"]
    assert len(client.search_model_versions(f"name = '{name}'")) == versions

    # --force re-runs every step; a changed parameter re-runs only what depends on it.
    forced = invoke(env, *run_args(tiny, experiment, tmp_path, "--force", "true", "--sync",
                                   "false", "--report", "false"))
    assert forced.exit_code == 0, forced.output
    assert f"{STEPS - 1} steps ran, 0 reused" in forced.output
    changed = invoke(env, *run_args(tiny, experiment, tmp_path, "--lr", "0.01", "--sync",
                                    "false", "--report", "false"))
    assert changed.exit_code == 0, changed.output
    assert "eda: reused" in changed.output and "preprocess: reused" in changed.output
    assert "train custom_cnn: running" in changed.output
    metric = invoke(env, *run_args(tiny, experiment, tmp_path, "--metric", "test_f1_macro",
                                   "--sync", "false", "--report", "false"))
    assert metric.exit_code == 0, metric.output
    assert f"{STEPS - 2} reused" in metric.output and "promote: running" in metric.output
    assert "candidate chosen by val_f1_macro (validation split); promotion judged on " \
        "test_f1_macro (test split)" in metric.output


def kill_when(args: list[str], env: dict[str, str], ready) -> None:
    """Start `cnnflow run` in a process and SIGKILL it (no clean-up at all) once `ready()`."""
    child_env = subprocess_env(env["MLFLOW_TRACKING_URI"], MONGO_URI=env["MONGO_URI"])
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.main", *args], cwd=ROOT,
                            env=child_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and not ready():
            time.sleep(0.05)
        assert proc.poll() is None, "the pipeline ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)


def train_runs(client: MlflowClient, experiment: str) -> list:
    return [r for r in runs_of(client, experiment) if r.data.tags.get("cnnflow.step") == "train"]


def test_killed_after_training_resumes_at_evaluate(tiny, env, tmp_path):
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = f"kill-{uuid4().hex[:6]}"
    args = run_args(tiny, experiment, tmp_path, "--sync", "false")
    kill_when(args, env, lambda: len([r for r in train_runs(client, experiment)
                                      if r.info.status == "FINISHED"]) == len(MODELS))
    [parent] = pipelines(client, experiment)
    assert parent.info.status == "RUNNING"

    result = invoke(env, *args)
    assert result.exit_code == 0, result.output
    assert f"pipeline {parent.info.run_name} ({parent.info.run_id}) resumed" in result.output
    for step in ("eda", "preprocess", *(f"train {m}" for m in MODELS)):
        assert f"{step}: reused" in result.output
    assert f"evaluate {MODELS[0]}: " in result.output
    assert f"[{len(MODELS) + 3}/" in result.output and "ran in" in result.output
    runs = runs_of(client, experiment)
    assert [r.info.run_id for r in runs if r.data.tags.get("cnnflow.step") == "pipeline"] == \
        [parent.info.run_id]
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"
    assert not [r for r in runs if r.info.status == "RUNNING"]  # orphans were closed
    assert len([r for r in runs if r.data.tags.get("cnnflow.step") == "train"]) == len(MODELS)
    assert client.get_model_version_by_alias(f"{experiment}-classifier", "champion")


def test_a_training_run_killed_mid_way_continues_from_its_checkpoint(tiny, env, tmp_path):
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = f"midway-{uuid4().hex[:6]}"
    epochs = 40
    args = run_args(tiny, experiment, tmp_path, "--models", "custom_cnn", "--epochs",
                    str(epochs), "--patience", "0", "--sync", "false", "--report", "false")

    def two_epochs_logged() -> bool:
        runs = train_runs(client, experiment)
        return bool(runs) and len(history(client, runs[0].info.run_id, "val_loss")) >= 2

    kill_when(args, env, two_epochs_logged)
    [killed] = train_runs(client, experiment)
    done = len(history(client, killed.info.run_id, "val_loss"))
    assert killed.info.status == "RUNNING" and done < epochs

    result = invoke(env, *args)
    assert result.exit_code == 0, result.output
    assert f"resuming custom_cnn-v1 ({killed.info.run_id}) after epoch" in result.output
    [run] = train_runs(client, experiment)  # the same run, finished, each epoch logged once
    assert run.info.run_id == killed.info.run_id and run.info.status == "FINISHED"
    assert [step for step, _ in history(client, run.info.run_id, "val_loss")] == \
        list(range(1, epochs + 1))


@pytest.mark.parametrize("extra, message", [
    (["--models", "custom_cnn,resnet9000"], "unknown model 'resnet9000'"),
    (["--models", "custom_cnn,custom_cnn"], "listed twice"),
    (["--top-k", "1"], "top_k must be 0 (no ensemble) or >= 2"),
    (["--metric", "best_val_acc"], "is not one evaluate records on a version"),
    (["--val-ratio", "0.7", "--test-ratio", "0.5"], "ratio"),
])
def test_bad_parameters_fail_in_one_line_before_any_run(tiny, env, tmp_path, extra, message):
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = f"bad-{uuid4().hex[:6]}"
    result = invoke(env, *run_args(tiny, experiment, tmp_path), *extra)
    assert result.exit_code == 1
    [line] = result.output.strip().splitlines()
    assert line.startswith("Error: ") and message in line
    assert runs_of(client, experiment) == []


def test_missing_folder_and_unreachable_mongo_fail_before_any_run(tiny, env, tmp_path):
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = f"bad-{uuid4().hex[:6]}"
    missing = invoke(env, *run_args(tmp_path / "nope", experiment, tmp_path))
    assert missing.exit_code == 1 and "does not exist" in missing.output
    down = {**env, "MONGO_URI": f"mongodb://user:s3cret@127.0.0.1:{free_port()}/x"}
    result = invoke(down, *run_args(tiny, experiment, tmp_path))
    assert result.exit_code == 1
    [line] = result.output.strip().splitlines()
    assert "not reachable" in line and "s3cret" not in line and "--sync false" in line
    assert runs_of(client, experiment) == []


def test_mlflow_run_main_entry_point_adopts_the_parent_run(tiny, env):
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    experiment = f"mlproject-main-{uuid4().hex[:6]}"
    params = {"data": tiny, "models": ",".join(MODELS), "weights": "none", "image_size": 16,
              "epochs": 1, "batch_size": 8, "num_workers": 0, "augmentation": "none",
              "sync": "false", "report": "false"}
    command = [str(BIN / "mlflow"), "run", str(ROOT), "-e", "main",
               "--env-manager", "local", "--experiment-name", experiment]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env=subprocess_env(env["MLFLOW_TRACKING_URI"], MONGO_URI=env["MONGO_URI"],
                                             MLFLOW_DISABLE_TELEMETRY="true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    [parent] = pipelines(client, experiment)
    assert parent.info.status == "FINISHED" and parent.data.params["models"] == ",".join(MODELS)
    kids = children(client, parent.info.run_id)
    assert len(kids) == STEPS - 1  # no sync step
    assert client.get_model_version_by_alias(f"{experiment}-classifier", "champion")
