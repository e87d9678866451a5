"""`cnnflow sync`: the Mongo mirror against a real MLflow server and a real secantusd-py."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path
from uuid import uuid4

import pytest
from click.testing import CliRunner
from helpers import BIN, free_port, subprocess_env
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from pymongo import MongoClient

from components import services
from components.mirror import sync as mirror
from components.mirror.sync import (
    EPOCHS,
    STATUS,
    SYNC,
    TRAININGS,
    SyncOptions,
    sync_once,
    sync_pass,
)
from pipelines.cli import cli

EPOCH_KEYS = ["train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_time_sec"]


@pytest.fixture
def db_uri(mongo_server: str) -> str:
    """A fresh database on the session's Mongo server, per test."""
    return f"{mongo_server}/mirror_{uuid4().hex[:8]}"


def mongo_db(uri: str):
    client = MongoClient(uri, serverSelectionTimeoutMS=5000, tz_aware=True)
    return client[uri.rsplit("/", 1)[1]]


def new_experiment(client: MlflowClient) -> str:
    name = f"mirror-{uuid4().hex[:8]}"
    client.create_experiment(name)
    return name


def log_epochs(client: MlflowClient, run_id: str, epochs: range, stamp: int | None = None):
    now = stamp or int(time.time() * 1000)
    metrics = [Metric(k, round(0.1 * e + i, 4), now, e) for e in epochs
               for i, k in enumerate(EPOCH_KEYS)]
    client.log_batch(run_id, metrics=metrics)


def make_run(client: MlflowClient, experiment: str, step: str, *, model: str = "custom_cnn",
             epochs: int = 0, status: str = "FINISHED", error: str = "",
             start_ms: int | None = None, extra_metrics: dict[str, float] | None = None) -> str:
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    run = client.create_run(exp_id, start_time=start_ms,
                            tags={"cnnflow.step": step, "cnnflow.model": model,
                                  "cnnflow.version": "1"})
    run_id = run.info.run_id
    params = [Param("epochs", "5"), Param("lr", "0.001"), Param("batch_size", "8"),
              Param("dropout", "0.5"), Param("freeze", "backbone"), Param("patience", "3"),
              Param("optimizer", "adam"), Param("num_classes", "3")] if step == "train" else []
    client.log_batch(run_id, params=params, tags=[RunTag("cnnflow.class_names", "a,b,c")])
    if epochs:
        log_epochs(client, run_id, range(1, epochs + 1), start_ms)
    if extra_metrics:
        client.log_batch(run_id, metrics=[Metric(k, v, start_ms or int(time.time() * 1000), 0)
                                          for k, v in extra_metrics.items()])
    if error:
        client.set_tag(run_id, "cnnflow.error", error)
    if status != "RUNNING":
        client.set_terminated(run_id, status)
    return run_id


def snapshot(db) -> dict[str, list[dict]]:
    """Every mirror document minus the write time, in a stable order."""
    out = {}
    for name in (TRAININGS, EPOCHS, STATUS):
        docs = [{k: v for k, v in d.items() if k not in ("updated_at",)}
                for d in db[name].find({}, sort=[("_id", 1)])]
        out[name] = docs
    return out


def test_a_parent_lives_while_its_children_train(mlflow_server, db_uri):
    """A study (or CV / bagging parent) logs nothing itself while its trials train: it reads
    `in_progress` while a child shows signs of life, and `died` once they all fall silent."""
    client = MlflowClient(mlflow_server)
    exp = new_experiment(client)
    old = int(time.time() * 1000) - 3_600_000
    busy = make_run(client, exp, "tune", model="", status="RUNNING", start_ms=old)
    trial = make_run(client, exp, "train", epochs=1, status="RUNNING")
    client.set_tag(trial, "mlflow.parentRunId", busy)
    lonely = make_run(client, exp, "tune", model="", status="RUNNING", start_ms=old)
    sync_once(mlflow_server, db_uri, SyncOptions(experiments=[exp], dead_after=60))
    db = mongo_db(db_uri)
    status = {d["_id"]: d["status"] for d in db[STATUS].find({})}
    assert status[busy] == status[trial] == "in_progress"
    assert status[lonely] == "died"


