"""One table of an experiment's models: quality, cost and the hyperparameters that differ.

The seeds compared models in hand-made tables (model, version, train/val/test accuracy,
dropout, batch size, learning rate) and chose by cost as well as accuracy; `compare_runs`
builds that table from MLflow (training and ensemble runs; `cnnflow evaluate` fills in the
test and cost columns), `sort_rows` orders it by any column in the column's better-first
direction, and `write_table` saves it as CSV and Markdown.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException

from components.errors import CnnflowError
from components.files import columns_of, write_csv
from components.names import MODEL_TAG, STEP_TAG, VERSION_TAG
from components.tracking import registry

# column -> its source: ("metric", names...), ("param", name), ("tag", name), ("info", attr)
COLUMNS: dict[str, tuple[str, ...]] = {
    "run": ("info", "run_name"),
    "model": ("tag", MODEL_TAG),
    "version": ("tag", VERSION_TAG),
    "step": ("tag", STEP_TAG),
    "status": ("info", "status"),
    "train_acc": ("metric", "train_acc"),
    "val_acc": ("metric", "best_val_acc", "val_acc"),
    "test_acc": ("metric", "test_acc"),
    "test_loss": ("metric", "test_loss"),
    "test_top5_acc": ("metric", "test_top5_acc"),
    "test_f1_macro": ("metric", "test_f1_macro"),
    "test_ece": ("metric", "test_ece"),
    "params_count": ("metric", "params_count"),
    "model_size_mb": ("metric", "model_size_mb"),
    "latency_ms_p50": ("metric", "latency_ms_p50"),
    "latency_ms_p95": ("metric", "latency_ms_p95"),
    "throughput_images_per_sec": ("metric", "throughput_images_per_sec"),
    "peak_memory_mb": ("metric", "peak_memory_mb"),
    "epochs_run": ("metric", "epochs_run"),
    "lr": ("param", "lr"),
    "batch_size": ("param", "batch_size"),
    "epochs": ("param", "epochs"),
    "image_size": ("param", "image_size"),
    "dropout": ("param", "dropout"),
    "optimizer": ("param", "optimizer"),
    "weights": ("param", "weights"),
    "freeze": ("param", "freeze"),
    "augmentation": ("param", "augmentation"),
    "vote": ("param", "vote"),
    "registry": ("registry",),
    "run_id": ("info", "run_id"),
}
STEPS = ("train", "ensemble")
INTEGER_COLUMNS = {"params_count", "epochs_run"}
_INTEGER = re.compile(r"^-?\d+$")
_NUMBER = re.compile(r"^-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class ComparisonError(CnnflowError, RuntimeError):
    """Bad compare input; one line saying what to do."""


def _value(text: str | None) -> Any:
    """Params are strings in MLflow: give numbers back their type so they sort as numbers."""
    if text is None:
        return None
    if _INTEGER.match(text):
        return int(text)
    if _NUMBER.match(text):
        return float(text)
    return text


def _registry_labels(client: MlflowClient, run_ids: list[str]) -> dict[str, str]:
    """run id -> 'name v3 @champion' for every registry version made from that run."""
    labels: dict[str, list[str]] = {}
    aliases_of = registry.AliasLookup(client)
    for start in range(0, len(run_ids), 100):
        chunk = run_ids[start:start + 100]
        quoted = ",".join(f"'{r}'" for r in chunk)
        try:
            versions = client.search_model_versions(f"run_id IN ({quoted})", max_results=10000)
        except MlflowException:
            return {}
        for v in versions:
            alias = "".join(f" @{a}" for a in aliases_of(v.name, v.version))
            labels.setdefault(v.run_id, []).append(f"{v.name} v{v.version}{alias}")
    return {k: "; ".join(sorted(v)) for k, v in labels.items()}


def compare_runs(client: MlflowClient, experiment: str) -> list[dict[str, Any]]:
    """One row per training or ensemble run of the experiment (newest first)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ComparisonError(f"experiment '{experiment}' does not exist: pass the name "
                              "cnnflow train used (the dataset's name by default)")
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ACTIVE_ONLY,
                              max_results=50000, order_by=["attributes.start_time DESC"])
    runs = [r for r in runs if r.data.tags.get(STEP_TAG) in STEPS]
    labels = _registry_labels(client, [r.info.run_id for r in runs])
    rows = []
    for run in runs:
        row: dict[str, Any] = {}
        for column, (kind, *names) in COLUMNS.items():
            if kind == "info":
                row[column] = getattr(run.info, names[0])
            elif kind == "tag":
                row[column] = _value(run.data.tags.get(names[0]))
            elif kind == "param":
                row[column] = _value(run.data.params.get(names[0]))
            elif kind == "metric":
                row[column] = next((run.data.metrics[n] for n in names
                                    if n in run.data.metrics), None)
            else:
                row[column] = labels.get(run.info.run_id, "")
        rows.append(row)
    return rows


def sort_rows(rows: list[dict[str, Any]], column: str, reverse: bool = False
              ) -> list[dict[str, Any]]:
    """Better first: descending for scores, ascending for losses, cost and text; empty last."""
    if column not in COLUMNS:
        raise ComparisonError(f"unknown column '{column}' for --sort: use one of "
                              f"{', '.join(COLUMNS)}")
    numeric = all(isinstance(r[column], int | float) for r in rows if r[column] is not None)
    descending = numeric and not registry.lower_is_better(column) and column not in (
        "version", "lr", "batch_size", "epochs", "image_size", "dropout")
    if reverse:
        descending = not descending
    present = [r for r in rows if r[column] not in (None, "")]
    missing = [r for r in rows if r[column] in (None, "")]
    key = (lambda r: r[column]) if numeric else (lambda r: str(r[column]))
    return sorted(present, key=key, reverse=descending) + missing


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A GitHub-flavoured Markdown table; floats with 4 significant decimals, empty when absent."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(format_cell(row.get(c), c).replace("|", "\\|") for c in columns)
              + " |" for row in rows]
    return "\n".join(lines) + "\n"


def format_cell(value: Any, column: str = "") -> str:
    """Floats with 4 decimals; counts (metrics are floats in MLflow) as integers."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if column in INTEGER_COLUMNS and isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.0f}"
    return str(value)


def text_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Fixed-width columns for the terminal."""
    cells = [[format_cell(r.get(c), c) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def write_table(rows: list[dict[str, Any]], folder: Path, stem: str,
                columns: list[str] | None = None) -> tuple[Path, Path]:
    """`<stem>.csv` and `<stem>.md` (columns: given, else every key in first-seen order)."""
    columns = columns_of(rows) if columns is None else columns
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(folder / f"{stem}.csv", rows, columns)
    md_path = folder / f"{stem}.md"
    md_path.write_text(markdown_table(rows, columns))
    return csv_path, md_path


def useful_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Columns with at least one value (a table of CNNs needs no `vote` column)."""
    return [c for c in COLUMNS if any(r.get(c) not in (None, "") for r in rows)]


def report_stem(experiment: str) -> str:
    return "compare-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment)
