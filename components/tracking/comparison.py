"""One table of an experiment's models: quality, cost and the hyperparameters that differ.

The seeds compared models in hand-made tables (model, version, train/val/test accuracy,
dropout, batch size, learning rate) and chose by cost as well as accuracy; `compare_runs`
builds that table from MLflow (training and ensemble runs; `cnnflow evaluate` fills in the
test and cost columns), `sort_rows` orders it by any column in the column's better-first
direction, and `write_table` saves it as CSV and Markdown.

Those rows are the `pytorch` format. A finished `cnnflow export` run adds rows beside its
source run's: its PyTorch reference and each format it checked (`onnx`, `int8`), all timed
side by side, with the export's `<format>.<metric>` figures under the same column names
(test_acc, model_size_mb, latency_ms_p50, ...), so sorting by a column compares formats; plus
the parity check, the gate and the registry version each format became.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException

from components.errors import CnnflowError
from components.files import columns_of, write_csv
from components.names import (
    EXPORT_GATE_TAG,
    FORMAT_TAG,
    MODEL_TAG,
    SOURCE_MODEL_TAG,
    SOURCE_RUN_TAG,
    STEP_TAG,
    VERSION_TAG,
)
from components.tracking import registry

# column -> its source: ("metric", names...), ("param", name), ("tag", name), ("info", attr)
COLUMNS: dict[str, tuple[str, ...]] = {
    "run": ("info", "run_name"),
    "model": ("tag", MODEL_TAG),
    "version": ("tag", VERSION_TAG),
    "format": ("format",),
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
    # Export rows only: the export run's check of the format against the PyTorch model.
    "latency_speedup": ("export",),  # PyTorch's latency p50 / the format's, same run
    "test_acc_delta": ("export", "test_acc_delta"),
    "max_abs_prob_diff": ("export", "max_abs_prob_diff"),
    "top1_agreement": ("export", "top1_agreement"),
    "gate": ("export",),  # passed, or `rejected: <reason>`
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
EXPORT_STEP = "export"  # the runs `cnnflow export` writes (its tags: components.names)
REFERENCE_FORMAT = "pytorch"
SOURCE_RUN_ID = "source_run_id"  # a key of export rows (not a column): the run exported
# Sorted ascending although `registry.lower_is_better` does not call them costs.
ASCENDING = ("version", "lr", "batch_size", "epochs", "image_size", "dropout",
             "max_abs_prob_diff")
INTEGER_COLUMNS = {"params_count", "epochs_run"}
SCIENTIFIC_COLUMNS = {"max_abs_prob_diff"}  # 1e-7 is no 0.0000
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


def _registry_labels(client: MlflowClient, run_ids: list[str]
                     ) -> dict[tuple[str, str], str]:
    """(run id, format) -> 'name v3 @champion' for every registry version made from that run;
    the format is the version's `cnnflow.format` tag, `pytorch` without one."""
    labels: dict[tuple[str, str], list[str]] = {}
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
            key = (v.run_id, (v.tags or {}).get(FORMAT_TAG) or REFERENCE_FORMAT)
            labels.setdefault(key, []).append(f"{v.name} v{v.version}{alias}")
    return {k: "; ".join(sorted(v)) for k, v in labels.items()}


