"""Live progress inside an epoch and system metrics: heartbeat -> mirror `status` -> died.

Against the session's real MLflow server and real Mongo-wire server. An epoch is held open
by a test callback (a pause at one batch, or a tiny sleep per batch), never by a hook in the
product code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from uuid import uuid4

import pytest
from helpers import BIN, subprocess_env
from mlflow import MlflowClient
from pymongo import MongoClient

from components.mirror.sync import STATUS, SyncOptions, sync_once
from components.names import PROGRESS_METRICS
from components.tracking.heartbeat import this_node

APP = str(Path(__file__).resolve().parents[1] / "components/mirror/dashboard/app.py")
SYSTEM_CPU = "system/cpu_utilization_percentage"  # MLflow's CPUMonitor, "system/" prefix


def mongo_db(uri: str):
    return MongoClient(uri, serverSelectionTimeoutMS=5000, tz_aware=True)[uri.rsplit("/", 1)[1]]


@pytest.fixture
def db_uri(mongo_server: str) -> str:
    return f"{mongo_server}/heartbeat_{uuid4().hex[:8]}"


def live_bars(monkeypatch: pytest.MonkeyPatch, uri: str) -> list[str]:
    """The texts of the dashboard's live-view progress bars, rendered against `uri`."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("MONGO_URI", uri)
    at = AppTest.from_file(APP, default_timeout=60)
    at.run(timeout=60)
    at.radio(key="view").set_value("Live monitoring").run(timeout=60)
    assert not at.exception, [e.value for e in at.exception]
    return [bar.proto.text for bar in at.get("progress")]


