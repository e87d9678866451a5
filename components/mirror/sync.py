"""The Mongo mirror: MLflow runs copied into `trainings` / `epochs` / `status` for dashboards.

MLflow is the source of truth; the mirror is a derived view that can be dropped and rebuilt
at any time (`rebuild=True`). One `sync_pass` reads what changed in MLflow and writes it with
bulk upserts keyed by run id and (run id, epoch), so passes are idempotent: two syncs at once,
a sync killed mid-pass or a re-run after a crash all converge to the same documents.

What "changed" means. MLflow has no "last updated" attribute, so each pass asks for

* every RUNNING run (they change all the time; live monitoring needs them every pass),
* every run whose `end_time` is at or after the watermark minus `overlap` (runs that ended
  since the last pass; the overlap absorbs clients whose clocks run behind), and
* the deleted runs (to drop them from the mirror),

and then compares each run with the fingerprint the mirror kept of it (`_sync` collection:
status, end time, latest metric values/steps/timestamps, params, tags, registry versions and
the mirrored status). Only runs whose fingerprint differs are read in full (their metric
histories) and written. Changes to runs that ended long ago (evaluate logs test metrics into a
finished training run; tags, promotions, deletions that MLflow already purged) are caught by
a *reconcile* pass, which lists every run of the selected experiments with the same
fingerprint check; one runs when `reconcile_every` seconds passed since the last (and on the
first pass). Watermark and fingerprints are written only after the documents, so a pass that
dies half-way is simply redone.

Deleted MLflow runs are removed from the mirror (all three collections), not marked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run, ViewType
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from components import notify, tracking
from components.errors import CnnflowError, one_line
from components.names import (
    CLASS_NAMES_TAG,
    DATASET_TAG,
    EPOCH_METRICS,
    ERROR_TAG,
    EXPLAIN_OVERVIEW_TAG,
    LABEL_ISSUES_RUN_TAG,
    LR_CHOSEN_PARAM,
    MODEL_TAG,
    MODEL_URI_TAG,
    PROGRESS_BATCH,
    PROGRESS_BATCHES,
    PROGRESS_EPOCH,
    PROGRESS_IMAGES_PER_SEC,
    PROGRESS_METRICS,
    STEP_TAG,
    VERSION_TAG,
)
from components.progress import Progress
from components.settings import mask_text
from components.tracking.registry import AliasLookup

logger = logging.getLogger("cnnflow.mirror")

TRAININGS, EPOCHS, STATUS, SYNC = "trainings", "epochs", "status", "_sync"
STATE_ID = "state"
# Data-preparation runs describe datasets, not models, and the run `mlflow run -e sync` opens
# for the sync job itself describes nothing: they stay out of the mirror.
# Runs that hold no model: data steps and bookkeeping runs (an evaluate job run's metrics are
# in the evaluated run's document already).
EXCLUDED_STEPS = frozenset({"eda", "preprocess", "sync", "pipeline", "evaluate", "promote",
                            "report", "explain", "label-issues", "lr-find"})
STATUS_MAP = {"RUNNING": "in_progress", "SCHEDULED": "in_progress", "FINISHED": "completed",
              "FAILED": "failed", "KILLED": "killed"}
BULK_HISTORY_MAX = 25000  # MLflow's cap on points per get-history-bulk answer
BULK_HISTORY_RUNS = 100  # and on run ids per request
MONGO_TIMEOUT = 5.0  # seconds a Mongo call waits for a server before it fails


class MirrorError(CnnflowError, RuntimeError):
    """MLflow or Mongo cannot be used for the mirror; one line, passwords masked."""


@dataclass
class SyncOptions:
    """What one pass mirrors and how it judges liveness and staleness."""

    experiments: Sequence[str] = ()  # names; empty = every active experiment
    dead_after: float = 60.0  # seconds of silence after which a RUNNING run counts as died
    overlap: float = 300.0  # seconds the end_time watermark is re-read (client clock skew)
    reconcile_every: float = 60.0  # seconds between full listings; 0 = every pass
    rebuild: bool = False  # drop the mirror first and rebuild it from MLflow


@dataclass
class PassReport:
    """What a pass did, for logs, tests and the benchmark."""

    listed: int = 0  # runs read from MLflow's search
    changed: int = 0  # runs written (fingerprint differed)
    epochs: int = 0  # epoch documents written
    deleted: int = 0  # runs removed from the mirror
    reconciled: bool = False
    seconds: float = 0.0
    read_seconds: float = 0.0  # of which reading MLflow (listing, registry, histories)
    changed_ids: list[str] = field(default_factory=list)

    def line(self) -> str:
        kind = "reconcile" if self.reconciled else "incremental"
        return (f"sync ({kind}): {self.listed} runs listed, {self.changed} written, "
                f"{self.epochs} epochs, {self.deleted} deleted in {self.seconds:.2f} s")


# --------------------------------------------------------------------------------------------
# Connections
# --------------------------------------------------------------------------------------------


def connect_mongo(uri: str, timeout: float = MONGO_TIMEOUT):
    """A MongoClient that gives up within `timeout` seconds instead of pymongo's 30 s."""
    from pymongo import MongoClient

    ms = max(int(timeout * 1000), 1)
    return MongoClient(uri, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms, socketTimeoutMS=
                       max(ms * 6, 30000), tz_aware=True)


