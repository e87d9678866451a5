"""`train --cv K`: stratified K-fold cross-validation as a parent run with one run per fold.

The MNIST and jellyfish seeds judged models on small datasets by K-fold CV (ConvMixer 27 % ->
73 % with K-fold): one 20 % validation split of 39 images is too noisy to compare models.
Here the folds cover train + val (the test split stays untouched, so `evaluate` still has
images no fold ever saw); fold i trains on the other K-1 folds and validates on fold i. Each
fold is an ordinary training run (same engine, params, artifacts, logged manifest and digest)
nested under a `cv-vN` parent that logs the mean and standard deviation of the folds' final
metrics, a per-fold table and a chart. `--cv-ensemble true` then soft-votes the K fold
models into one ensemble run (components.steps.ensemble), nested under the parent as well.

Each fold's best weights also predict that fold's held-out images once trained (in memory,
no download of the logged model), so every train+val image gets exactly one out-of-fold
prediction: `cv/oof_probabilities.csv` on the parent (path relative to the dataset root,
label, fold, prob_<class>...). `cnnflow label-issues` ranks likely mislabelled images from
it (components.steps.label_issues); `--find-label-issues true` runs that right after.
`--exclude-file` leaves listed images out before the folds are dealt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from components import tracking
from components.data.datasets import DatasetSplits, load_splits
from components.files import write_csv
from components.names import (
    CLASS_NAMES_TAG,
    CV_PARENT_TAG,
    DATA_ROOT_TAG,
    DATASET_DIGEST_TAG,
    DATASET_TAG,
    FOLD_TAG,
    MODEL_TAG,
)
from components.nn.engine import Callback, FitResult, load_checkpoint, resolve_device
from components.steps.params import EnsembleParams, LabelIssuesParams, TrainParams
from components.steps.train import (
    TrainingError,
    TrainOutcome,
    exclude_listed,
    log_excluded,
    model_config,
    train,
)

if TYPE_CHECKING:
    from components.steps.label_issues import LabelIssuesOutcome

# Fold-run metric -> the name of its mean/std on the parent (cv_<name>_mean, cv_<name>_std).
CV_METRICS = {"best_val_acc": "val_acc", "best_val_loss": "val_loss",
              "best_epoch": "best_epoch", "epochs_run": "epochs_run"}


def make_folds(splits: DatasetSplits, k: int, seed: int) -> list[list[tuple[str, int]]]:
    """K stratified folds of train + val, the same for a seed on every machine.

    Each class's images are ordered by a seeded hash of their relative path (as the split
    itself is), then dealt round-robin into the folds, starting where the previous class
    stopped, so fold sizes differ by at most one and each class is spread evenly.
    """
    pool = splits.train + splits.val
    by_class: dict[int, list[tuple[str, int]]] = {}
    for item in pool:
        by_class.setdefault(item[1], []).append(item)
    smallest = min(len(items) for items in by_class.values())
    if smallest < k:
        name = splits.classes[min(by_class, key=lambda c: len(by_class[c]))]
        raise TrainingError(f"cv={k} needs at least {k} train+val images per class; class "
                            f"'{name}' has {smallest}: lower --cv or add images")
    folds: list[list[tuple[str, int]]] = [[] for _ in range(k)]
    start = 0
    for label in sorted(by_class):
        ordered = sorted(by_class[label], key=lambda item: hashlib.sha256(
            f"{seed}\0cv\0{splits.relpath(item[0])}".encode()).hexdigest())
        for i, item in enumerate(ordered):
            folds[(start + i) % k].append(item)
        start = (start + len(ordered)) % k
    return folds


def fold_sample(folds: list[list[tuple[str, int]]], i: int
                ) -> Callable[[DatasetSplits], DatasetSplits]:
    """train()'s sample hook for fold i: train on the other folds, validate on fold i."""
    def sample(splits: DatasetSplits) -> DatasetSplits:
        train_items = [item for j, fold in enumerate(folds) if j != i for item in fold]
        return dataclasses.replace(splits, train=train_items, val=list(folds[i]))
    return sample


