"""`cnnflow train --nproc N`: DistributedDataParallel on CPU (gloo) against a real MLflow server."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import BIN, free_port, history, runs_of, subprocess_env
from torch import nn

from pipelines.cli import cli

FAST = ["--image-size", "16", "--batch-size", "4", "--num-workers", "0", "--weights", "none",
        "--augmentation", "none", "--model", "custom_cnn"]


def _env(tracking_uri: str) -> dict[str, str]:
    env = subprocess_env(tracking_uri)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _single_process_eval(data: Path, state: dict[str, torch.Tensor], rank: int = 0,
                         world_size: int = 1) -> tuple[float, float]:
    """val_loss / val_acc of `state` over the whole val split (this rank's shard, reduced)."""
    from components.data.datasets import load_splits, make_loaders
    from components.nn.engine import evaluate
    from components.nn.models import create_model, model_normalization

    splits = load_splits(data, val_ratio=0.2, test_ratio=0.2, seed=42)
    model, _ = create_model("custom_cnn", len(splits.classes), weights="none", dropout=0.5,
                            image_size=16)
    model.load_state_dict(state)
    mean, std = model_normalization("custom_cnn")
    loaders = make_loaders(splits, 16, 4, augmentation="none", mean=mean, std=std,
                           num_workers=0, seed=42, rank=rank, world_size=world_size)
    return evaluate(model, loaders["val"], nn.CrossEntropyLoss(), torch.device("cpu"))


def _eval_worker(rank: int, world_size: int, port: int, data: Path, state_file: Path,
                 out: Path) -> None:
    import torch.distributed as dist

    from components.nn.distributed import destroy_process_group

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        state = torch.load(state_file, weights_only=True)
        loss, acc = _single_process_eval(data, state, rank, world_size)
        (out / f"rank{rank}.txt").write_text(f"{loss!r} {acc!r}")
    except BaseException:
        destroy_process_group()
        raise
    destroy_process_group(wait_for_all=True)
    # The numbers are written and the group is gone: leave without interpreter finalisation,
    # where gloo's leftover C++ threads have aborted a finished worker (SIGABRT, once in a
    # full run); this test is about the reduced metrics, not about teardown.
    os._exit(0)


def test_evaluate_in_two_processes_equals_one_process_with_the_same_weights(image_folder,
                                                                             tmp_path):
    from components.nn.models import create_model

    data = image_folder({"red": 11, "green": 11, "blue": 11})  # 7 val images: uneven shards
    torch.manual_seed(0)
    model, _ = create_model("custom_cnn", 3, weights="none", dropout=0.5, image_size=16)
    torch.save(model.state_dict(), tmp_path / "state.pt")
    expected = _single_process_eval(data, model.state_dict())
    torch.multiprocessing.spawn(_eval_worker, nprocs=2, join=True,
                                args=(2, free_port(), data, tmp_path / "state.pt", tmp_path))
    for rank in (0, 1):  # every rank gets the full-split numbers
        loss, acc = map(float, (tmp_path / f"rank{rank}.txt").read_text().split())
        assert loss == pytest.approx(expected[0], rel=1e-6)
        assert acc == pytest.approx(expected[1], abs=1e-12)


def test_two_cpu_processes_log_one_run_with_full_val_metrics(tracking, image_folder, tmp_path):
    # 3 x 11 images: the val split (7) does not divide by 2, so an unpadded shard matters.
    data = image_folder({"red": 11, "green": 11, "blue": 11})
    proc = subprocess.run(
        [str(BIN / "cnnflow"), "train", "--data", str(data), "--experiment", "ddp",
         "--epochs", "2", "--patience", "0", "--nproc", "2", *FAST],
        capture_output=True, text=True, env=_env(tracking.tracking_uri), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = runs_of(tracking, "ddp")  # only rank 0 opened a run
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.data.params["nproc"] == "2"
    assert proc.stdout.count("best_val_acc") == 1  # one summary line, from rank 0
    for name in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert [s for s, _ in history(tracking, run_id, name)] == [1, 2], name  # not twice
    ckpts = {f.path for f in tracking.list_artifacts(run_id, "checkpoints")}
    assert ckpts == {"checkpoints/last.pt", "checkpoints/best.pt"}

    # The logged val metrics were reduced over both ranks' shards: the same weights,
    # evaluated here in one process over the whole val split, give the same numbers.
    last = tracking.download_artifacts(run_id, "checkpoints/last.pt", str(tmp_path))
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["epoch"] == 2 and not any(k.startswith("module.") for k in state["model"])
    val_loss, val_acc = _single_process_eval(data, state["model"])
    assert history(tracking, run_id, "val_loss")[-1][1] == pytest.approx(val_loss, rel=1e-5)
    assert history(tracking, run_id, "val_acc")[-1][1] == pytest.approx(val_acc, abs=1e-9)
    # The acc is a ratio over the full split (7 images), not over one rank's 3 or 4.
    assert round(val_acc * 7) == pytest.approx(val_acc * 7, abs=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--nproc", "0"], "nproc must be >= 1"),
    (["--nproc", "2", "--device", "cuda"], "needs 2 GPUs"),
    (["--nproc", "2", "--device", "cuda:0"], "use --device cuda"),
    (["--nproc", "2", "--cv", "2"], "nproc > 1 trains a new run"),
])
def test_bad_nproc_is_one_line_and_starts_nothing(tracking, image_folder, args, message):
    if "cuda" in " ".join(args) and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    data = image_folder({"a": 4, "b": 4})
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--experiment", "bad-ddp",
                                      *FAST, *args])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert runs_of(tracking, "bad-ddp") == []


def test_train_called_with_nproc_but_no_workers_is_refused(tracking, image_folder):
    from components.steps.train import TrainingError, TrainParams, train

    params = TrainParams(data=str(image_folder({"a": 4, "b": 4})), nproc=2, weights="none")
    with pytest.raises(TrainingError, match="needs worker processes"):
        train(params, tracking.tracking_uri, progress=False, log=lambda s: None)
