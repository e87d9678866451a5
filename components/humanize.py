"""Numbers and names as people read them: one place for the report, the dashboard and the
command line, so `test_acc 0.9388` reads "test accuracy 93.9 %" everywhere.

`label(name)` is a metric's or column's human label; `number(value, name)` formats a value by
what the name measures (a share as %, latency in ms and sizes in MB with 3 significant digits,
parameter counts as `11.2 M`, counts with thousands separators); `plural(n, word)` is
"1 finding" / "3 findings". Import-light (no torch, no mlflow): the CLI's help reads it.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any

# Human labels for the names cnnflow logs; other names fall back to `_fallback_label`.
LABELS: dict[str, str] = {
    "run": "run", "model": "model", "version": "version", "format": "format", "step": "step",
    "status": "status", "registry": "registry", "run_id": "run id",
    "train_acc": "train accuracy", "val_acc": "val accuracy", "best_val_acc": "best val accuracy",
    "test_acc": "test accuracy", "test_loss": "test loss", "train_loss": "train loss",
    "val_loss": "val loss", "best_val_loss": "best val loss",
    "test_top5_acc": "test top-5 accuracy", "test_f1_macro": "test F1 (macro)",
    "val_f1_macro": "val F1 (macro)", "val_top5_acc": "val top-5 accuracy",
    "test_ece": "test calibration error (ECE)",
    "params_count": "parameters", "model_size_mb": "model size",
    "latency_ms_p50": "latency p50", "latency_ms_p95": "latency p95",
    "throughput_images_per_sec": "throughput", "peak_memory_mb": "peak memory",
    "latency_speedup": "speed-up", "test_acc_delta": "test accuracy change",
    "max_abs_prob_diff": "max probability difference", "top1_agreement": "top-1 agreement",
    "gate": "gate", "epochs_run": "epochs run", "best_epoch": "best epoch",
    "lr": "learning rate", "learning_rate": "learning rate", "batch_size": "batch size",
    "epochs": "epochs", "image_size": "image size", "dropout": "dropout",
    "optimizer": "optimizer", "weights": "weights", "freeze": "freeze",
    "augmentation": "augmentation", "vote": "vote", "duration_sec": "duration",
    "start_time": "start time", "end_time": "end time", "epoch_time_sec": "epoch time",
    "num_classes": "classes", "max_epochs": "max epochs", "model_name": "model",
    "train_images_per_sec": "train throughput",
    "n_images": "images", "n_classes": "classes", "n_corrupt": "unreadable files",
    "n_exact_duplicates": "exact duplicates", "n_cross_split_duplicates":
        "images in more than one split", "n_label_conflicts": "images under two classes",
    "n_near_duplicate_groups": "near-duplicate groups",
    "n_near_dup_within_class": "near-duplicates within a class",
    "n_near_dup_label_conflicts": "near-duplicates across classes",
    "n_near_dup_cross_split": "near-duplicates across splits",
    "n_label_issues": "likely label issues", "imbalance_ratio": "imbalance ratio",
}

# Which kind of number a name holds: first matching pattern wins.
_SHARE = re.compile(r"(^|_)(acc|accuracy|f1|f1_macro|agreement|ratio_share)(_|$)|top1_agreement")
_KINDS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"_delta$"), "share_delta"),
    (re.compile(r"(^|_)ece$"), "share"),
    (_SHARE, "share"),
    (re.compile(r"latency|_ms(_|$)"), "ms"),
    (re.compile(r"_mb$"), "mb"),
    (re.compile(r"^params_count$|^n_params$"), "millions"),
    (re.compile(r"per_sec$|throughput"), "rate"),
    (re.compile(r"_sec$|^duration"), "seconds"),
    (re.compile(r"^(lr|learning_rate)$|prob_diff$"), "small"),
    (re.compile(r"speedup$"), "times"),
    (re.compile(r"^(n_|epochs|best_epoch|batch_size|image_size|seed)"), "count"),
]


def _fallback_label(name: str) -> str:
    return name.removeprefix("n_").replace("_", " ")


def label(name: str) -> str:
    """The human label of a metric, parameter or column name."""
    return LABELS.get(name, _fallback_label(name))


def kind(name: str) -> str:
    """What a name measures (`share`, `ms`, `mb`, `millions`, `rate`, `seconds`, `count`,
    `small`, `times`, `share_delta`), or `plain`."""
    return next((k for pattern, k in _KINDS if pattern.search(name)), "plain")


def significant(value: float, digits: int = 3) -> str:
    """`value` with `digits` significant digits, no scientific notation for everyday sizes."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:,.{decimals}f}"


def number(value: Any, name: str = "") -> str:
    """A value for people: empty for missing/NaN, else formatted by what `name` measures.

    Text passes through; booleans read `yes`/`no`; datetimes `2025-01-31 14:05 UTC`; floats
    that are whole counts lose `.0`.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, datetime):  # pandas' NaT is a datetime unequal to itself: missing
        return moment(value) if value == value else ""
    if isinstance(value, str):
        try:
            value = float(value) if re.fullmatch(r"-?[\d.]+(e-?\d+)?", value) else value
        except ValueError:
            pass
        if isinstance(value, str):
            return value
    value = float(value)
    k = kind(name)
    if k == "share":
        return f"{value * 100:.1f} %"
    if k == "share_delta":
        return f"{value * 100:+.1f} pp"
    if k == "ms":
        return f"{significant(value)} ms"
    if k == "mb":
        return f"{significant(value)} MB"
    if k == "millions":
        if value >= 1e6:
            return f"{value / 1e6:.1f} M"
        return f"{value / 1e3:.1f} k" if value >= 1e3 else f"{value:.0f}"
    if k == "rate":
        return f"{significant(value)}/s"
    if k == "seconds":
        return duration(value)
    if k == "times":
        return f"{value:.2f}x"
    if k == "small":
        return f"{value:g}"
    if k == "count" or value.is_integer():
        return f"{value:,.0f}"
    return f"{value:.4g}"


def moment(value: datetime) -> str:
    """`2025-01-31 14:05 UTC`: a point in time, naive ones read as UTC (the mirror stores UTC)."""
    utc = value.astimezone(UTC) if value.tzinfo else value
    return f"{utc:%Y-%m-%d %H:%M} UTC"


def duration(seconds: float) -> str:
    """`4.2 s`, `3 min 05 s`, `1 h 02 min`."""
    if seconds < 60:
        return f"{significant(seconds, 2)} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def ago(seconds: float) -> str:
    """How long ago, as short as a dashboard tile needs: `12 s ago`, `31 min ago`,
    `2 h 01 min ago`."""
    if seconds < 60:
        return f"{seconds:.0f} s ago"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min ago"
    return f"{duration(seconds)} ago"


def plural(count: float, word: str, many: str | None = None) -> str:
    """`1 finding`, `0 findings`, `3 images`; `many` for irregular plurals."""
    n = int(count) if float(count).is_integer() else count
    return f"{n:,} {word if n == 1 else (many or word + 's')}"
