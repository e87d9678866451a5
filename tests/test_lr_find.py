"""The LR range test: the torch-only sweep, `cnnflow lr-find` against a real MLflow server,
and `train --lr auto` (the chosen LR logged, trained with, and reused on resume)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import history, runs_of
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from components.nn.config import TrainConfig
from components.nn.lr_find import range_test, suggest
from components.params import ParamError
from components.steps.params import TrainParams, TuneParams
from pipelines.cli import cli

TINY = ["--image-size", "16", "--batch-size", "8", "--num-workers", "0", "--weights", "none",
        "--augmentation", "none"]


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _blobs(n: int = 96, seed: int = 0) -> DataLoader:
    """Two separable Gaussian blobs: a problem a linear model learns at a sane LR."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=g)


# --------------------------------------------------------------------------- the sweep


def test_suggest_is_the_steepest_descent_of_the_smoothed_loss():
    lrs = list(np.geomspace(1e-6, 1, 61))
    centre = -3.0  # log10 of the LR where this sigmoid-shaped loss falls fastest
    smoothed = [2.0 / (1 + math.exp(3 * (math.log10(lr) - centre))) for lr in lrs]
    assert suggest(lrs, smoothed) == pytest.approx(1e-3, rel=0.15)
    assert suggest(lrs, smoothed) in lrs


def test_range_test_restores_the_model_and_suggests_a_swept_lr():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    test = range_test(model, _blobs(), TrainConfig(optimizer="sgd"), device=torch.device("cpu"),
                      start_lr=1e-5, end_lr=1.0, num_batches=40)
    assert len(test.lrs) == len(test.losses) == len(test.smoothed) <= 40
    assert test.lrs[0] == pytest.approx(1e-5) and test.lrs == sorted(test.lrs)
    assert 1e-5 <= test.suggestion <= 1.0 and test.suggestion in test.lrs
    for key, value in model.state_dict().items():  # weights and BatchNorm statistics
        assert torch.equal(value, before[key]), key
    assert torch.equal(torch.get_rng_state(), rng)


def test_range_test_stops_when_the_loss_diverges():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 2))
    test = range_test(model, _blobs(), TrainConfig(optimizer="sgd", momentum=0.0),
                      device=torch.device("cpu"), start_lr=1e-3, end_lr=1e6, num_batches=200)
    assert test.diverged and len(test.lrs) < 200
    assert test.smoothed[-1] > 4 * min(test.smoothed) or not math.isfinite(test.losses[-1])
    assert test.suggestion < test.lrs[-1]


# --------------------------------------------------------------------------- cnnflow lr-find


def test_lr_find_logs_a_run_with_its_figure_and_a_suggestion_in_range(tracking, image_folder,
                                                                      tmp_path):
    data = image_folder({"a": 10, "b": 10, "c": 10})
    # With MixUp on, as `--recipe small-data` trains: the sweep mixes its batches too.
    result = invoke("lr-find", "--data", str(data), "--experiment", "lrf", "--num-batches",
                    "30", "--start-lr", "1e-6", "--end-lr", "5", "--mixup", "0.2", *TINY)
    assert result.exit_code == 0, result.output
    (run,) = runs_of(tracking, "lrf", "lr-find")
    assert run.info.run_name == "lr-find-v1" and run.info.status == "FINISHED"
    suggested = run.data.metrics["suggested_lr"]
    assert 1e-6 <= suggested <= 5
    assert f"suggested lr {suggested:.3g}" in result.output
    assert f"next: cnnflow train --lr {suggested:.3g}" in result.output
    assert run.data.params["start_lr"] == "1e-06" and run.data.params["model"] == "custom_cnn"
    assert run.data.params["mixup"] == "0.2"
    files = {Path(f.path).name for f in tracking.list_artifacts(run.info.run_id, "lr_find")}
    assert files == {"lr_find.png", "lr_find.csv"}
    png = tracking.download_artifacts(run.info.run_id, "lr_find/lr_find.png", str(tmp_path))
    assert Path(png).read_bytes()[:4] == b"\x89PNG"
    with open(tracking.download_artifacts(run.info.run_id, "lr_find/lr_find.csv",
                                          str(tmp_path))) as fh:
        rows = list(csv.DictReader(fh))
    assert 2 <= len(rows) <= 30
    assert any(float(r["lr"]) == pytest.approx(suggested) for r in rows)
    curve = history(tracking, run.info.run_id, "lr_find_smoothed_loss")
    assert [float(r["smoothed_loss"]) for r in rows] == pytest.approx([v for _, v in curve])


