"""`cnnflow train --nnodes 2`: two "machines" on 127.0.0.1 (two launches, one process each,
torchrun's c10d rendezvous) against a real MLflow server; and what fails before training."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import BIN, free_port, history, runs_of, subprocess_env
from test_distributed import _single_process_eval

from pipelines.cli import cli

FAST = ["--image-size", "16", "--batch-size", "4", "--num-workers", "0", "--weights", "none",
        "--augmentation", "none", "--model", "custom_cnn", "--device", "cpu"]
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env(tracking_uri: str) -> dict[str, str]:
    env = subprocess_env(tracking_uri)
    for name in TORCHRUN_ENV:
        env.pop(name, None)
    return env


def _nodes(tracking_uri: str, datas: list[Path], experiment: str, *extra: str,
           timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """`cnnflow train --nnodes 2` started twice at once, node i reading datas[i]."""
    endpoint = f"127.0.0.1:{free_port()}"
    procs = [subprocess.Popen(
        [str(BIN / "cnnflow"), "train", "--data", str(data), "--experiment", experiment,
         "--nnodes", "2", "--node-rank", str(rank), "--rdzv-endpoint", endpoint,
         "--rdzv-timeout", "240", "--nproc", "1", *FAST, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tracking_uri))
        for rank, data in enumerate(datas)]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def _errors(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines()
            if line.startswith("Error:")]


def test_two_nodes_log_one_run_with_full_val_metrics(tracking, image_folder, tmp_path):
    from components.data.datasets import load_splits

    # 3 x 11 images: 7 val images, uneven over two ranks. Node 1 reads its own copy in
    # another place: the split travels through the process group, not a shared disk.
    data = image_folder({"red": 11, "green": 11, "blue": 11})
    copy = shutil.copytree(data, tmp_path / "elsewhere" / "copy")
    node0, node1 = _nodes(tracking.tracking_uri, [data, copy], "two-nodes",
                          "--epochs", "2", "--patience", "0")
    assert node0.returncode == 0, node0.stderr[-3000:]
    assert node1.returncode == 0, node1.stderr[-3000:]
    (run,) = runs_of(tracking, "two-nodes")  # one run, opened by global rank 0 alone
    run_id, params = run.info.run_id, run.data.params
    assert run.info.status == "FINISHED"
    assert (params["nnodes"], params["nproc"]) == ("2", "1")
    assert not {"node_rank", "rdzv_endpoint", "rdzv_timeout"} & set(params)  # per node
    assert (node0.stdout + node1.stdout).count("best_val_acc") == 1  # one summary line
    for name in ("train_loss", "val_loss", "val_acc"):
        assert [s for s, _ in history(tracking, run_id, name)] == [1, 2], name  # not twice
    # Both nodes trained the split a one-process scan of either copy makes.
    assert run.data.tags["cnnflow.dataset_digest"] == load_splits(
        data, val_ratio=0.2, test_ratio=0.2, seed=42).digest()

    # The logged val metrics were reduced over both nodes' shards: the checkpointed weights,
    # evaluated here in one process over the whole val split, give the same numbers.
    last = tracking.download_artifacts(run_id, "checkpoints/last.pt", str(tmp_path))
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["epoch"] == 2
    val_loss, val_acc = _single_process_eval(data, state["model"])
    assert history(tracking, run_id, "val_loss")[-1][1] == pytest.approx(val_loss, rel=1e-5)
    assert history(tracking, run_id, "val_acc")[-1][1] == pytest.approx(val_acc, abs=1e-9)
    assert round(val_acc * 7) == pytest.approx(val_acc * 7, abs=1e-6)  # over all 7 images


def test_a_node_without_a_file_of_the_split_fails_every_node_in_one_line(tracking,
                                                                         image_folder,
                                                                         tmp_path):
    data = image_folder({"red": 6, "green": 6})
    copy = shutil.copytree(data, tmp_path / "elsewhere" / "copy")
    gone = sorted((copy / "green").iterdir())[2]
    gone.unlink()
    rel = gone.relative_to(copy).as_posix()
    started = time.monotonic()
    nodes = _nodes(tracking.tracking_uri, [data, copy], "two-nodes-bad", "--epochs", "1")
    assert time.monotonic() - started < 300
    lines = []
    for node in nodes:
        assert node.returncode == 1, node.stderr[-3000:]
        (line,) = _errors(node)  # each machine's console: one line, no traceback
        assert "Traceback" not in node.stderr, node.stderr[-3000:]
        lines.append(line)
    # Whichever node the rendezvous made rank 0, the other one names the file and itself.
    assert lines[0] == lines[1] and rel in lines[0] and "rank 1" in lines[0], lines
    assert "same data folder" in lines[0]
    assert runs_of(tracking, "two-nodes-bad") == []  # failed before any run existed


def test_a_rendezvous_nobody_answers_fails_in_bounded_time_with_one_line(tracking,
                                                                         image_folder):
    data = image_folder({"a": 4, "b": 4})
    with socket.socket() as closed:  # a port that was free a moment ago: nobody listens
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    started = time.monotonic()
    proc = subprocess.run(
        [str(BIN / "cnnflow"), "train", "--data", str(data), "--experiment", "no-rdzv",
         "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", f"127.0.0.1:{port}",
         "--rdzv-timeout", "3", *FAST],
        capture_output=True, text=True, env=_env(tracking.tracking_uri), timeout=240)
    waited = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).strip().splitlines() == [
        f"Error: cannot reach the rendezvous at 127.0.0.1:{port} within 3 s: start node 0 "
        "(--node-rank 0) first, check the host, the port and the firewall"]
    assert waited < 120, waited  # 3 s of waiting plus the start-up of one command
    assert runs_of(tracking, "no-rdzv") == []


@pytest.mark.parametrize("args, message", [
    (["--nnodes", "2"], "nnodes=2 needs --rdzv-endpoint HOST:PORT"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "127.0.0.1:29400"],
     "node_rank=2 but nnodes=2"),
    (["--nnodes", "2", "--rdzv-endpoint", "127.0.0.1"], "is not HOST:PORT"),
    (["--nnodes", "2", "--rdzv-endpoint", "node0:99999"], "is not HOST:PORT"),
    (["--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29400", "--cv", "2"],
     "nnodes > 1 trains a new run"),
])
def test_bad_node_settings_are_one_line_and_start_nothing(tracking, image_folder, args,
                                                          message):
    data = image_folder({"a": 4, "b": 4})
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--experiment",
                                      "bad-nodes", *FAST, *args])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert runs_of(tracking, "bad-nodes") == []