@dataclass
class CvOutcome:
    run_id: str
    run_name: str
    folds: list[TrainOutcome]
    metrics: dict[str, float]
    table: list[dict[str, Any]] = field(default_factory=list)
    ensemble_run_id: str = ""
    url: str = ""
    label_issues: LabelIssuesOutcome | None = None


class BestWeights(Callback):
    """Keeps a fold's best weights in memory when its training ends, before the run's
    checkpoint folder goes: the out-of-fold predictions need no download of the model."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None

    def on_train_end(self, result: FitResult) -> None:
        path = result.best_path or result.last_path
        self.state = load_checkpoint(path)["model"] if path is not None else None


def out_of_fold(params: TrainParams, splits: DatasetSplits, fold: list[tuple[str, int]],
                index: int, state: dict[str, Any]) -> list[dict[str, Any]]:
    """Fold `index`'s held-out images predicted by the weights trained without them: one row
    each (path relative to the dataset root, label, fold, prob_<class> per class), through
    the logged model's own preprocessing and forward pass (ImageClassifier)."""
    from components.serving.classifier import ImageClassifier
    from components.serving.predict import predict_samples

    model = ImageClassifier().build(model_config(params, splits.classes), state)
    model.to(resolve_device(params.device))
    probs = predict_samples(model, fold, batch_size=params.batch_size).probs
    return [{"path": splits.relpath(path), "label": splits.classes[label], "fold": index,
             **{f"prob_{c}": float(p) for c, p in zip(splits.classes, row, strict=True)}}
            for (path, label), row in zip(fold, probs, strict=True)]


def run_cv(params: TrainParams, tracking_uri: str, *, progress: bool | None = None,
           log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
           job_run_id: str | None = None) -> CvOutcome:
    """Train params.cv folds as nested runs under a `cv-vN` parent; log their mean and std.
    `job_run_id`: the run opened for this job, filled in as the parent instead of a new one."""
    params.validate()
    if params.resume:
        raise TrainingError("--resume does not combine with --cv: run the cross-validation "
                            "again")
    client = tracking.connect(tracking_uri)
    splits = load_splits(params.data, val_ratio=params.val_ratio,
                         test_ratio=params.test_ratio, seed=params.seed)
    splits, excluded = exclude_listed(splits, params.exclude_file)
    folds = make_folds(splits, params.cv, params.seed)
    run_id, exp_id, run_name = tracking.open_run(
        client, step="cv", experiment=params.experiment or splits.name, adopt=job_run_id,
        tags={MODEL_TAG: params.model})
    with tracking.ending_run(client, run_id):
        present = client.get_run(run_id).data.params  # `mlflow run` logged its -P values
        logged = {k: v for k, v in params.logged().items() if k not in present}
        tracking.log_params_and_tags(client, run_id, logged, {
            DATASET_TAG: splits.name, DATASET_DIGEST_TAG: splits.digest(),
            CLASS_NAMES_TAG: ",".join(splits.classes), DATA_ROOT_TAG: str(splits.root)})
        if params.exclude_file:
            with tempfile.TemporaryDirectory(prefix="cnnflow-cv-") as tmp:
                log_excluded(client, run_id, params.exclude_file, excluded, Path(tmp))
        fold_params = dataclasses.replace(params, experiment="")
        outcomes, oof = [], []
        for i in range(params.cv):
            n_train = len(splits.train) + len(splits.val) - len(folds[i])
            log(f"cv fold {i + 1}/{params.cv}: train {n_train}, val {len(folds[i])}")
            tags = {FOLD_TAG: str(i), CV_PARENT_TAG: run_id,
                    "cnnflow.fold_n_train": str(n_train), "cnnflow.fold_n_val": str(len(folds[i]))}
            best = BestWeights()
            outcomes.append(train(fold_params, tracking_uri, progress=progress, log=log,
                                  train_sample=fold_sample(folds, i), parent_run_id=run_id,
                                  run_tags=tags, callbacks=[best]))
            if best.state is not None:
                oof += out_of_fold(params, splits, folds[i], i, best.state)
        runs = [client.get_run(o.run_id) for o in outcomes]
        table = [{"fold": i, "run_id": r.info.run_id, "run_name": r.info.run_name,
                  "n_train": len(splits.train) + len(splits.val) - len(folds[i]),
                  "n_val": len(folds[i]),
                  **{name: r.data.metrics.get(name) for name in CV_METRICS}}
                 for i, r in enumerate(runs)]
        metrics = summarise(table)
        tracking.log_metrics(client, run_id, metrics)
        with tempfile.TemporaryDirectory(prefix="cnnflow-cv-") as tmp:
            folder = Path(tmp)
            _write_fold_files(folder, table, folds, splits, metrics)
            write_csv(folder / "oof_probabilities.csv", sorted(oof, key=lambda r: r["path"]))
            client.log_artifacts(run_id, str(folder), artifact_path="cv")
        ensemble_run_id = ""
        if params.cv_ensemble:
            ensemble_run_id = _ensemble(params, [o.run_id for o in outcomes], run_id,
                                        tracking_uri, log)
            client.set_tag(run_id, "cnnflow.ensemble_run_id", ensemble_run_id)
    label_issues = None
    if params.find_label_issues:  # the same step as `cnnflow label-issues --cv-run <parent>`
        from components.steps.label_issues import run_label_issues

        label_issues = run_label_issues(LabelIssuesParams(cv_run=run_id), tracking_uri, log=log)
    return CvOutcome(run_id, run_name, outcomes, metrics, table, ensemble_run_id,
                     tracking.run_url(tracking_uri, exp_id, run_id), label_issues)