def database(client, uri: str):
    """The database named in the URI path (mongodb://host/mydb), else `cnnflow`."""
    from pymongo.uri_parser import parse_uri

    try:
        name = parse_uri(uri).get("database")
    except Exception:  # noqa: BLE001 - an odd URI: the driver already accepted it
        name = None
    return client[name or "cnnflow"]


def ensure_indexes(db) -> None:
    """Unique keys that make concurrent upserts converge instead of duplicating."""
    from pymongo import ASCENDING

    db[EPOCHS].create_index([("run_id", ASCENDING), ("epoch", ASCENDING)], unique=True,
                            name="run_epoch")
    db[TRAININGS].create_index([("experiment", ASCENDING), ("start_time", ASCENDING)],
                               name="experiment_start")
    # The dashboard's time filter and newest-first tables select on start_time alone.
    db[TRAININGS].create_index([("start_time", ASCENDING)], name="start")
    db[SYNC].create_index([("experiment_id", ASCENDING)], name="experiment")


def drop_mirror(db) -> None:
    """Remove every mirror collection (MLflow keeps the truth; the next pass rebuilds)."""
    for name in (TRAININGS, EPOCHS, STATUS, SYNC):
        db[name].drop()


# --------------------------------------------------------------------------------------------
# Reading MLflow
# --------------------------------------------------------------------------------------------


def _ms_to_dt(ms: int | None) -> datetime | None:
    # Whole milliseconds, as BSON stores them, so a re-read document compares equal.
    return datetime.fromtimestamp(ms / 1000, UTC) if ms else None


def _experiments(client: MlflowClient, names: Sequence[str]) -> dict[str, str]:
    """id -> name of the selected active experiments (all of them by default)."""
    if names:
        found = {}
        for name in names:
            exp = client.get_experiment_by_name(name)
            if exp is not None and exp.lifecycle_stage == "active":
                found[exp.experiment_id] = exp.name
        return found
    result, token = {}, None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000,
                                         page_token=token)
        result.update({e.experiment_id: e.name for e in page})
        token = page.token
        if not token:
            return result


