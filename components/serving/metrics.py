"""Quality numbers of one split's predictions: loss, accuracy, Top-5, P/R/F1, calibration."""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

ECE_BINS = 15
_METRIC_NAME = re.compile(r"[^A-Za-z0-9_\-. /]")


def metric_key(name: str) -> str:
    """A class name as it can appear inside an MLflow metric name."""
    return _METRIC_NAME.sub("_", name)


def calibration_bins(confidence: np.ndarray, correct: np.ndarray,
                     bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Equal-width confidence bins: count, mean confidence and accuracy of each."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    out = []
    for b in range(bins):
        mask = index == b
        n = int(mask.sum())
        out.append({"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": n,
                    "confidence": float(confidence[mask].mean()) if n else 0.0,
                    "accuracy": float(correct[mask].mean()) if n else 0.0})
    return out


def expected_calibration_error(bins: list[dict[str, float]]) -> float:
    """ECE = sum over bins of (bin share) x |accuracy - confidence|."""
    total = sum(b["count"] for b in bins)
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"])
                     for b in bins if b["count"])) if total else 0.0


def classification_metrics(log_proba: torch.Tensor, labels: np.ndarray, classes: Sequence[str],
                           prefix: str) -> tuple[dict[str, float], dict[str, Any]]:
    """Every quality number of one split as MLflow metrics, plus the full report.

    Loss is the mean negative log-likelihood of the true class under the model's output
    (cross-entropy for a single model; for an ensemble, of its combined probabilities).
    """
    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import (
        classification_report,
        confusion_matrix,
        precision_recall_fscore_support,
        top_k_accuracy_score,
    )

    n_classes = len(classes)
    label_ids = list(range(n_classes))
    lp = log_proba.double().numpy()
    probs = np.exp(lp)
    preds = lp.argmax(1)
    nll = -lp[np.arange(len(labels)), labels]
    correct = preds == labels
    confusion = confusion_matrix(labels, preds, labels=label_ids)  # rows: true, columns: predicted

    metrics: dict[str, float] = {f"{prefix}loss": float(nll.mean()),
                                 f"{prefix}acc": float(correct.mean())}
    if n_classes >= 5:
        with warnings.catch_warnings():  # with exactly 5 classes Top-5 is 1: sklearn warns
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            metrics[f"{prefix}top5_acc"] = float(top_k_accuracy_score(labels, lp, k=5,
                                                                      labels=label_ids))
    for avg in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, preds, labels=label_ids,
                                                     average=avg, zero_division=0)
        metrics.update({f"{prefix}precision_{avg}": float(p), f"{prefix}recall_{avg}": float(r),
                        f"{prefix}f1_{avg}": float(f)})
    per_class = []
    for i, name in enumerate(classes):
        mask = labels == i
        n = int(mask.sum())
        row = {"class": name, "count": n,
               "accuracy": float(correct[mask].mean()) if n else None,
               "loss": float(nll[mask].mean()) if n else None}
        per_class.append(row)
        if n:  # a class absent from the split has no accuracy; logging 0 would be a lie
            metrics[f"{prefix}acc_{metric_key(name)}"] = row["accuracy"]
            metrics[f"{prefix}loss_{metric_key(name)}"] = row["loss"]
    bins = calibration_bins(probs.max(1), correct)
    metrics[f"{prefix}ece"] = expected_calibration_error(bins)
    report = {
        "n": int(len(labels)), "classes": list(classes),
        "metrics": {k.removeprefix(prefix): v for k, v in metrics.items()},
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "sklearn": classification_report(labels, preds, labels=label_ids,
                                         target_names=list(classes), output_dict=True,
                                         zero_division=0),
        "calibration_bins": bins,
    }
    return metrics, report


# --------------------------------------------------------------------------------------------