def test_progress_shows_inside_the_first_epoch_and_the_run_never_reads_died(
        mlflow_server, db_uri, image_folder, monkeypatch):
    """Training pauses at batch 3 of epoch 1 for twice `--dead-after`: the follower shows
    the heartbeat's progress (no epoch finished yet) and `in_progress` all along, and the
    dashboard's live view draws it; the run ends with system metrics, none logged after
    it ended."""
    from components.nn.engine import Callback
    from components.steps.params import TrainParams
    from components.steps.train import train

    exp = f"heartbeat-{uuid4().hex[:8]}"
    dead_after = 4.0  # room for a loaded machine: beats come every 0.3 s
    follower = subprocess.Popen(
        [str(BIN / "cnnflow"), "sync", "--follow", "--experiments", exp, "--interval", "0.3",
         "--dead-after", str(dead_after)],
        env=subprocess_env(mlflow_server, MONGO_URI=db_uri), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    db = mongo_db(db_uri)
    seen: list[dict] = []  # status documents read while epoch 1 was held open
    bars: list[str] = []  # the dashboard's live view then

    class HoldEpochOne(Callback):
        def on_batch_end(self, epoch: int, batch: int, batches: int, images: int) -> None:
            if (epoch, batch) != (1, 3):
                return
            began = time.monotonic()
            while time.monotonic() - began < 90:
                doc = db[STATUS].find_one({})
                if doc:
                    seen.append(doc)
                shown = [d for d in seen if d.get("progress", {}).get("batch") == 3]
                if shown and time.monotonic() - began > 2 * dead_after:
                    bars.extend(live_bars(monkeypatch, db_uri))
                    return
                time.sleep(0.2)

    try:
        data = image_folder({"red": 12, "green": 12, "blue": 12})
        params = TrainParams(data=str(data), experiment=exp, epochs=2, image_size=16,
                             batch_size=2, num_workers=0, weights="none", patience=0,
                             heartbeat=0.3, system_metrics=0.5)
        outcome = train(params, mlflow_server, progress=False, log=lambda s: None,
                        callbacks=[HoldEpochOne()])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
                db[STATUS].find_one({"_id": outcome.run_id}) or {}).get("status") != "completed":
            time.sleep(0.2)
    finally:
        follower.terminate()
        _, err = follower.communicate(timeout=30)
    assert follower.returncode == 0, err[-2000:]

    shown = [d for d in seen if d.get("progress", {}).get("batch") == 3]
    assert shown, f"no heartbeat progress in the mirror while epoch 1 ran: {seen[-1:]}"
    assert {d["status"] for d in seen} == {"in_progress"}, [
        (d["status"], d.get("last_heartbeat"), d["updated_at"]) for d in seen]
    client = MlflowClient(mlflow_server)
    run = client.get_run(outcome.run_id)
    progress = shown[-1]["progress"]
    assert "current_epoch" not in shown[-1]  # no epoch had ended: the heartbeat alone shows it
    assert progress["epoch"] == 1 and progress["epochs"] == 2
    assert progress["batches"] == -(-int(run.data.params["n_train"]) // 2)  # batch_size 2
    assert progress["fraction"] == pytest.approx(3 / progress["batches"])
    assert progress["images_per_sec"] > 0
    assert progress["at"] >= shown[-1]["start_time"]
    assert f"epoch 1/2 · batch 3/{progress['batches']} · " in " | ".join(bars), bars
    assert db[STATUS].find_one({"_id": outcome.run_id})["status"] == "completed"

    assert SYSTEM_CPU in run.data.metrics
    for key in (SYSTEM_CPU, *PROGRESS_METRICS):
        stamps = [m.timestamp for m in client.get_metric_history(outcome.run_id, key)]
        assert stamps and max(stamps) <= run.info.end_time, key  # nothing after the end


SLOW_TRAINING = textwrap.dedent("""
    import sys, time
    from components.nn.engine import Callback
    from components.steps.params import TrainParams
    from components.steps.train import train

    class TinySleep(Callback):  # a slow epoch, the test's own doing
        def on_batch_end(self, epoch, batch, batches, images):
            time.sleep(0.05)

    data, exp, uri = sys.argv[1:4]
    train(TrainParams(data=data, experiment=exp, epochs=1000, image_size=16, batch_size=2,
                      num_workers=0, weights="none", patience=0, heartbeat=0.3,
                      system_metrics=0),
          uri, progress=False, callbacks=[TinySleep()])
""")


def test_a_killed_run_reads_died_within_dead_after_and_one_poll(
        mlflow_server, db_uri, image_folder, tmp_path):
    """SIGKILL leaves the run RUNNING in MLflow: it stays `in_progress` while its last beat
    is younger than --dead-after, and the first poll after that reads `died`."""
    exp = f"heartbeat-{uuid4().hex[:8]}"
    data = image_folder({"red": 8, "green": 8})
    script = tmp_path / "slow_training.py"
    script.write_text(SLOW_TRAINING)
    proc = subprocess.Popen([sys.executable, str(script), str(data), exp, mlflow_server],
                            env=subprocess_env(mlflow_server), cwd=os.getcwd(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    dead_after, poll = 3.0, 0.5
    options = SyncOptions(experiments=[exp], dead_after=dead_after)
    db = mongo_db(db_uri)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            sync_once(mlflow_server, db_uri, options)
            doc = db[STATUS].find_one({})
            if doc and doc.get("progress", {}).get("batch", 0) >= 1:
                break
            time.sleep(poll)
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert doc["status"] == "in_progress" and doc["progress"]["batches"] >= 1
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    killed = time.time()

    passes: list[tuple[float, str]] = []  # (seconds after the kill, status) of each poll
    while not passes or passes[-1][1] != "died":
        began = time.time() - killed
        assert began < dead_after + 30, passes
        sync_once(mlflow_server, db_uri, options)
        passes.append((began, db[STATUS].find_one({})["status"]))
        time.sleep(poll)
    assert all(status == "in_progress" for at, status in passes if at < dead_after - 1.5), passes
    # Died at the first poll that began after --dead-after: one poll's delay at most.
    assert all(at < dead_after for at, _ in passes[:-1]), passes
    one_poll = max(b[0] - a[0] for a, b in zip(passes, passes[1:], strict=False))
    assert passes[-1][0] <= dead_after + one_poll, passes


def test_system_metrics_carry_a_node_id_only_across_machines(monkeypatch):
    """One machine: the plain `system/...` keys; several: one node id per machine."""
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert this_node() is None
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert this_node() is None  # torchrun on one machine
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("GROUP_RANK", "1")
    assert this_node().endswith("-node1")
