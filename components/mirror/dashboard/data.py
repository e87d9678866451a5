"""What the dashboard reads from the Mongo mirror: pure functions over a pymongo Database.

Kept apart from the Streamlit script so the queries can be tested and timed without a page
(tests/test_dashboard.py, benchmarks/dashboard_load.py). Every query projects only the fields
a view shows (a `trainings` document carries all params, metrics and tags, which a table of
1,000 runs must not drag over the wire) and filters on indexed keys: `epochs` by `run_id`
(the mirror's unique (run_id, epoch) index), `trainings` by `_id` or `start_time`. Nothing
here writes: the mirror belongs to `cnnflow sync`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import pandas as pd

from components import humanize
from components.mirror.sync import EPOCHS, STATUS, TRAININGS, safe_key
from components.names import DATASET_DIGEST_TAG

LIVE_STATUSES = ("in_progress", "died")
DIGEST_TAG = safe_key(DATASET_DIGEST_TAG)

# One colour per model in every view, so resnet18 is the same blue in the table's bar chart,
# the overlaid curves and the live panel. Models not listed get a stable colour from a hash.
MODEL_COLOURS: dict[str, str] = {
    "custom_cnn": "#1f77b4", "lenet5": "#ff7f0e", "convmixer": "#2ca02c",
    "resnet18": "#d62728", "resnet50": "#9467bd", "vgg16": "#8c564b",
    "mobilenetv2": "#e377c2", "efficientnet_b0": "#7f7f7f", "googlenet": "#bcbd22",
    "ensemble": "#17becf",
}
_SPARE_COLOURS = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd",
                  "#e6550d", "#31a354", "#756bb1", "#636363")

# What the comparison and time-filter tables load (the page picks and orders its columns);
# `registry` arrives as the run's aliases, `@champion @challenger`.
TABLE_FIELDS = ("run_id", "run_name", "model_name", "version", "experiment", "step", "status",
                "train_accuracy", "val_accuracy", "test_accuracy", "best_val_loss",
                "test_loss", "dropout", "batch_size", "learning_rate", "duration_sec",
                "start_time", "registry")
TRAIN_STEP = "train"
CHAMPION, CHALLENGER = "champion", "challenger"  # components.tracking.registry's aliases
NUMERIC_FIELDS = ("version", "train_accuracy", "val_accuracy", "test_accuracy", "best_val_loss",
                  "test_loss", "dropout", "batch_size", "learning_rate", "duration_sec")
DETAIL_FIELDS = ("run_id", "run_name", "experiment", "step", "model_name", "version",
                 "num_classes",
                 "feature_extraction", "dropout", "batch_size", "learning_rate",
                 "early_stopping", "patience", "weights", "image_size", "train_accuracy",
                 "val_accuracy", "test_accuracy", "best_val_loss", "test_loss", "duration_sec",
                 "start_time", "end_time", "status", "error", "epochs_run", "max_epochs",
                 "registry", "mlflow_url", "explain_overview_url", "label_issues",
                 "label_issues_url")
CURVE_FIELDS = ("run_id", "epoch", "train_loss", "val_loss", "train_acc", "val_acc")
LIVE_FIELDS = ("run_id", "run_name", "model_name", "status", "start_time", "current_epoch",
               "max_epochs", "last_heartbeat", "error")


def model_colour(model: str | None) -> str:
    """The fixed colour of a model; unknown names hash to a spare one (same name, same colour)."""
    name = model if isinstance(model, str) and model else "?"  # None / NaN from pandas
    if name in MODEL_COLOURS:
        return MODEL_COLOURS[name]
    index = int(hashlib.sha1(name.encode()).hexdigest(), 16) % len(_SPARE_COLOURS)
    return _SPARE_COLOURS[index]


def colour_map(models: Iterable[str | None]) -> dict[str, str]:
    """model -> colour for plotly's `color_discrete_map`."""
    return {m if isinstance(m, str) and m else "?": model_colour(m) for m in models}


def _projection(fields: Sequence[str]) -> dict[str, int]:
    return {"_id": 0, **{f: 1 for f in fields}}


def has_runs(db) -> bool:
    """Whether the mirror holds any run yet (one indexed probe, not a count)."""
    return db[TRAININGS].find_one({}, {"_id": 1}) is not None


def filter_options(db) -> dict[str, list[str]]:
    """Values the comparison filters offer: models, statuses, experiments, dataset digests."""
    def values(field: str) -> list[str]:
        return sorted(str(v) for v in db[TRAININGS].distinct(field) if v not in (None, ""))

    return {"models": values("model_name"), "statuses": values("status"),
            "experiments": values("experiment"), "digests": values(f"tags.{DIGEST_TAG}")}


def day_range(start: date, end: date) -> tuple[datetime, datetime]:
    """Whole UTC days from `start` to `end` inclusive, as a half-open datetime interval."""
    return (datetime.combine(start, time.min, UTC),
            datetime.combine(end + timedelta(days=1), time.min, UTC))