def compare_runs(client: MlflowClient, experiment: str) -> list[dict[str, Any]]:
    """One row per training or ensemble run of the experiment (newest first, format
    `pytorch`), each followed by the rows of its finished export runs (newest export first:
    the PyTorch reference, then each format; `source_run_id` names the run exported)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ComparisonError(f"experiment '{experiment}' does not exist: pass the name "
                              "cnnflow train used (the dataset's name by default)")
    runs = client.search_runs([exp.experiment_id], run_view_type=ViewType.ACTIVE_ONLY,
                              max_results=50000, order_by=["attributes.start_time DESC"])
    exports = [r for r in runs if r.data.tags.get(STEP_TAG) == EXPORT_STEP
               and r.info.status == "FINISHED"]
    runs = [r for r in runs if r.data.tags.get(STEP_TAG) in STEPS]
    labels = _registry_labels(client, [r.info.run_id for r in runs + exports])
    rows = {run.info.run_id: _model_row(run, labels) for run in runs}
    formats: dict[str, list[dict[str, Any]]] = {}
    unplaced = []
    for run in exports:
        source_id = run.data.tags.get(SOURCE_RUN_TAG, "")
        source = rows.get(source_id) or _source_row(client, source_id, labels)
        made = _format_rows(run, source, labels)
        if source_id in rows:
            formats.setdefault(source_id, []).extend(made)
        else:
            unplaced += made  # exported from another experiment's run
    table = []
    for run_id, row in rows.items():
        table += [row, *formats.get(run_id, [])]
    return table + unplaced


def _model_row(run: Run, labels: dict[tuple[str, str], str]) -> dict[str, Any]:
    """A training or ensemble run's row: the PyTorch model as `cnnflow evaluate` measured it."""
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
        elif kind == "format":
            row[column] = REFERENCE_FORMAT
        elif kind == "registry":
            row[column] = labels.get((run.info.run_id, REFERENCE_FORMAT), "")
        else:
            row[column] = None
    return row


def _source_row(client: MlflowClient, run_id: str, labels: dict[tuple[str, str], str]
                ) -> dict[str, Any]:
    """The exported run's row when it lives in another experiment ({} when it is gone)."""
    try:
        return _model_row(client.get_run(run_id), labels) if run_id else {}
    except MlflowException:
        return {}


def _format_rows(run: Run, source: dict[str, Any], labels: dict[tuple[str, str], str]
                 ) -> list[dict[str, Any]]:
    """One row per format an export run measured: its PyTorch reference (`pytorch`, timed
    side by side with the formats), then each format checked (in `--formats` order). The
    run's `<format>.<m>` metrics go under the PyTorch columns' names; model, version and
    hyperparameters are the source's (the same weights); then the parity check, the gate
    and the registry version the format became."""
    metrics, tags = run.data.metrics, run.data.tags
    order = run.data.params.get("formats", "").split(",")
    found = [k.removesuffix(".passed") for k in metrics if k.endswith(".passed")]
    found.sort(key=lambda f: order.index(f) if f in order else len(order))
    if f"{REFERENCE_FORMAT}.test_acc" in metrics:
        found.insert(0, REFERENCE_FORMAT)
    reference = metrics.get(f"{REFERENCE_FORMAT}.latency_ms_p50")
    rows = []
    for fmt in found:
        row: dict[str, Any] = {}
        for column, (kind, *names) in COLUMNS.items():
            if kind == "info":
                row[column] = getattr(run.info, names[0])
            elif kind == "param":
                row[column] = source.get(column)
            elif kind in ("metric", "export") and names:
                row[column] = next((metrics[f"{fmt}.{n}"] for n in names
                                    if f"{fmt}.{n}" in metrics), None)
            else:
                row[column] = None
        latency, passed = row["latency_ms_p50"], metrics.get(f"{fmt}.passed")
        gate = None if passed is None else "passed" if passed == 1.0 else tags.get(
            EXPORT_GATE_TAG.format(fmt), "rejected")
        # The reference was registered by the run it came from (its own row says so).
        registered = ("" if fmt == REFERENCE_FORMAT
                      else labels.get((run.info.run_id, fmt), ""))
        row.update({
            "model": tags.get(SOURCE_MODEL_TAG) or source.get("model"),
            "version": source.get("version"), "format": fmt, "step": EXPORT_STEP,
            "latency_speedup": reference / latency if reference and latency else None,
            "gate": gate, "registry": registered,
            SOURCE_RUN_ID: tags.get(SOURCE_RUN_TAG, "")})
        rows.append(row)
    return rows