def summarise(table: list[dict[str, Any]]) -> dict[str, float]:
    """cv_<name>_mean / cv_<name>_std over the folds (population std, as numpy's default)."""
    out: dict[str, float] = {}
    for source, name in CV_METRICS.items():
        values = np.array([row[source] for row in table if row.get(source) is not None],
                          dtype=np.float64)
        if len(values):
            out[f"cv_{name}_mean"] = float(values.mean())
            out[f"cv_{name}_std"] = float(values.std())
    return out


def _write_fold_files(folder: Path, table: list[dict[str, Any]],
                      folds: list[list[tuple[str, int]]], splits: DatasetSplits,
                      metrics: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_csv(folder / "folds.csv", table)
    write_csv(folder / "fold_assignment.csv",
              ({"path": splits.relpath(path), "label": splits.classes[label], "fold": i}
               for i, fold in enumerate(folds)
               for path, label in sorted(fold, key=lambda item: splits.relpath(item[0]))),
              ["path", "label", "fold"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (source, name) in zip(axes, (("best_val_acc", "val_acc"),
                                         ("best_val_loss", "val_loss")), strict=True):
        values = [row[source] or 0.0 for row in table]
        ax.bar([str(row["fold"]) for row in table], values, color="#4c72b0")
        mean = metrics.get(f"cv_{name}_mean", 0.0)
        ax.axhline(mean, color="#c44e52", linestyle="--",
                   label=f"mean {mean:.4f} ± {metrics.get(f'cv_{name}_std', 0.0):.4f}")
        ax.set_xlabel("fold")
        ax.set_ylabel(name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "folds.png", dpi=100)
    plt.close(fig)


def _ensemble(params: TrainParams, run_ids: list[str], parent: str, tracking_uri: str,
              log: Callable[[str], None]) -> str:
    """Soft-vote the fold models: same test split and digest, so they are valid members."""
    from components.steps.ensemble import run_ensemble

    outcome = run_ensemble(EnsembleParams(run_ids=",".join(run_ids), vote="soft",
                                          num_workers=0, device=params.device),
                           tracking_uri, log=log)
    client = tracking.connect(tracking_uri)
    client.set_tag(outcome.run_id, MLFLOW_PARENT_RUN_ID, parent)
    client.set_tag(outcome.run_id, CV_PARENT_TAG, parent)
    return outcome.run_id