def parse_tag_filter(text: str) -> tuple[str, str | None] | None:
    """`key=value` (or a bare `key`: the tag is set) -> (key, value); blank -> None."""
    text = (text or "").strip()
    if not text:
        return None
    key, sep, value = text.partition("=")
    return key.strip(), (value.strip() if sep else None)


def runs_query(*, models: Sequence[str] = (), statuses: Sequence[str] = (),
               experiments: Sequence[str] = (), digests: Sequence[str] = (),
               tag: tuple[str, str | None] | None = None, start: datetime | None = None,
               end: datetime | None = None) -> dict[str, Any]:
    """The Mongo filter for the run tables; empty selections mean "any"."""
    query: dict[str, Any] = {}
    if models:
        query["model_name"] = {"$in": list(models)}
    if statuses:
        query["status"] = {"$in": list(statuses)}
    if experiments:
        query["experiment"] = {"$in": list(experiments)}
    if digests:
        query[f"tags.{DIGEST_TAG}"] = {"$in": list(digests)}
    if tag:
        key, value = tag
        field = f"tags.{safe_key(key)}"
        query[field] = {"$exists": True} if value is None else value
    if start is not None or end is not None:
        span: dict[str, datetime] = {}
        if start is not None:
            span["$gte"] = start
        if end is not None:
            span["$lt"] = end
        query["start_time"] = span
    return query


def load_runs(db, **filters: Any) -> pd.DataFrame:
    """The run table (TABLE_FIELDS columns, newest first) for the given filters (runs_query)."""
    cursor = db[TRAININGS].find(runs_query(**filters), _projection(TABLE_FIELDS))
    frame = pd.DataFrame(list(cursor), columns=list(TABLE_FIELDS))
    for column in NUMERIC_FIELDS:  # a column no run has comes back as object: make it float
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    frame["registry"] = frame["registry"].map(alias_text).astype(object)
    if not frame.empty:
        frame = frame.sort_values("start_time", ascending=False, na_position="last",
                                  kind="stable").reset_index(drop=True)
    return frame


def sort_runs(frame: pd.DataFrame, column: str, ascending: bool) -> pd.DataFrame:
    """The table ordered by one column; runs missing that value go last either way."""
    if frame.empty or column not in frame:
        return frame
    return frame.sort_values(column, ascending=ascending, na_position="last",
                             kind="stable").reset_index(drop=True)


def best_test_accuracy_by_model(frame: pd.DataFrame) -> pd.DataFrame:
    """model_name, best test accuracy, runs: the bar chart's data (unevaluated runs skipped)."""
    scored = frame.dropna(subset=["test_accuracy"]) if not frame.empty else frame
    if scored.empty:
        return pd.DataFrame(columns=["model_name", "test_accuracy", "runs"])
    grouped = scored.groupby(scored["model_name"].fillna("?"))
    return (pd.DataFrame({"test_accuracy": grouped["test_accuracy"].max(),
                          "runs": grouped["test_accuracy"].size()})
            .reset_index().sort_values("test_accuracy", ascending=False, kind="stable")
            .reset_index(drop=True))


def run_choices(db, search: str = "") -> list[dict[str, Any]]:
    """Runs for the detail picker (newest first), narrowed by a model / version / run id text."""
    fields = ("run_id", "run_name", "model_name", "version", "step", "start_time")
    docs = list(db[TRAININGS].find({}, _projection(fields)))
    docs.sort(key=lambda d: d.get("start_time") or datetime.min.replace(tzinfo=UTC),
              reverse=True)
    needle = search.strip().lower()
    if needle:
        docs = [d for d in docs if needle in run_label(d).lower()]
    return docs


def default_choice(choices: Sequence[dict[str, Any]]) -> int:
    """Where the detail picker starts: the newest training run (an ensemble or export run has
    no epochs or hyperparameters of its own), else the newest run."""
    return next((i for i, d in enumerate(choices) if d.get("step") == TRAIN_STEP), 0)


def run_label(doc: dict[str, Any]) -> str:
    """How a run is named in pickers: `lenet5 v1 — train · run id`, with the run name too
    when it says more than `lenet5-v1` (a fold, a trial)."""
    version = doc.get("version")
    head = f"{doc.get('model_name') or '?'} v{version if version is not None else '?'}"
    name = doc.get("run_name")
    named = f" · {name}" if name and name != head.replace(" v", "-v") else ""
    return f"{head} — {doc.get('step') or '?'}{named} · {doc.get('run_id', '')}"


def run_detail(db, run_id: str) -> dict[str, Any] | None:
    """One run's detail fields (no params/metrics/tags maps), or None if it is not mirrored."""
    return db[TRAININGS].find_one({"_id": run_id}, _projection(DETAIL_FIELDS))


def registry_aliases(doc: dict[str, Any]) -> list[str]:
    """`name vN @alias` for each registry version of the run that holds an alias."""
    out = []
    for version in (doc.get("registry") or {}).get("versions", []):
        for alias in version.get("aliases", []):
            out.append(f"{version.get('name')} v{version.get('version')} @{alias}")
    return out


