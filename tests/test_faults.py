"""Faults a user meets, reproduced for real: the MLflow server lost mid-training (back within
the bound, or not), a run killed before its first checkpoint, temp folders after loads and
after kills."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from helpers import BIN, free_port, history, make_image_folder, runs_of, subprocess_env
from mlflow import MlflowClient

from components import services

FAST = ["--model", "lenet5", "--image-size", "16", "--num-workers", "0", "--weights", "none",
        "--augmentation", "none", "--patience", "0"]
DAY = 24 * 3600


class Server:
    """A dedicated MLflow server that a test can stop and start again on the same port and
    store (the backend store and artifacts stay in `home`)."""

    def __init__(self, home: Path) -> None:
        self.home, self.port = home, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with pytest.MonkeyPatch.context() as mp:  # an env var here would make up() skip it
            mp.delenv("MLFLOW_TRACKING_URI", raising=False)
            [started] = services.up(names=["mlflow"], mlflow_port=self.port, home=self.home,
                                    timeout=120)
        assert started.state == "running", started

    def stop(self) -> None:
        services.down(["mlflow"], home=self.home)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = Server(tmp_path_factory.mktemp("lost-mlflow"))
    srv.start()
    yield srv
    srv.stop()


class Training:
    """`cnnflow train` as a subprocess, its stderr read on a thread with arrival times."""

    def __init__(self, uri: str, *args: str, **env: str) -> None:
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen([str(BIN / "cnnflow"), "train", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=subprocess_env(uri, **env))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join(10)
        return code

    @property
    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def matching(self, text: str) -> list[str]:
        return [line for _, line in self.lines if text in line]

    def first_time(self, text: str) -> float:
        return next(t for t, line in self.lines if text in line)


def _wait_for(what, timeout: float, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _run_with_epoch_one(client: MlflowClient, experiment: str):
    """The training run, once its first epoch's metrics are on the server."""
    def check():
        runs = runs_of(client, experiment)
        if runs and history(client, runs[0].info.run_id, "val_loss"):
            return runs[0]
        return None
    return _wait_for(check, 90)


def _leftovers(temp: Path) -> set[Path]:
    """cnnflow's folders and MLflow's own (mkdtemp's `tmp*`) in a temp dir; torch's caches
    (torchinductor_<user>) are meant to stay."""
    return {p for p in temp.iterdir() if p.name.startswith(("cnnflow-", "tmp"))}


def _steps(client: MlflowClient, run_id: str) -> list[int]:
    return [s for s, _ in history(client, run_id, "val_loss")]


def _lost_server_data(tmp_path: Path) -> Path:
    """Seconds an epoch (batch 4), so the server is gone for a few epochs."""
    return make_image_folder(tmp_path / "lost", {"red": 40, "green": 40, "blue": 40})


def _wait_for_line(job: Training, text: str, timeout: float = 120) -> None:
    _wait_for(lambda: job.matching(text) or job.proc.poll() is not None, timeout)
    assert job.matching(text), job.output


