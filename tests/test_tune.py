"""`cnnflow tune`: an Optuna study whose trials are nested training runs (real MLflow server)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from helpers import BIN, runs_of, subprocess_env
from mlflow import MlflowClient
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from components.steps import tune as tuning
from components.steps.tune import TuneError, parse_space
from pipelines.cli import cli

FAST = ["--image-size", "16", "--num-workers", "0", "--weights", "none", "--augmentation",
        "none", "--patience", "0", "--epochs", "2"]




class _PruneSecondTrial(optuna.pruners.BasePruner):
    """Deterministic: trial 1 is pruned at its first report, the others never."""

    def prune(self, study, trial) -> bool:
        return trial.number == 1


def test_space_syntax():
    space, fixed = parse_space("lr: loguniform(1e-5, 1e-2); batch_size: [16, 32]; "
                               "dropout: uniform(0, 0.6); scheduler_patience: int(1, 5); "
                               "optimizer: choice(adam, sgd); scheduler: plateau")
    assert space["lr"] == FloatDistribution(1e-5, 1e-2, log=True)
    assert space["batch_size"] == CategoricalDistribution([16, 32])
    assert space["dropout"] == FloatDistribution(0.0, 0.6)
    assert space["scheduler_patience"] == IntDistribution(1, 5)
    assert space["optimizer"] == CategoricalDistribution(["adam", "sgd"])
    assert fixed == {"scheduler": "plateau"}


def test_space_from_yaml_file(tmp_path: Path):
    path = tmp_path / "space.yaml"
    path.write_text("lr: loguniform(1e-4, 1e-1)\nfreeze: [none, backbone]\n")
    space, _ = parse_space(str(path))
    assert set(space) == {"lr", "freeze"}


@pytest.mark.parametrize("text, message", [
    ("lr: gaussian(0, 1)", "unknown distribution 'gaussian'"),
    ("lr: loguniform(1e-2)", "bad arguments"),
    ("lr: loguniform(1e-5, 1e-2", "cannot read"),
    ("colour: [1, 2]", "'colour' is not a tunable train parameter"),
    ("batch_size: [a, b]", "is not a int"),
    ("lr: 0.1", "only fixed values"),
    ("no_such_file.yaml", "does not exist"),
])
def test_bad_space_is_a_one_line_error(text, message):
    with pytest.raises(TuneError, match=message) as info:
        parse_space(text)
    assert "\n" not in str(info.value)


def test_grid_needs_lists():
    params = tuning.TuneParams(space="lr: loguniform(1e-4, 1e-1)", sampler="grid")
    with pytest.raises(TuneError, match="sampler grid needs a list"):
        tuning.check(params)


def test_trials_are_nested_runs_best_params_logged_and_pruned_trial_killed(
        tracking, image_folder, tmp_path, monkeypatch):
    monkeypatch.setitem(tuning.PRUNERS, "test-second", lambda epochs: _PruneSecondTrial())
    data = image_folder({"red": 8, "green": 8, "blue": 8})
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    result = CliRunner().invoke(cli, [
        "tune", "--data", str(data), "--experiment", "tune", "--n-trials", "3",
        "--space", "lr: [0.01, 0.003, 0.001]; batch_size: [8]", "--sampler", "grid",
        "--pruner", "test-second", "--storage", storage, "--study", "nested",
        "--retrain-best", "true", *FAST], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    runs = runs_of(tracking, "tune")
    (parent,) = [r for r in runs if r.data.tags.get("cnnflow.step") == "tune"]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tune-v1"
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["cnnflow.trial"] for r in trials) == ["0", "1", "2"]
    assert all(r.data.tags["cnnflow.step"] == "train" for r in trials)
    (pruned,) = [r for r in trials if r.data.tags["cnnflow.trial"] == "1"]
    assert pruned.info.status == "KILLED"
    assert pruned.data.tags["cnnflow.pruned"] == "true"
    assert "pruned at epoch 1" in pruned.data.tags["cnnflow.error"]
    done = [r for r in trials if r.info.status == "FINISHED"]
    assert len(done) == 2
    study = optuna.load_study(study_name="nested", storage=storage)
    best = study.best_trial
    assert parent.data.tags["cnnflow.best.lr"] == str(best.params["lr"])
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    assert parent.data.metrics["n_trials_pruned"] == 1
    assert parent.data.tags["cnnflow.best_run_id"] == best.user_attrs["run_id"]
    best_run = tracking.get_run(best.user_attrs["run_id"])
    # The objective is val_loss at the kept (best) checkpoint of that run.
    assert best_run.data.metrics["best_val_loss"] == pytest.approx(best.value)
    files = {f.path for f in tracking.list_artifacts(parent.info.run_id, "tune/figures")}
    assert "tune/figures/optimization_history.png" in files
    assert "tune/figures/slice.png" in files
    assert "tune/figures/optimization_history.html" in files  # interactive, via plotly
    table = tracking.download_artifacts(parent.info.run_id, "tune/trials.csv", str(tmp_path))
    assert len(Path(table).read_text().strip().splitlines()) == 1 + 3
    # --retrain-best: a normal (not nested) training run with the best params, evaluated.
    retrained = tracking.get_run(parent.data.tags["cnnflow.retrained_run_id"])
    assert "mlflow.parentRunId" not in retrained.data.tags
    assert retrained.info.experiment_id == parent.info.experiment_id
    assert retrained.data.params["lr"] == str(best.params["lr"])
    assert "test_acc" in retrained.data.metrics and retrained.info.status == "FINISHED"


def test_two_workers_share_one_study(mlflow_server, image_folder, tmp_path):
    data = image_folder({"red": 6, "green": 6})
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    env = subprocess_env(mlflow_server)
    cmd = [str(BIN / "cnnflow"), "tune", "--data", str(data), "--experiment", "shared",
           "--n-trials", "2", "--space", "lr: loguniform(1e-3, 1e-1)", "--pruner", "none",
           "--storage", storage, "--study", "shared", *FAST[:-2], "--epochs", "1"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    study = optuna.load_study(study_name="shared", storage=storage)
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    client = MlflowClient(mlflow_server)
    runs = runs_of(client, "shared")
    (parent,) = [r for r in runs if r.data.tags.get("cnnflow.step") == "tune"]  # shared
    assert {r.data.tags["mlflow.parentRunId"] for r in runs
            if "cnnflow.trial" in r.data.tags} == {parent.info.run_id}
    trial_tags = sorted(r.data.tags["cnnflow.trial"] for r in runs
                        if "cnnflow.trial" in r.data.tags)
    assert trial_tags == ["0", "1", "2", "3"]
    assert {t.user_attrs["run_id"] for t in study.trials} == \
        {r.info.run_id for r in runs if "cnnflow.trial" in r.data.tags}


@pytest.mark.parametrize("args, message", [
    (["--space", "lr: normal(0, 1)"], "unknown distribution 'normal'"),
    (["--sampler", "cmaes"], "unknown sampler 'cmaes'"),
    (["--pruner", "asha"], "unknown pruner 'asha'"),
    (["--metric", "f1"], "metric 'f1' is not an epoch metric"),
    (["--data", "/no/such/folder"], "/no/such/folder"),
    (["--storage", "postgresql://u:s3cret@127.0.0.1:9/db", "--study", "s"],
     "cannot open Optuna storage postgresql://u:***@127.0.0.1:9/db"),
    # Without --study the study is named after the run: its storage is checked before it.
    (["--storage", "postgresql://u:s3cret@127.0.0.1:9/db"],
     "cannot open Optuna storage postgresql://u:***@127.0.0.1:9/db"),
    (["--storage", "sqlite:////no/such/folder/optuna.db"], "(/no/such/folder) does not exist"),
    (["--storage", "optuna.db"], "--storage optuna.db is not a database URL"),
])
def test_bad_input_is_one_line_and_creates_no_run(tracking, image_folder, args, message):
    data = image_folder({"a": 4, "b": 4})
    result = CliRunner().invoke(cli, ["tune", "--data", str(data), "--experiment", "tune-bad",
                                      *FAST, *args])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "s3cret" not in result.output
    assert runs_of(tracking, "tune-bad") == []


def test_joining_a_study_with_the_other_direction_is_refused(tracking, image_folder, tmp_path):
    storage = f"sqlite:///{tmp_path / 'dir.db'}"
    optuna.create_study(storage=storage, study_name="s", direction="maximize")
    result = CliRunner().invoke(cli, ["tune", "--data", str(image_folder({"a": 4, "b": 4})),
                                      "--experiment", "tune-dir", "--storage", storage,
                                      "--study", "s", *FAST])
    assert result.exit_code == 1, result.output
    assert "was created to maximize" in result.output
    assert runs_of(tracking, "tune-dir") == []