def test_mirror_matches_mlflow_for_each_kind_and_is_idempotent(mlflow_server, db_uri):
    client = MlflowClient(mlflow_server)
    exp = new_experiment(client)
    old = int(time.time() * 1000) - 3_600_000
    ids = {
        "train": make_run(client, exp, "train", epochs=3,
                          extra_metrics={"best_val_acc": 0.9, "epochs_run": 3}),
        "ensemble": make_run(client, exp, "ensemble", model="ensemble",
                             extra_metrics={"test_acc": 0.95, "test_loss": 0.2}),
        "failed": make_run(client, exp, "train", epochs=1, status="FAILED",
                           error="RuntimeError: loss became nan"),
        "killed": make_run(client, exp, "train", epochs=2, status="KILLED"),
        "silent": make_run(client, exp, "train", epochs=2, status="RUNNING", start_ms=old),
        "live": make_run(client, exp, "train", epochs=1, status="RUNNING"),
    }
    for bookkeeping in ("eda", "preprocess", "evaluate", "pipeline", "promote", "report"):
        make_run(client, exp, bookkeeping, model="")
    options = SyncOptions(experiments=[exp], dead_after=60)
    report = sync_once(mlflow_server, db_uri, options)
    assert report.changed == len(ids)
    db = mongo_db(db_uri)
    assert db[TRAININGS].count_documents({}) == len(ids)
    assert db[STATUS].count_documents({}) == len(ids)
    assert db[EPOCHS].count_documents({}) == 3 + 1 + 2 + 2 + 1

    expected_status = {"train": "completed", "ensemble": "completed",
                       "failed": "failed", "killed": "killed", "silent": "died",
                       "live": "in_progress"}
    for kind, run_id in ids.items():
        run = client.get_run(run_id)
        doc = db[TRAININGS].find_one({"_id": run_id})
        status = db[STATUS].find_one({"_id": run_id})
        assert doc["status"] == status["status"] == expected_status[kind], kind
        assert doc["step"] == run.data.tags["cnnflow.step"]
        assert doc["metrics"] == run.data.metrics
        assert doc["experiment"] == exp
        assert int(doc["start_time"].timestamp() * 1000) == run.info.start_time
        if run.info.end_time:
            assert int(doc["end_time"].timestamp() * 1000) == run.info.end_time
        else:
            assert "end_time" not in doc and "duration_sec" not in doc
        rows = list(db[EPOCHS].find({"run_id": run_id}, sort=[("epoch", 1)]))
        for key in EPOCH_KEYS:
            history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            assert [(r["epoch"], r[key]) for r in rows] == history, (kind, key)
        if rows:
            assert status["current_epoch"] == rows[-1]["epoch"]
    train = db[TRAININGS].find_one({"_id": ids["train"]})
    assert train["model_name"] == "custom_cnn" and train["max_epochs"] == 5
    assert train["learning_rate"] == 0.001 and train["batch_size"] == 8
    assert train["feature_extraction"] is True and train["early_stopping"] is True
    assert train["val_accuracy"] == 0.9 and train["epochs_run"] == 3
    assert train["class_names"] == ["a", "b", "c"]
    assert train["tags"]["cnnflow\uff0estep"] == "train"
    assert "test_accuracy" not in train  # not evaluated yet: absent, not invented
    ens = db[TRAININGS].find_one({"_id": ids["ensemble"]})
    assert ens["model_name"] == "ensemble" and ens["test_accuracy"] == 0.95
    assert "learning_rate" not in ens and "max_epochs" not in ens
    failed = db[STATUS].find_one({"_id": ids["failed"]})
    assert failed["error"] == "RuntimeError: loss became nan"

    # Histories came through MLflow's bulk endpoint (one request per metric), not per run.
    reader = mirror.HistoryReader(client, mlflow_server)
    points = reader._bulk([client.get_run(ids["train"]), client.get_run(ids["killed"])],
                          "val_loss")
    assert points is not None, "the bulk endpoint did not answer: histories were read per run"
    assert sorted((run_id, step, value) for run_id, step, value, _ in points) == sorted(
        (run_id, m.step, m.value) for run_id in (ids["train"], ids["killed"])
        for m in client.get_metric_history(run_id, "val_loss"))

    before = snapshot(db)
    again = sync_once(mlflow_server, db_uri, options)
    assert again.changed == 0 and again.epochs == 0
    assert snapshot(db) == before

    # The silent run speaks again: back to in_progress, with its new epoch.
    log_epochs(client, ids["silent"], range(3, 4))
    third = sync_once(mlflow_server, db_uri, SyncOptions(experiments=[exp], dead_after=60,
                                                         reconcile_every=3600))
    assert not third.reconciled and third.changed_ids == [ids["silent"]]
    assert db[STATUS].find_one({"_id": ids["silent"]})["status"] == "in_progress"
    assert db[STATUS].find_one({"_id": ids["silent"]})["current_epoch"] == 3
    assert db[EPOCHS].count_documents({"run_id": ids["silent"]}) == 3

    # Post-finish edits (evaluate logs test metrics into a finished run) need a reconcile.
    client.log_metric(ids["train"], "test_acc", 0.88)
    sync_once(mlflow_server, db_uri, SyncOptions(experiments=[exp], reconcile_every=0))
    assert db[TRAININGS].find_one({"_id": ids["train"]})["test_accuracy"] == 0.88

    # Deleting a run removes it; a rebuild reproduces the same documents.
    client.delete_run(ids["killed"])
    gone = sync_once(mlflow_server, db_uri, SyncOptions(experiments=[exp], dead_after=60,
                                                        reconcile_every=3600))
    assert gone.deleted == 1
    for name in (TRAININGS, STATUS, EPOCHS):
        assert db[name].count_documents({"run_id": ids["killed"]}) == 0
    before = snapshot(db)
    sync_once(mlflow_server, db_uri, SyncOptions(experiments=[exp], dead_after=60,
                                                 rebuild=True))
    assert snapshot(db) == before