def alias_text(registry: Any) -> str:
    """A run's registry aliases as the tables show them, `@champion @challenger` ("" if none)."""
    if not isinstance(registry, dict):
        return ""
    aliases = [a for v in registry.get("versions", []) for a in v.get("aliases", [])]
    return " ".join(f"@{a}" for a in dict.fromkeys(aliases))


def aliased(db, alias: str, experiments: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The runs whose registry version holds `alias` (one per registered model), with what the
    page says about them: `registered` is that version's `name vN`."""
    query: dict[str, Any] = {"registry.versions.aliases": alias}
    if experiments:
        query["experiment"] = {"$in": list(experiments)}
    fields = ("run_id", "model_name", "version", "experiment", "test_accuracy", "val_accuracy",
              "registry")
    out = []
    for doc in db[TRAININGS].find(query, _projection(fields)):
        for version in doc.get("registry", {}).get("versions", []):
            if alias in version.get("aliases", []):
                registered = f"{version.get('name')} v{version.get('version')}"
                out.append({**doc, "registered": registered})
    return sorted(out, key=lambda d: d["registered"])


def run_names(docs: Iterable[dict[str, Any]]) -> dict[str, str]:
    """run id -> `lenet5 v1`, the name charts and captions use; a name two runs share (same
    model and version in two experiments) gets the experiment, then the run id, added."""
    docs = list(docs)

    def version(doc: dict[str, Any]) -> str:
        value = doc.get("version")
        return "?" if value is None or pd.isna(value) else humanize.number(value, "version")

    names = {d["run_id"]: f"{d.get('model_name') or '?'} v{version(d)}" for d in docs}
    for extra in (lambda d: d.get("experiment") or "?", lambda d: d["run_id"][:8]):
        counts = pd.Series(list(names.values())).value_counts()
        names = {d["run_id"]: (f"{names[d['run_id']]} ({extra(d)})"
                               if counts[names[d["run_id"]]] > 1 else names[d["run_id"]])
                 for d in docs}
    return names


def load_curves(db, run_ids: Sequence[str]) -> pd.DataFrame:
    """Per-epoch losses and accuracies of the given runs (CURVE_FIELDS, by run then epoch)."""
    if not run_ids:
        return pd.DataFrame(columns=list(CURVE_FIELDS))
    cursor = db[EPOCHS].find({"run_id": {"$in": list(run_ids)}}, _projection(CURVE_FIELDS))
    frame = pd.DataFrame(list(cursor), columns=list(CURVE_FIELDS))
    return frame.sort_values(["run_id", "epoch"], kind="stable").reset_index(drop=True)


def live_runs(db, now: datetime | None = None) -> pd.DataFrame:
    """Running and died runs from `status`, with progress, elapsed time and heartbeat age."""
    now = now or datetime.now(UTC)
    docs = list(db[STATUS].find({"status": {"$in": list(LIVE_STATUSES)}},
                                _projection((*LIVE_FIELDS, "progress"))))
    columns = [*LIVE_FIELDS, "progress", "elapsed_sec", "heartbeat_age_sec", "epoch_fraction",
               "epoch_text"]
    if not docs:
        return pd.DataFrame(columns=columns)
    for doc in docs:
        beat = doc.pop("progress", None) or {}  # the heartbeat inside the current epoch
        doc["epoch_fraction"] = beat.get("fraction")
        doc["epoch_text"] = epoch_progress_text(beat) if beat.get("epoch") else None
        current, total = doc.get("current_epoch") or 0, doc.get("max_epochs")
        doc["progress"] = min(current / total, 1.0) if total else None
        start, beat = doc.get("start_time"), doc.get("last_heartbeat")
        doc["elapsed_sec"] = (now - _aware(start)).total_seconds() if start else None
        doc["heartbeat_age_sec"] = (now - _aware(beat)).total_seconds() if beat else None
    frame = pd.DataFrame(docs, columns=columns)
    return frame.sort_values(["status", "start_time"], ascending=[False, False],
                             kind="stable").reset_index(drop=True)


def epoch_progress_text(beat: dict[str, Any]) -> str:
    """`epoch 3/10 · batch 40/120 · 812 img/s`: a status document's heartbeat `progress`,
    each part only when the beat has it."""
    parts = [f"epoch {beat['epoch']}/{beat.get('epochs') or '?'}"]
    if beat.get("batch") is not None:
        parts.append(f"batch {beat['batch']}/{beat.get('batches') or '?'}")
    if beat.get("images_per_sec") is not None:
        parts.append(f"{humanize.significant(beat['images_per_sec'])} img/s")
    return " · ".join(parts)


def _aware(moment: datetime) -> datetime:
    """A client opened without tz_aware hands back naive UTC datetimes: make them aware."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def format_seconds(seconds: float | None) -> str:
    """humanize.duration (`12 s`, `3 min 07 s`, `1 h 02 min`), `—` when unknown."""
    if seconds is None or pd.isna(seconds):
        return "—"
    return humanize.duration(max(float(seconds), 0.0))