def _search(client: MlflowClient, exp_ids: list[str], filter_string: str = "",
            view: int = ViewType.ACTIVE_ONLY) -> list[Run]:
    runs: list[Run] = []
    for start in range(0, len(exp_ids), 100):
        token = None
        while True:
            page = client.search_runs(exp_ids[start:start + 100], filter_string, view,
                                      max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
    return runs


def _mirrored(run: Run) -> bool:
    return run.data.tags.get(STEP_TAG) not in EXCLUDED_STEPS


def _registry(client: MlflowClient) -> dict[str, list[dict[str, Any]]]:
    """run id -> its registry versions (name, version, aliases): one listing per pass."""
    found: dict[str, list[dict[str, Any]]] = {}
    aliases_of = AliasLookup(client)
    token = None
    try:
        while True:
            page = client.search_model_versions(max_results=1000, page_token=token)
            for v in page:
                if v.run_id:
                    found.setdefault(v.run_id, []).append(
                        {"name": v.name, "version": int(v.version),
                         "aliases": aliases_of(v.name, v.version)})
            token = page.token
            if not token:
                break
    except Exception as exc:  # noqa: BLE001 - a store without a registry: no registry field
        logger.debug("no model registry: %s", mask_text(str(exc))[:200])
        return {}
    for versions in found.values():
        versions.sort(key=lambda v: (v["name"], v["version"]))
    return found


def _heartbeat_ms(run: Run) -> int:
    """The newest sign of life: the latest timestamp of any metric (the `progress/*`
    heartbeats and `system/*` samples a training run logs every few seconds, its epochs),
    else the start time."""
    stamps = [m.timestamp for m in run.data._metric_objs if m.timestamp]
    return max([*stamps, run.info.start_time or 0])


def _current_epoch(run: Run) -> int | None:
    steps = [m.step for m in run.data._metric_objs if m.key in EPOCH_METRICS and m.step]
    return max(steps) if steps else None


def progress_doc(run: Run) -> dict[str, Any] | None:
    """Where a run is inside its epoch, from its latest heartbeat (`progress/*`); None
    without one. `fraction`: of the current epoch's batches; `at`: when the beat was logged."""
    beats = {m.key: m for m in run.data._metric_objs if m.key in PROGRESS_METRICS}
    if PROGRESS_EPOCH not in beats:
        return None
    batch = beats.get(PROGRESS_BATCH)
    batches = beats.get(PROGRESS_BATCHES)
    rate = beats.get(PROGRESS_IMAGES_PER_SEC)
    doc = {"epoch": int(beats[PROGRESS_EPOCH].value),
           "epochs": _num(run.data.params.get("epochs"), int),
           "batch": int(batch.value) if batch else None,
           "batches": int(batches.value) if batches else None,
           "fraction": (min(batch.value / batches.value, 1.0)
                        if batch and batches and batches.value > 0 else None),
           "images_per_sec": rate.value if rate else None,
           "at": _ms_to_dt(max(m.timestamp for m in beats.values()))}
    return {k: v for k, v in doc.items() if v is not None}


def children_heartbeat_ms(runs: list[Run]) -> dict[str, int]:
    """Each parent's newest sign of life among its child runs (their beats, epochs and ends):
    a study, a cross-validation or a bagging parent logs little itself while its trials,
    folds or members train, and is alive as long as they are."""
    latest: dict[str, int] = {}
    for run in runs:
        parent = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
        if parent:
            latest[parent] = max(latest.get(parent, 0), _heartbeat_ms(run),
                                 run.info.end_time or 0)
    return latest


def mirror_status(run: Run, now_ms: int, dead_after: float, children_ms: int = 0) -> str:
    """MLflow status -> the seeds' words; RUNNING but silent past `dead_after` (itself and,
    for a parent, its children: `children_ms`) -> `died`."""
    status = STATUS_MAP.get(run.info.status, run.info.status.lower())
    latest = max(_heartbeat_ms(run), children_ms)
    if status == "in_progress" and now_ms - latest > dead_after * 1000:
        return "died"
    return status


def fingerprint(run: Run, registry: list[dict[str, Any]], status: str) -> str:
    """Everything a mirror document is built from, hashed: equal hash, nothing to write."""
    info = run.info
    metrics = sorted((m.key, m.value, m.step, m.timestamp) for m in run.data._metric_objs)
    payload = [info.status, info.end_time, info.start_time, info.run_name, info.lifecycle_stage,
               metrics, sorted(run.data.params.items()), sorted(run.data.tags.items()),
               registry, status]
    return hashlib.sha1(json.dumps(payload, default=str).encode()).hexdigest()


class HistoryReader:
    """Per-epoch metric histories of many runs, in as few requests as the server allows.

    Against an MLflow HTTP server it uses the server's get-history-bulk endpoint (up to 100
    runs per request, the call MLflow's own UI makes for its charts); anything else, or any
    answer that might be cut short, falls back to one `get_metric_history` per run and metric.
    """

    def __init__(self, client: MlflowClient, tracking_uri: str) -> None:
        self.client = client
        self.uri = tracking_uri
        self.bulk = tracking.has_ui(tracking_uri)  # the bulk history endpoint is the server's

    def read(self, runs: Sequence[Run], progress: str = ""
             ) -> dict[str, dict[int, dict[str, Any]]]:
        """run id -> epoch -> {metric: value, "timestamp": ms} (steps >= 1 only); `progress`
        labels a bar (or periodic lines) of the metric histories read."""
        out: dict[str, dict[int, dict[str, Any]]] = {r.info.run_id: {} for r in runs}
        by_key: dict[str, list[Run]] = {}
        for run in runs:
            for key in EPOCH_METRICS:
                if key in run.data.metrics:
                    by_key.setdefault(key, []).append(run)
        shown = Progress(sum(map(len, by_key.values())), progress, "metric history",
                         many="metric histories") if progress else None
        for key, key_runs in by_key.items():
            for chunk in self._chunks(key_runs):
                points = self._bulk(chunk, key) if self.bulk else None
                if points is None:
                    points = [(r.info.run_id, m.step, m.value, m.timestamp) for r in chunk
                              for m in self.client.get_metric_history(r.info.run_id, key)]
                for run_id, step, value, stamp in sorted(points, key=lambda p: p[3]):
                    if step and step >= 1:  # later logs of a step win, as in MLflow's UI
                        row = out[run_id].setdefault(int(step), {})
                        row[key] = value
                        row["timestamp"] = max(row.get("timestamp", 0), stamp)
                if shown:
                    shown.update(len(chunk))
        if shown:
            shown.close()
        return out

    @staticmethod
    def _chunks(runs: list[Run]) -> Iterable[list[Run]]:
        chunk: list[Run] = []
        points = 0
        for run in runs:
            size = (_current_epoch(run) or 0) + 1
            if chunk and (len(chunk) >= BULK_HISTORY_RUNS
                          or points + size > BULK_HISTORY_MAX // 2):
                yield chunk
                chunk, points = [], 0
            chunk.append(run)
            points += size
        if chunk:
            yield chunk

    def _bulk(self, runs: list[Run], key: str) -> list[tuple[str, int, float, int]] | None:
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request

        try:
            response = http_request(
                get_default_host_creds(self.uri), "/ajax-api/2.0/mlflow/metrics/get-history-bulk",
                "GET", max_retries=0, timeout=30,
                params={"run_id": [r.info.run_id for r in runs], "metric_key": key,
                        "max_results": BULK_HISTORY_MAX})
            if response.status_code != 200:
                return None
            metrics = response.json().get("metrics", [])
        except Exception:  # noqa: BLE001 - an older or proxied server: per-run reads
            return None
        if len(metrics) >= BULK_HISTORY_MAX:
            return None  # possibly truncated
        return [(m["run_id"], int(m.get("step", 0)), float(m["value"]), int(m["timestamp"]))
                for m in metrics]


# --------------------------------------------------------------------------------------------
# Building documents
# --------------------------------------------------------------------------------------------


def safe_key(key: str) -> str:
    """MLflow keys hold dots (`cnnflow.step`); Mongo field names should not: use U+FF0E."""
    key = key.replace(".", "\uff0e")
    return "\uff04" + key[1:] if key.startswith("$") else key


def _num(value: str | None, kind: Callable[[str], Any]) -> Any:
    if value is None or value == "":
        return None
    try:
        return kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        return None


def training_doc(run: Run, experiment: str, status: str, registry: list[dict[str, Any]],
                 tracking_uri: str) -> dict[str, Any]:
    """The `trainings` document of one run; fields the run does not have are left out."""
    info, params, tags, metrics = run.info, run.data.params, run.data.tags, run.data.metrics
    freeze = params.get("freeze")
    patience = _num(params.get("patience"), int)
    best_val_acc = metrics.get("best_val_acc")
    doc: dict[str, Any] = {
        "run_id": info.run_id, "run_name": info.run_name, "experiment": experiment,
        "experiment_id": info.experiment_id, "step": tags.get(STEP_TAG),
        "model_name": tags.get(MODEL_TAG), "version": _num(tags.get(VERSION_TAG), int),
        "parent_run_id": tags.get(MLFLOW_PARENT_RUN_ID),
        "num_classes": _num(params.get("num_classes"), int),
        "class_names": tags[CLASS_NAMES_TAG].split(",") if tags.get(CLASS_NAMES_TAG) else None,
        "feature_extraction": None if freeze is None else freeze != "none",
        "dropout": _num(params.get("dropout"), float),
        "batch_size": _num(params.get("batch_size"), int),
        # train --lr auto: the LR the range test chose (the `lr` param says "auto").
        "learning_rate": _num(params.get(LR_CHOSEN_PARAM, params.get("lr")), float),
        "optimizer": params.get("optimizer"),
        "weight_decay": _num(params.get("weight_decay"), float),
        "early_stopping": None if patience is None else patience > 0,
        "patience": patience,
        "image_size": _num(params.get("image_size"), int),
        "weights": params.get("weights"),
        "dataset": tags.get(DATASET_TAG),
        "epochs_run": _num(str(metrics["epochs_run"]), int) if "epochs_run" in metrics else None,
        "max_epochs": _num(params.get("epochs"), int),
        "train_accuracy": metrics.get("train_acc"),
        "val_accuracy": best_val_acc if best_val_acc is not None else metrics.get("val_acc"),
        "test_accuracy": metrics.get("test_acc"),
        "best_val_loss": metrics.get("best_val_loss"),
        "test_loss": metrics.get("test_loss"),
        "duration_sec": (info.end_time - info.start_time) / 1000
        if info.end_time and info.start_time else None,
        "start_time": _ms_to_dt(info.start_time), "end_time": _ms_to_dt(info.end_time),
        "status": status, "error": tags.get(ERROR_TAG),
        "model_uri": tags.get(MODEL_URI_TAG),
        "params": {safe_key(k): v for k, v in params.items()},
        "metrics": {safe_key(k): v for k, v in metrics.items()},
        "tags": {safe_key(k): mask_text(v) for k, v in tags.items()},
        "registry": {"versions": registry} if registry else None,
        "mlflow_url": (tracking.run_url(tracking_uri, info.experiment_id, info.run_id)
                       if tracking.has_ui(tracking_uri) else None),
        # What evaluate and label-issues found, as links the dashboard shows without MLflow.
        "explain_overview_url": (tracking.artifact_url(tracking_uri, info.run_id,
                                                       tags[EXPLAIN_OVERVIEW_TAG])
                                 if tags.get(EXPLAIN_OVERVIEW_TAG) else None),
        "label_issues": (int(metrics["n_label_issues"]) if "n_label_issues" in metrics
                         else None),
        "label_issues_url": (tracking.run_url(tracking_uri, info.experiment_id,
                                              tags[LABEL_ISSUES_RUN_TAG])
                             if tags.get(LABEL_ISSUES_RUN_TAG) and tracking.has_ui(tracking_uri)
                             else None),
    }
    return {k: v for k, v in doc.items() if v is not None}


def status_doc(run: Run, status: str, now: datetime) -> dict[str, Any]:
    info, params = run.info, run.data.params
    doc = {"run_id": info.run_id, "run_name": info.run_name, "status": status,
           "model_name": run.data.tags.get(MODEL_TAG),
           "start_time": _ms_to_dt(info.start_time), "end_time": _ms_to_dt(info.end_time),
           "current_epoch": _current_epoch(run), "max_epochs": _num(params.get("epochs"), int),
           "last_heartbeat": _ms_to_dt(_heartbeat_ms(run)), "error": run.data.tags.get(ERROR_TAG),
           "progress": progress_doc(run), "updated_at": now}
    return {k: v for k, v in doc.items() if v is not None}


def epoch_doc(run_id: str, epoch: int, row: dict[str, Any]) -> dict[str, Any]:
    doc = {"_id": f"{run_id}:{epoch}", "run_id": run_id, "epoch": epoch,
           **{k: row[k] for k in EPOCH_METRICS if k in row}}
    if row.get("timestamp"):
        doc["timestamp"] = _ms_to_dt(row["timestamp"])
    return doc


def _upsert_by_id(doc: dict[str, Any]):
    """An upsert keyed by `_id` that does not $set `_id` itself (immutable in MongoDB)."""
    from pymongo import UpdateOne

    return UpdateOne({"_id": doc["_id"]}, {"$set": {k: v for k, v in doc.items() if k != "_id"}},
                     upsert=True)


# --------------------------------------------------------------------------------------------
# Writing Mongo
# --------------------------------------------------------------------------------------------


def _replace_unset(doc: dict[str, Any], fields: Iterable[str]) -> dict[str, Any]:
    """$set the fields present and $unset the known ones now absent (a tag removed in MLflow)."""
    update: dict[str, Any] = {"$set": doc}
    gone = {f: "" for f in fields if f not in doc}
    if gone:
        update["$unset"] = gone
    return update


def _bulk(collection, ops: list, fresh_inserts: list[dict[str, Any]] | None = None) -> None:
    """Unordered bulk write; inserts that hit an existing key are redone as upserts, and a
    race with a concurrent sync (duplicate key on upsert) is retried once."""
    from pymongo.errors import BulkWriteError

    if fresh_inserts:
        from pymongo import InsertOne

        try:
            collection.bulk_write([InsertOne(d) for d in fresh_inserts], ordered=False)
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if any(e.get("code") != 11000 for e in errors):
                raise
            ops = ops + [_upsert_by_id(fresh_inserts[e["index"]]) for e in errors]
    if not ops:
        return
    for attempt in (1, 2):
        try:
            collection.bulk_write(ops, ordered=False)
            return
        except BulkWriteError as exc:
            errors = exc.details.get("writeErrors", [])
            if attempt == 2 or any(e.get("code") != 11000 for e in errors):
                raise
            ops = [ops[e["index"]] for e in errors]


def _delete_runs(db, run_ids: list[str]) -> None:
    if run_ids:
        for name in (EPOCHS, TRAININGS, STATUS):
            db[name].delete_many({"run_id": {"$in": run_ids}})
        db[SYNC].delete_many({"_id": {"$in": [f"run:{r}" for r in run_ids]}})


# --------------------------------------------------------------------------------------------
# One pass
# --------------------------------------------------------------------------------------------


def sync_pass(client: MlflowClient, db, tracking_uri: str, options: SyncOptions,
              now: float | None = None) -> PassReport:
    """Bring the mirror up to date with MLflow once; returns what it did."""
    from pymongo import UpdateOne

    started = time.perf_counter()
    now = time.time() if now is None else now
    now_ms = int(now * 1000)
    stamp = _ms_to_dt(now_ms)
    report = PassReport()
    if options.rebuild:
        drop_mirror(db)
    ensure_indexes(db)
    state = db[SYNC].find_one({"_id": STATE_ID}) or {}
    experiments = _experiments(client, options.experiments)
    exp_ids = sorted(experiments)
    watermark = state.get("watermark_ms")
    reconciled_at = state.get("reconciled_at_ms")
    report.reconciled = (watermark is None or reconciled_at is None
                         or now_ms - reconciled_at >= options.reconcile_every * 1000)

    if not exp_ids:
        runs: list[Run] = []
    elif report.reconciled:
        runs = _search(client, exp_ids)
    else:
        since = int(watermark - options.overlap * 1000)
        found = {r.info.run_id: r for r in _search(client, exp_ids,
                                                   "attributes.status = 'RUNNING'")}
        found.update({r.info.run_id: r for r in _search(
            client, exp_ids, f"attributes.end_time >= {since}")})
        runs = list(found.values())
    children = children_heartbeat_ms(runs)
    runs = [r for r in runs if _mirrored(r)]
    report.listed = len(runs)
    registry = _registry(client) if runs else {}

    known = {d["_id"][4:]: d for d in db[SYNC].find(
        {"_id": {"$in": [f"run:{r.info.run_id}" for r in runs]}})} if runs else {}
    changed: list[tuple[Run, str, str]] = []
    for run in runs:
        status = mirror_status(run, now_ms, options.dead_after,
                               children.get(run.info.run_id, 0))
        fp = fingerprint(run, registry.get(run.info.run_id, []), status)
        if known.get(run.info.run_id, {}).get("fp") != fp:
            changed.append((run, status, fp))

    histories = HistoryReader(client, tracking_uri).read(
        [r for r, _, _ in changed], progress="sync --rebuild" if options.rebuild else "")
    report.read_seconds = time.perf_counter() - started
    epoch_ops, fresh, training_ops, status_ops, sync_ops = [], [], [], [], []
    for run, status, fp in changed:
        run_id = run.info.run_id
        rows = histories.get(run_id, {})
        seen = known.get(run_id)
        done = int(seen.get("epoch", 0)) if seen else 0
        full = seen is None or int(seen.get("n_epochs", 0)) != sum(1 for e in rows if e < done)
        for epoch, row in sorted(rows.items()):
            if full or epoch >= done:
                doc = epoch_doc(run_id, epoch, row)
                if seen is None:
                    fresh.append(doc)  # never mirrored: insert, cheaper than an upsert
                else:
                    epoch_ops.append(_upsert_by_id(doc))
        report.epochs += sum(1 for e in rows if full or e >= done)
        experiment = experiments.get(run.info.experiment_id, "")
        tdoc = training_doc(run, experiment, status, registry.get(run_id, []), tracking_uri)
        training_ops.append(UpdateOne({"_id": run_id}, _replace_unset(tdoc, TRAINING_FIELDS),
                                      upsert=True))
        sdoc = status_doc(run, status, stamp)
        status_ops.append(UpdateOne({"_id": run_id}, _replace_unset(sdoc, STATUS_FIELDS),
                                    upsert=True))
        last = max(rows, default=0)
        sync_ops.append(UpdateOne({"_id": f"run:{run_id}"}, {"$set": {
            "fp": fp, "epoch": last, "n_epochs": sum(1 for e in rows if e < last),
            "experiment_id": run.info.experiment_id, "updated_at": stamp}}, upsert=True))
        report.changed_ids.append(run_id)
    report.changed = len(changed)
    # Documents before bookkeeping: a pass that dies here is redone by the next one.
    _bulk(db[EPOCHS], epoch_ops, fresh)
    _bulk(db[TRAININGS], training_ops)
    _bulk(db[STATUS], status_ops)
    notify.announce_died(db[STATUS], [{**status_doc(r, s, stamp), "step": r.data.tags.get(STEP_TAG),
                                       "mlflow_url": tracking.run_url(
        tracking_uri, r.info.experiment_id, r.info.run_id)} for r, s, _ in changed if s == "died"])
    _bulk(db[SYNC], sync_ops)

    report.deleted = _remove_deleted(client, db, exp_ids, runs, options, report.reconciled)
    ends = [r.info.end_time for r in runs if r.info.end_time and r.info.status != "RUNNING"]
    state_update: dict[str, Any] = {"$set": {"updated_at": stamp},
                                    "$max": {"watermark_ms": max([*ends, watermark or 0])}}
    if report.reconciled:
        state_update["$max"]["reconciled_at_ms"] = now_ms
    db[SYNC].update_one({"_id": STATE_ID}, state_update, upsert=True)
    report.seconds = time.perf_counter() - started
    return report


def _remove_deleted(client: MlflowClient, db, exp_ids: list[str], active: list[Run],
                    options: SyncOptions, reconciled: bool) -> int:
    """Drop runs MLflow deleted: the deleted list each pass; on reconcile, anything the
    mirror holds for these experiments that MLflow no longer lists (purged, moved, excluded)."""
    if not exp_ids:
        return 0
    gone = {r.info.run_id for r in _search(client, exp_ids, view=ViewType.DELETED_ONLY)}
    if reconciled:
        scope = {} if not options.experiments else {"experiment_id": {"$in": exp_ids}}
        held = {d["_id"][4:] for d in db[SYNC].find({"_id": {"$regex": "^run:"}, **scope},
                                                    {"_id": 1})}
        gone |= held - {r.info.run_id for r in active}
    if not gone:
        return 0
    present = [d["run_id"] for d in db[TRAININGS].find({"_id": {"$in": sorted(gone)}},
                                                       {"run_id": 1})]
    stale = sorted(set(present) | {d["_id"][4:] for d in db[SYNC].find(
        {"_id": {"$in": [f"run:{r}" for r in gone]}}, {"_id": 1})})
    _delete_runs(db, stale)
    return len(stale)


TRAINING_FIELDS = (
    "run_name", "experiment", "experiment_id", "step", "model_name", "version", "parent_run_id",
    "num_classes", "class_names", "feature_extraction", "dropout", "batch_size", "learning_rate",
    "optimizer", "weight_decay", "early_stopping", "patience", "image_size", "weights",
    "dataset", "epochs_run", "max_epochs", "train_accuracy", "val_accuracy", "test_accuracy",
    "best_val_loss", "test_loss", "duration_sec", "start_time", "end_time", "status", "error",
    "model_uri", "params", "metrics", "tags", "registry", "mlflow_url", "explain_overview_url",
    "label_issues", "label_issues_url")
STATUS_FIELDS = ("run_name", "model_name", "start_time", "end_time", "current_epoch",
                 "max_epochs", "last_heartbeat", "error", "progress")


# --------------------------------------------------------------------------------------------
# One-shot and follow
# --------------------------------------------------------------------------------------------


def check_servers(tracking_uri: str, mongo_uri: str, timeout: float = 4.0) -> None:
    """Both servers answer, or a one-line MirrorError (well within 10 s for both)."""
    from components.services import ServiceError, check_mongo, check_tracking_server

    try:
        check_tracking_server(tracking_uri, timeout)
        check_mongo(mongo_uri, timeout)
    except ServiceError as exc:
        raise MirrorError(str(exc)) from None


def sync_once(tracking_uri: str, mongo_uri: str, options: SyncOptions) -> PassReport:
    """Check both servers, run one pass, close the connections."""
    check_servers(tracking_uri, mongo_uri)
    mongo = connect_mongo(mongo_uri)
    try:
        return sync_pass(MlflowClient(tracking_uri), database(mongo, mongo_uri), tracking_uri,
                         options)
    except MirrorError:
        raise
    except Exception as exc:  # noqa: BLE001 - a server that went away mid-pass
        raise MirrorError(f"sync failed: {_failure(exc)}") from None
    finally:
        mongo.close()


def tag_job_run(tracking_uri: str, job_run_id: str) -> None:
    """Under `mlflow run -e sync`, MLflow opened a run for the job: open it as `sync-vN`, so
    it is not mirrored as if it were a model (`cnnflow sync` has no job run, so no call)."""
    tracking.open_run(tracking.connect(tracking_uri), step="sync", adopt=job_run_id)


def _failure(exc: BaseException) -> str:
    """An unexpected exception as one masked line, its type first."""
    return mask_text(one_line(f"{type(exc).__name__}: {exc}"))[:300]


def _follow_error(exc: BaseException, mongo_uri: str) -> str:
    """One line for a failed pass. Mongo going away mid-pass raises the driver's error, whose
    text is a whole topology dump: say which server and what to do instead."""
    from pymongo.errors import ConnectionFailure

    from components.services import mongo_unreachable

    if isinstance(exc, MirrorError):
        return str(exc)
    if isinstance(exc, ConnectionFailure):  # refused, timed out, reset: not a bad request
        return mongo_unreachable(mongo_uri, exc, MONGO_TIMEOUT)
    return _failure(exc)


def follow(tracking_uri: str, mongo_uri: str, options: SyncOptions, interval: float = 2.0,
           log: Callable[[str], None] = logger.info, stop: Callable[[], bool] = lambda: False,
           max_backoff: float = 30.0) -> None:
    """Pass after pass until `stop()` says so; errors are logged and retried with back-off.

    Only the first pass honours `rebuild`; a server that comes back is caught up with, since
    the watermark did not move while passes failed.
    """
    first = True
    delay = interval
    mongo = None
    client = MlflowClient(tracking_uri)
    while not stop():
        began = time.monotonic()
        try:
            if mongo is None:  # first pass, or after an error: probe both, fail fast
                check_servers(tracking_uri, mongo_uri)
                mongo = connect_mongo(mongo_uri)
            opts = options if first else SyncOptions(**{**vars(options), "rebuild": False})
            report = sync_pass(client, database(mongo, mongo_uri), tracking_uri, opts)
            first = False
            if report.changed or report.deleted or delay > interval:
                log(report.line())
            delay = interval
        except Exception as exc:  # noqa: BLE001 - a follower outlives server outages
            log(f"sync error, retrying in {delay:g} s: {_follow_error(exc, mongo_uri)}")
            if mongo is not None:
                mongo.close()
                mongo = None
            _sleep(delay, stop)
            delay = min(max(delay * 2, interval), max_backoff)
            continue
        _sleep(max(interval - (time.monotonic() - began), 0.05), stop)
    if mongo is not None:
        mongo.close()


def _sleep(seconds: float, stop: Callable[[], bool]) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end and not stop():
        time.sleep(min(0.1, max(end - time.monotonic(), 0)))