def sort_rows(rows: list[dict[str, Any]], column: str, reverse: bool = False
              ) -> list[dict[str, Any]]:
    """Better first: descending for scores, ascending for losses, cost and text; empty last."""
    if column not in COLUMNS:
        raise ComparisonError(f"unknown column '{column}' for --sort: use one of "
                              f"{', '.join(COLUMNS)}")
    numeric = all(isinstance(r[column], int | float) for r in rows if r[column] is not None)
    descending = numeric and not registry.lower_is_better(column) and column not in ASCENDING
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
    """Floats with 4 decimals (parity differences in scientific notation); counts (metrics
    are floats in MLflow) as integers."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if column in INTEGER_COLUMNS and isinstance(value, float) and value.is_integer():
        return str(int(value))
    if column in SCIENTIFIC_COLUMNS and isinstance(value, float):
        return f"{value:.1e}"
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


# `cnnflow compare`'s table by default: who, quality, cost, where it is registered; `format`
# only when the experiment has exports. `--columns` picks others (`all`: every column).
DEFAULT_COLUMNS = ("run", "format", "val_acc", "test_acc", "latency_ms_p50", "model_size_mb",
                   "registry")
TERMINAL_WIDTH = 120
_MIN_TEXT_WIDTH = 8  # a text column shrinks (ending in "…") no narrower than this


def check_columns(names: list[str], option: str) -> None:
    """One line naming an unknown column and listing the known ones, before any server call."""
    unknown = [n for n in names if n not in COLUMNS]
    if unknown:
        raise ComparisonError(f"unknown column '{unknown[0]}' for {option}: use one of "
                              f"{', '.join(COLUMNS)}")


def shown_columns(rows: list[dict[str, Any]], picked: list[str] | None, sort: str
                  ) -> list[str]:
    """The terminal's columns: `picked` as given, else the defaults that have a value (plus
    the sort column, before `registry`); `format` only beside exports."""
    if picked:
        return picked
    useful = set(useful_columns(rows))
    columns = [c for c in DEFAULT_COLUMNS if c in useful]
    if all(r.get("format") in (None, REFERENCE_FORMAT) for r in rows) and "format" in columns:
        columns.remove("format")
    if sort not in columns and sort in useful:
        columns.insert(columns.index("registry") if "registry" in columns else len(columns),
                       sort)
    return columns


def readable_table(rows: list[dict[str, Any]], columns: list[str],
                   width: int = TERMINAL_WIDTH) -> str:
    """The terminal table: human headers and numbers (`components.humanize`, as in the
    report), numbers right-aligned, and text columns shortened with "…" (widest first) until
    a line fits `width`. The CSV keeps the raw values."""
    from components.humanize import label, number

    headers = [label(c) for c in columns]
    cells = [[number(r.get(c), c) for c in columns] for r in rows]
    numeric = [all(not isinstance(r.get(c), str) for r in rows) for c in columns]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    floor = [widths[i] if numeric[i] else min(widths[i], max(_MIN_TEXT_WIDTH, len(h)))
             for i, h in enumerate(headers)]
    excess = sum(widths) + 2 * (len(columns) - 1) - width
    while excess > 0:
        shrinkable = [i for i in range(len(columns)) if widths[i] > floor[i]]
        if not shrinkable:
            break
        widest = max(shrinkable, key=lambda i: widths[i])
        cut = min(excess, widths[widest] - floor[widest])
        widths[widest] -= cut
        excess -= cut

    def cell(text: str, i: int) -> str:
        text = text if len(text) <= widths[i] else text[:widths[i] - 1] + "…"
        return text.rjust(widths[i]) if numeric[i] else text.ljust(widths[i])

    lines = [[cell(h, i) for i, h in enumerate(headers)],
             *([cell(v, i) for i, v in enumerate(row)] for row in cells)]
    return "\n".join("  ".join(line).rstrip() for line in lines)


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