@pytest.mark.parametrize("args, words", [
    (["--start-lr", "1", "--end-lr", "0.5"], "start_lr=1 must be below end_lr=0.5"),
    (["--num-batches", "3"], "num_batches=3 is below 10"),
    (["--optimizer", "lion"], "unknown optimizer 'lion'"),
])
def test_lr_find_bad_input_is_one_line_before_any_run(tracking, args, words):
    result = invoke("lr-find", "--experiment", "lrf-bad", *args)
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(lines) == 1 and words in lines[0], result.output
    assert tracking.get_experiment_by_name("lrf-bad") is None


# --------------------------------------------------------------------------- train --lr auto


def test_lr_must_be_a_positive_number_or_auto(tracking):
    assert TrainParams(lr="auto").lr_value() is None
    assert TrainParams(lr="0.01").engine_config().lr == 0.01
    for bad, why in (("fast", "is not a number"), ("0", "is not above 0"),
                     ("-1e-3", "is not above 0"), ("nan", "is not a finite number")):
        with pytest.raises(ParamError, match=f"lr='?{bad}'? {why}: lr must be > 0 or auto"):
            TrainParams(lr=bad).validate()
    with pytest.raises(ParamError, match="tune samples lr"):
        TuneParams(lr="auto").validate()
    result = invoke("train", "--lr", "fast", "--experiment", "lrf-bad")
    assert result.exit_code == 1 and "lr='fast' is not a number: lr must be > 0 or auto" \
        in result.output


class _StopAfterFirstEpoch(Exception):
    run_status = "KILLED"


class _Stop:
    """A callback that ends the run after epoch 1, as a crash would, leaving it resumable."""

    def on_train_start(self, config, start_epoch): ...

    def on_batch_end(self, epoch, batch, batches, images): ...

    def on_checkpoint(self, epoch, last_path, best_path): ...

    def on_epoch_end(self, epoch, metrics):
        raise _StopAfterFirstEpoch("stopped by the test")

    def on_train_end(self, result): ...


def test_train_lr_auto_logs_and_trains_with_the_chosen_lr_and_resume_reuses_it(
        tracking, mlflow_server, image_folder):
    from components.steps.train import train

    data = image_folder({"a": 10, "b": 10, "c": 10})
    params = TrainParams(data=str(data), experiment="lrf-auto", lr="auto", epochs=2,
                         patience=0, image_size=16, batch_size=8, num_workers=0,
                         weights="none", augmentation="none")
    lines: list[str] = []
    with pytest.raises(_StopAfterFirstEpoch):
        train(params, mlflow_server, progress=False, log=lines.append, callbacks=[_Stop()])
    (run,) = runs_of(tracking, "lrf-auto")
    run_id = run.info.run_id
    assert run.data.params["lr"] == "auto"
    chosen = float(run.data.params["lr_chosen"])
    assert 1e-7 <= chosen <= 10
    assert sum("range test over" in line for line in lines) == 1
    files = {Path(f.path).name for f in tracking.list_artifacts(run_id, "lr_find")}
    assert files == {"lr_find.png", "lr_find.csv"}
    assert history(tracking, run_id, "lr") == [(1, pytest.approx(chosen))]

    lines.clear()
    outcome = train(TrainParams(resume=run_id, num_workers=0), mlflow_server, progress=False,
                    log=lines.append)
    assert outcome.run_id == run_id
    assert not any("range test over" in line for line in lines), lines  # no second sweep
    assert any("chosen by the range test when the run started" in line for line in lines)
    assert [v for _, v in history(tracking, run_id, "lr")] == pytest.approx([chosen, chosen])
    assert tracking.get_run(run_id).info.status == "FINISHED"