def test_server_back_within_the_bound_loses_nothing(server: Server, tmp_path: Path):
    client = MlflowClient(server.uri)
    epochs = 10
    job = Training(server.uri, "--data", str(_lost_server_data(tmp_path)), "--experiment",
                   "lost-back", "--epochs", str(epochs), "--batch-size", "4",
                   "--log-timeout", "120", *FAST)
    run = _run_with_epoch_one(client, "lost-back")
    server.stop()
    _wait_for_line(job, "is not answering")  # an epoch ended while nobody answered
    server.start()
    assert job.wait(timeout=120) == 0, job.output
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED", job.output
    for name in ("val_loss", "train_loss", "lr", "epoch_time_sec"):
        assert [s for s, _ in history(client, run.info.run_id, name)] == \
            list(range(1, epochs + 1)), name
    lost, back = job.matching("is not answering"), job.matching("is answering again")
    assert len(lost) == 1 and len(back) == 1, job.output
    assert job.first_time("is not answering") < job.first_time("is answering again")
    ckpts = {f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert "checkpoints/last.pt" in ckpts
    print("\n".join([*lost, *back]))


def test_server_not_back_exits_within_the_bound_and_resumes(server: Server, tmp_path: Path):
    client = MlflowClient(server.uri)
    epochs, bound = 6, 8
    data = _lost_server_data(tmp_path)
    home = tmp_path / "home"  # where the kept checkpoint goes, as `cnnflow up` state would
    job = Training(server.uri, "--data", str(data), "--experiment", "lost-gone",
                   "--epochs", str(epochs), "--batch-size", "4", "--log-timeout", str(bound),
                   *FAST, CNNFLOW_HOME=str(home))
    run_id = _run_with_epoch_one(client, "lost-gone").info.run_id
    server.stop()
    try:
        assert job.wait(timeout=120) == 1, job.output
        last_epoch = job.first_time(f"epoch {epochs}/{epochs}")
        assert job.lines[-1][0] - last_epoch < bound + 10, job.output  # the bound, plus a margin
        errors = job.matching("Error:")
        assert len(errors) == 1, job.output
        assert f"cnnflow train --resume {run_id}" in errors[0]
        first_missing = int(re.search(rf"epochs (\d+)\.\.{epochs} ", errors[0]).group(1))
        assert len(job.matching("is not answering")) == 1, job.output
        print(errors[0])
    finally:
        server.start()
    assert client.get_run(run_id).info.status == "RUNNING"  # not FAILED: resumable
    assert _steps(client, run_id) == list(range(1, first_missing))  # what the line said

    resumed = subprocess.run(
        [str(BIN / "cnnflow"), "train", "--resume", run_id, "--num-workers", "0"],
        capture_output=True, text=True, timeout=180,
        env=subprocess_env(server.uri, CNNFLOW_HOME=str(home)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert _steps(client, run_id) == list(range(1, epochs + 1))
    assert f"after epoch {epochs}" in resumed.stderr  # the kept checkpoint: nothing retrained
    assert not (home / "checkpoints" / run_id).exists()


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_at_epoch_1(
        mlflow_server: str, tracking: MlflowClient, tmp_path: Path):
    data = make_image_folder(tmp_path / "slow", {"red": 100, "green": 100, "blue": 100})
    temp = tmp_path / "temp"
    temp.mkdir()
    job = Training(mlflow_server, "--data", str(data), "--experiment", "killed-early",
                   "--epochs", "2", "--batch-size", "4", *FAST, TMPDIR=str(temp))

    def started():
        runs = runs_of(tracking, "killed-early")
        return runs[0] if runs and "model" in runs[0].data.params else None

    run = _wait_for(started, 90, every=0.05)
    job.proc.send_signal(signal.SIGKILL)
    job.wait(timeout=30)
    assert tracking.list_artifacts(run.info.run_id, "checkpoints") == [], \
        "epoch 1 ended before the kill: make it slower"
    left = sorted(p.name.split("-")[1] for p in temp.glob("cnnflow-*"))
    assert left == ["ckpt", "train"], left  # what a kill leaves behind

    # Aged a day, the killed run's folders go at the next start; a fresh one stays.
    for path in temp.glob("cnnflow-*"):
        os.utime(path, (time.time() - 2 * DAY, time.time() - 2 * DAY))
        for inner in path.rglob("*"):
            os.utime(inner, (time.time() - 2 * DAY, time.time() - 2 * DAY))
    fresh = temp / "cnnflow-train-999999-fresh"
    fresh.mkdir()

    resumed = subprocess.run(
        [str(BIN / "cnnflow"), "train", "--resume", run.info.run_id, "--num-workers", "0"],
        capture_output=True, text=True, timeout=300,
        env=subprocess_env(mlflow_server, TMPDIR=str(temp)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from epoch 1" in resumed.stderr
    after = tracking.get_run(run.info.run_id)
    assert after.info.status == "FINISHED"
    assert after.info.run_name == run.info.run_name == "lenet5-v1"
    assert after.data.tags["cnnflow.version"] == "1"
    assert _steps(tracking, run.info.run_id) == [1, 2]
    assert len(runs_of(tracking, "killed-early")) == 1
    assert _leftovers(temp) == {fresh}  # the stale ones went; the resumed run left nothing


def test_loading_a_model_leaves_no_copy_in_the_temp_dir(trained_pair, pair_client,
                                                        tmp_path: Path, monkeypatch):
    from components.serving.predict import load_model

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    run = pair_client.get_run(trained_pair.runs["lenet5"])
    model = load_model(run.data.tags["cnnflow.model_uri"])
    assert model.class_names and _leftovers(temp) == set()

    # A whole evaluate (it loads the model, scores, logs figures) leaves nothing either.
    done = subprocess.run(
        [str(BIN / "cnnflow"), "evaluate", "--run-id", run.info.run_id, "--cost", "false",
         "--register", "false", "--num-workers", "0"],
        capture_output=True, text=True, timeout=300,
        env=subprocess_env(trained_pair.uri, TMPDIR=str(temp)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert _leftovers(temp) == set()


def test_stale_temp_folders_go_fresh_and_live_ones_stay(tmp_path: Path, monkeypatch):
    from components.files import remove_stale_temp

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    old = time.time() - 2 * DAY
    made = {}
    for name in ("cnnflow-train-999999-a", f"cnnflow-train-{os.getpid()}-b", "cnnflow-eval-c",
                 "cnnflow-ckpt-999999-d", "other-e"):
        made[name] = tmp_path / name
        (made[name] / "ckpt").mkdir(parents=True)
        os.utime(made[name] / "ckpt", (old, old))
        os.utime(made[name], (old, old))
    os.utime(made["cnnflow-ckpt-999999-d"] / "ckpt", None)  # rewritten just now: a live run
    removed = remove_stale_temp()
    assert {p.name for p in removed} == {"cnnflow-train-999999-a", "cnnflow-eval-c"}
    assert {p.name for p in tmp_path.iterdir()} == {
        f"cnnflow-train-{os.getpid()}-b", "cnnflow-ckpt-999999-d", "other-e"}


# --------------------------------------------------------------------------- the callback alone


class FlakyServer:
    """An MlflowClient stand-in that can stop answering, or drop the answer to a write it made."""

    tracking_uri = "http://127.0.0.1:1"

    def __init__(self) -> None:
        self.down, self.lose_next_answer = False, False
        self.metrics: list[tuple[str, int]] = []
        self.uploads: list[tuple[str, str]] = []

    def _answer(self) -> None:
        from mlflow.exceptions import MlflowException

        if self.down:
            raise MlflowException("API request to http://127.0.0.1:1 failed with exception "
                                  "Connection refused")

    def log_artifact(self, run_id: str, path: str, artifact_path: str) -> None:
        self._answer()
        self.uploads.append((Path(path).name, Path(path).read_text()))

    def log_batch(self, run_id: str, metrics) -> None:
        self._answer()
        self.metrics += [(m.key, m.step) for m in metrics]
        if self.lose_next_answer:
            self.lose_next_answer = False
            raise ConnectionError("Connection reset by peer")

    def get_metric_history(self, run_id: str, key: str):
        from types import SimpleNamespace

        self._answer()
        return [SimpleNamespace(step=step) for name, step in self.metrics if name == key]


def _epochs(callback, tmp_path: Path, epochs: range, improved: set[int]) -> None:
    for epoch in epochs:
        last, best = tmp_path / "last.pt", tmp_path / "best.pt"
        last.write_text(f"last {epoch}")
        if epoch in improved:
            best.write_text(f"best {epoch}")
        callback.on_checkpoint(epoch, last, best if epoch in improved else None)
        callback.on_epoch_end(epoch, {"val_loss": 1.0 / epoch, "val_acc": 0.5})


def test_callback_keeps_the_backlog_in_order_and_says_so_twice(tmp_path: Path, monkeypatch):
    from components.tracking import callback as module

    monkeypatch.setattr(module, "RETRY_EVERY", 0.05)
    server, lines = FlakyServer(), []
    callback = module.MLflowCallback(server, "run", log=lines.append)
    _epochs(callback, tmp_path, range(1, 2), {1})
    _wait_for(lambda: ("val_loss", 1) in server.metrics, 10, every=0.02)
    server.down = True
    _epochs(callback, tmp_path, range(2, 6), {3, 4})
    _wait_for(lambda: lines, 10, every=0.02)
    server.down, server.lose_next_answer = False, True
    assert callback.flush(timeout=10) == []
    assert [s for k, s in server.metrics if k == "val_loss"] == [1, 2, 3, 4, 5]  # none twice
    # Epoch 2 sends its own checkpoint; epoch 3 carries the newest last.pt and best.pt, in
    # place of one per epoch: a checkpoint is never behind the metrics logged.
    assert server.uploads == [("last.pt", "last 1"), ("best.pt", "best 1"),
                              ("last.pt", "last 2"), ("last.pt", "last 5"),
                              ("best.pt", "best 4")]
    assert len(lines) == 2 and "not answering" in lines[0] and "again" in lines[1], lines
    assert not callback.snapshots.exists()


def test_callback_gives_up_at_the_bound_and_raises_a_refused_write(tmp_path: Path,
                                                                   monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    from components.tracking import callback as module

    monkeypatch.setattr(module, "RETRY_EVERY", 0.05)
    server = FlakyServer()
    server.down = True
    callback = module.MLflowCallback(server, "run", log=lambda s: None)
    _epochs(callback, tmp_path, range(1, 4), {1})
    started = time.monotonic()
    assert callback.flush(timeout=0.5) == [1, 2, 3]
    assert time.monotonic() - started < 2

    def refuse(*args, **kwargs) -> None:
        raise MlflowException("bad artifact path", error_code=INVALID_PARAMETER_VALUE)

    refused = FlakyServer()
    refused.log_artifact = refuse  # type: ignore[method-assign]
    callback = module.MLflowCallback(refused, "run", log=lambda s: None)
    _epochs(callback, tmp_path, range(1, 2), {1})
    with pytest.raises(MlflowException, match="bad artifact path"):
        callback.flush(timeout=10)