def test_real_training_runs_are_mirrored(trained_pair, db_uri):
    client = MlflowClient(trained_pair.uri)
    result = CliRunner(env={"MLFLOW_TRACKING_URI": trained_pair.uri, "MONGO_URI": db_uri}).invoke(
        cli, ["sync", "--experiments", trained_pair.experiment])
    assert result.exit_code == 0, result.output
    db = mongo_db(db_uri)
    for model, run_id in trained_pair.runs.items():
        run = client.get_run(run_id)
        doc = db[TRAININGS].find_one({"_id": run_id})
        assert doc["model_name"] == model and doc["status"] == "completed"
        assert doc["max_epochs"] == 2 and doc["epochs_run"] == run.data.metrics["epochs_run"]
        assert doc["best_val_loss"] == run.data.metrics["best_val_loss"]
        assert doc["class_names"] == run.data.tags["cnnflow.class_names"].split(",")
        assert f"/runs/{run_id}?" in doc["mlflow_url"]
        assert db[EPOCHS].count_documents({"run_id": run_id}) == 2
        assert db[STATUS].find_one({"_id": run_id})["current_epoch"] == 2


def test_two_syncs_at_once_and_a_crashed_pass_converge(mlflow_server, db_uri, monkeypatch):
    client = MlflowClient(mlflow_server)
    exp = new_experiment(client)
    for _ in range(4):
        make_run(client, exp, "train", epochs=4)
    options = SyncOptions(experiments=[exp])
    reference = f"{db_uri}_ref"
    sync_once(mlflow_server, reference, options)
    expected = snapshot(mongo_db(reference))

    errors: list[BaseException] = []

    def one() -> None:
        try:
            sync_once(mlflow_server, db_uri, options)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert snapshot(mongo_db(db_uri)) == expected

    # A pass that dies after the epochs but before status and bookkeeping is redone.
    crashed = f"{db_uri}_crash"
    real = mirror._bulk

    def dying(collection, ops, fresh=None):
        if collection.name == STATUS:
            raise RuntimeError("killed mid-pass")
        real(collection, ops, fresh)

    monkeypatch.setattr(mirror, "_bulk", dying)
    with pytest.raises(mirror.MirrorError, match="killed mid-pass"):
        sync_once(mlflow_server, crashed, options)
    monkeypatch.setattr(mirror, "_bulk", real)
    assert mongo_db(crashed)[SYNC].count_documents({}) <= 1  # no fingerprints yet
    sync_once(mlflow_server, crashed, options)
    assert snapshot(mongo_db(crashed)) == expected


def test_follower_mirrors_each_epoch_while_the_run_trains(mlflow_server, db_uri, image_folder):
    """Live, without timing races: training pauses at the end of each epoch until the
    follower has mirrored the previous one (the latency itself is measured in
    benchmarks/sync.py --live)."""
    from components.nn.engine import Callback
    from components.steps.train import TrainParams, train

    client = MlflowClient(mlflow_server)
    exp = new_experiment(client)
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server, MONGO_URI=db_uri)
    follower = subprocess.Popen([str(BIN / "cnnflow"), "sync", "--follow", "--experiments", exp,
                                 "--interval", "0.5"], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    db = mongo_db(db_uri)
    live: dict[int, dict] = {}  # epoch -> its status document, seen while the run trained

    class WaitForMirror(Callback):
        def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
            if epoch == 1:
                return
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                status = db[STATUS].find_one({"current_epoch": {"$gte": epoch - 1}})
                if status and db[EPOCHS].find_one({"epoch": epoch - 1}):
                    live[epoch - 1] = status
                    return
                time.sleep(0.1)

    try:
        data = image_folder({"red": 12, "green": 12, "blue": 12})
        params = TrainParams(data=str(data), experiment=exp, epochs=3, image_size=16,
                             batch_size=8, num_workers=0, weights="none", patience=0)
        run_id = train(params, mlflow_server, progress=False, log=lambda s: None,
                       callbacks=[WaitForMirror()]).run_id
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (
                db[STATUS].find_one({"_id": run_id}) or {}).get("status") != "completed":
            time.sleep(0.2)
    finally:
        follower.terminate()
        _, err = follower.communicate(timeout=30)
    assert follower.returncode == 0, err[-2000:]
    assert sorted(live) == [1, 2]
    for epoch, status in live.items():
        assert status["status"] == "in_progress" and status["current_epoch"] >= epoch
    assert db[STATUS].find_one({"_id": run_id})["status"] == "completed"
    assert sorted(r["epoch"] for r in db[EPOCHS].find({"run_id": run_id})) == [1, 2, 3]


def test_follower_survives_a_mongo_restart_and_catches_up(mlflow_server, tmp_path):
    client = MlflowClient(mlflow_server)
    exp = new_experiment(client)
    home, port = tmp_path / "own-mongo", free_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MONGO_URI", raising=False)
        services.up(names=["mongo"], home=home, ports={"mongo": port}, timeout=60)
    uri = f"mongodb://127.0.0.1:{port}/cnnflow"
    run_id = make_run(client, exp, "train", epochs=1, status="RUNNING")
    logs: list[str] = []
    stop = threading.Event()
    thread = threading.Thread(target=mirror.follow, args=(mlflow_server, uri, SyncOptions(
        experiments=[exp])), kwargs={"interval": 0.3, "log": logs.append, "stop": stop.is_set,
                                     "max_backoff": 1.0})
    thread.start()
    try:
        db = mongo_db(uri)
        _wait(lambda: db[EPOCHS].count_documents({"run_id": run_id}) == 1)
        services.down(["mongo"], home=home)
        log_epochs(client, run_id, range(2, 4))
        client.set_terminated(run_id, "FINISHED")
        _wait(lambda: any("sync error" in line for line in logs))
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("MONGO_URI", raising=False)
            services.up(names=["mongo"], home=home, ports={"mongo": port}, timeout=60)
        db = mongo_db(uri)
        _wait(lambda: (db[STATUS].find_one({"_id": run_id}) or {}).get("status") == "completed",
              timeout=30)
        assert db[EPOCHS].count_documents({"run_id": run_id}) == 3
        assert db[STATUS].find_one({"_id": run_id})["current_epoch"] == 3
    finally:
        stop.set()
        thread.join(timeout=30)
        services.down(["mongo"], home=home)
    assert all("\n" not in line for line in logs)
    # The first error comes from the open client mid-pass (the driver's topology dump before):
    # it reads like every later one, which come from the probe.
    errors = [line for line in logs if "sync error" in line]
    head = f"MongoDB at {uri} is not reachable ("
    tail = "): start it with `cnnflow up` or set MONGO_URI"
    assert head in errors[0] and errors[0].endswith(tail), errors[0]
    assert not any("Topology" in line or "configured timeouts" in line for line in logs)


def _wait(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except Exception:  # noqa: BLE001 - the server may be coming back
            pass
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


@pytest.mark.parametrize("which", ["mlflow", "mongo"])
def test_unreachable_server_fails_one_shot_fast_and_masked(mlflow_server, mongo_server, which):
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "MONGO_URI": mongo_server}
    if which == "mlflow":
        env["MLFLOW_TRACKING_URI"] = "http://user:s3cret@127.0.0.1:9"
    else:
        env["MONGO_URI"] = f"mongodb://user:s3cret@127.0.0.1:{free_port()}/x"
    started = time.monotonic()
    result = CliRunner(env=env).invoke(cli, ["sync"])
    assert result.exit_code == 1
    assert time.monotonic() - started < 10
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "not reachable" in errors[0], result.output
    assert "s3cret" not in result.output


def test_sync_pass_report_line_and_service_registered():
    assert services.SERVICES["sync"].optional
    assert "sync" not in services.default_names()
    assert services.SERVICES["sync"].args("127.0.0.1", None, Path(".")) == ["sync", "--follow"]
    assert "written" in mirror.PassReport(changed=1).line()
    assert callable(sync_pass)


def test_up_with_sync_starts_a_follower_that_mirrors(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("CNNFLOW_HOME", str(home))
    ports = ["--mlflow-port", str(free_port()), "--mongo-port", str(free_port())]
    result = CliRunner().invoke(cli, ["up", "--with-sync", *ports], catch_exceptions=False)
    try:
        assert result.exit_code == 0, result.output
        shown = {ln.split()[0]: ln.split()[1] for ln in result.output.splitlines()
                 if ln.split()[:1] in (["mlflow"], ["mongo"], ["sync"])}
        assert shown == {"mlflow": "running", "mongo": "running", "sync": "running"}
        client = MlflowClient(services.tracking_uri())
        exp = new_experiment(client)
        run_id = make_run(client, exp, "train", epochs=2)
        db = mongo_db(services.mongo_uri() + "/cnnflow")
        _wait(lambda: db[EPOCHS].count_documents({"run_id": run_id}) == 2, timeout=30)
    finally:
        stopped = CliRunner().invoke(cli, ["down"], catch_exceptions=False)
    assert stopped.exit_code == 0
    assert not list(home.glob("*.pid"))


def test_mlflow_run_entry_point_syncs_and_is_not_mirrored(mlflow_server, db_uri):
    """MLproject itself is generated from SyncParams (tests/test_project.py checks it)."""
    root = Path(__file__).resolve().parents[1]
    client = MlflowClient(mlflow_server)
    exp = new_experiment(client)
    run_id = make_run(client, exp, "train", epochs=1)
    env = subprocess_env(mlflow_server, MONGO_URI=db_uri)
    proc = subprocess.run(
        [str(BIN / "mlflow"), "run", str(root), "-e", "sync", "--env-manager", "local",
         "--experiment-name", exp, "-P", f"experiments={exp}"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    db = mongo_db(db_uri)
    assert [d["_id"] for d in db[TRAININGS].find()] == [run_id]  # the job's own run is not
    jobs = [r for r in client.search_runs([client.get_experiment_by_name(exp).experiment_id])
            if r.data.tags.get("cnnflow.step") == "sync"]
    assert len(jobs) == 1
