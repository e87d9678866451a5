"""Voting ensembles of trained runs, logged, evaluated and served like any single model.

The rice-leaf seed soft-voted its three transfer models (mean of logits) and got every test
image right; the jellyfish seed bagged custom CNNs. Here an ensemble is:

- members: explicit run ids, or the top-k finished training runs of an experiment by
  `best_val_acc` that share the best run's dataset digest (members trained on different
  splits, or with different class lists, are refused: their votes would not be comparable
  and their test sets could overlap their training sets);
- a vote from the `VOTES` registry: `soft` (weighted mean of member probabilities), `logits`
  (softmax of the weighted mean of logits, the seed's variant) or `hard` (weighted majority);
- weights: equal, `val_acc` (each member's best_val_acc) or an explicit list.

`run_ensemble` logs a run tagged `cnnflow.step=ensemble` (its manifest is its members', so
`cnnflow evaluate --run-id <it>` works unchanged), val/test metrics and figures, a
members-vs-ensemble table, and an `EnsembleClassifier` pyfunc model with the same output as
a single model (label, confidence, prob_<class>). `--bagging N` first trains N members on
stratified bootstrap samples of train, as runs nested under the ensemble's run.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from mlflow import MlflowClient
from mlflow.entities import Run, ViewType

from components import tracking
from components.data.datasets import DatasetSplits
from components.names import (
    CLASS_NAMES_TAG,
    DATA_TAG,
    DATASET_DIGEST_TAG,
    DATASET_TAG,
    DEVICE_TAG,
    MODEL_TAG,
    MODEL_URI_TAG,
    STEP_TAG,
)
from components.nn.engine import resolve_device
from components.params import split_list
from components.serving.classifier import ImageClassifier
from components.serving.ensemble import EnsembleClassifier, EnsembleError, save_members
from components.serving.metrics import classification_metrics
from components.serving.predict import auto_batch_size, load_model
from components.steps.evaluate import MANIFEST, evaluate_model, get_run, run_splits, split_samples
from components.steps.params import EnsembleParams, explicit_vote_weights
from components.tracking.comparison import write_table
from components.tracking.models import log_python_model

# --------------------------------------------------------------------------------------------
# Members and weights
# --------------------------------------------------------------------------------------------


def parse_run_ids(text: str) -> list[str]:
    return split_list(text)


def select_members(client: MlflowClient, run_ids: Sequence[str], top_k: int,
                   experiment: str) -> list[Run]:
    """Explicit runs, or the top-k finished training runs by best_val_acc on one split."""
    if run_ids:
        if len(set(run_ids)) != len(run_ids):
            raise EnsembleError("a run id is listed twice in --run-ids: list each member once")
        runs = [get_run(client, r) for r in run_ids]
    else:
        if not experiment:
            raise EnsembleError("pass --run-ids, or --experiment to pick the top-k runs")
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise EnsembleError(f"experiment '{experiment}' does not exist: train some models "
                                "first, or pass --run-ids")
        found = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`{STEP_TAG}` = 'train' and "
                          "attributes.status = 'FINISHED'",
            run_view_type=ViewType.ACTIVE_ONLY, order_by=["metrics.best_val_acc DESC"],
            max_results=5000)
        found = [r for r in found if r.data.tags.get(MODEL_URI_TAG)
                 and "best_val_acc" in r.data.metrics]
        if not found:
            raise EnsembleError(f"experiment '{experiment}' has no finished training runs "
                                "with a model: train some models first")
        digest = found[0].data.tags.get(DATASET_DIGEST_TAG)
        runs = [r for r in found if r.data.tags.get(DATASET_DIGEST_TAG) == digest][:top_k]
    check_members(runs)
    return runs


def check_members(runs: Sequence[Run]) -> None:
    """Two or more finished training runs with a model, one dataset split, one class list."""
    if len(runs) < 2:
        extra = (f" (only {runs[0].info.run_name} on that dataset split)" if runs else "")
        raise EnsembleError(f"an ensemble needs at least 2 members{extra}: train more models "
                            "or list more --run-ids")
    for r in runs:
        rid, tags = r.info.run_id, r.data.tags
        if tags.get(STEP_TAG) != "train":
            raise EnsembleError(f"run '{rid}' is not a training run ({STEP_TAG}="
                                f"{tags.get(STEP_TAG, 'none')}): members must be "
                                "cnnflow train runs")
        if not tags.get(MODEL_URI_TAG):
            raise EnsembleError(f"run '{rid}' has no logged model (status {r.info.status}): "
                                "members must be finished training runs")
    first = runs[0]
    for r in runs[1:]:
        if r.data.tags.get(DATASET_DIGEST_TAG) != first.data.tags.get(DATASET_DIGEST_TAG):
            raise EnsembleError(f"runs {first.info.run_id} and {r.info.run_id} were trained on "
                                "different dataset splits (cnnflow.dataset_digest differs): "
                                "ensemble only members trained on the same split")
        if r.data.tags.get(CLASS_NAMES_TAG) != first.data.tags.get(CLASS_NAMES_TAG):
            raise EnsembleError(f"runs {first.info.run_id} and {r.info.run_id} have different "
                                "class lists: ensemble only members trained on the same classes")


def resolve_weights(spec: str, runs: Sequence[Run]) -> list[float]:
    """'' / 'equal', 'val_acc' (best_val_acc of each member) or 'w1,w2,...'; normalised."""
    explicit = explicit_vote_weights(spec)
    if explicit is not None:
        if len(explicit) != len(runs):
            raise EnsembleError(f"{len(explicit)} weights for {len(runs)} members: give one "
                                "weight per member, in --run-ids order")
        raw = explicit
    elif str(spec).strip().lower() == "val_acc":
        raw = []
        for r in runs:
            if "best_val_acc" not in r.data.metrics:
                raise EnsembleError(f"run '{r.info.run_id}' has no best_val_acc for "
                                    "--weights val_acc: use equal or explicit weights")
            raw.append(float(r.data.metrics["best_val_acc"]))
    else:
        raw = [1.0] * len(runs)
    if any(w < 0 for w in raw) or sum(raw) <= 0:
        raise EnsembleError(f"weights {raw} must be >= 0 with a positive sum")
    total = sum(raw)
    return [w / total for w in raw]


def bootstrap_train(seed: int) -> Callable[[DatasetSplits], DatasetSplits]:
    """A stratified bootstrap of train (each class resampled to its size, with replacement):
    on small datasets a plain bootstrap can drop a whole class from a member's training."""
    def sample(splits: DatasetSplits) -> DatasetSplits:
        rng = random.Random(seed)
        by_class: dict[int, list[tuple[str, int]]] = {}
        for item in splits.train:
            by_class.setdefault(item[1], []).append(item)
        drawn = [rng.choice(items) for _, items in sorted(by_class.items()) for _ in items]
        return dataclasses.replace(splits, train=drawn)
    return sample


def load_member(run: Run) -> ImageClassifier:
    model = load_model(run.data.tags[MODEL_URI_TAG])
    if not isinstance(model, ImageClassifier):
        raise EnsembleError(f"run '{run.info.run_id}' does not hold a single image classifier")
    return model


# --------------------------------------------------------------------------------------------
# The `ensemble` step
# --------------------------------------------------------------------------------------------


@dataclass
class EnsembleOutcome:
    run_id: str
    run_name: str
    members: list[str]
    weights: list[float]
    metrics: dict[str, float]
    table: list[dict[str, Any]] = field(default_factory=list)
    model_uri: str = ""


def run_ensemble(params: EnsembleParams, tracking_uri: str,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr), *,
                 job_run_id: str | None = None) -> EnsembleOutcome:
    """Select (or bag-train) members, combine them, and log the ensemble as one run
    (`job_run_id`: the run opened for this job, filled in instead of a new one)."""
    params.validate()
    client = tracking.connect(tracking_uri)
    device = resolve_device(params.device)
    if params.bagging:
        return _bagging(params, client, tracking_uri, device, log, job_run_id)
    runs = select_members(client, parse_run_ids(params.run_ids), params.top_k,
                          params.experiment)
    weights = resolve_weights(params.weights, runs)
    splits = run_splits(client, runs[0])
    split_samples(splits, "test", runs[0].info.run_id)
    members = [load_member(r) for r in runs]  # all loadable before a run exists
    run_id, _, run_name = tracking.open_run(client, step="ensemble", model="ensemble",
                                            exp_id=runs[0].info.experiment_id,
                                            adopt=job_run_id)
    return _finish(client, params, run_id, run_name, runs, members, weights, splits, device,
                   log)


def _bagging(params: EnsembleParams, client: MlflowClient, tracking_uri: str,
             device: torch.device, log: Callable[[str], None],
             job_run_id: str | None) -> EnsembleOutcome:
    from components.data.datasets import load_splits
    from components.steps.train import train

    params.train_params().validate()
    splits = load_splits(params.data, val_ratio=params.val_ratio, test_ratio=params.test_ratio,
                         seed=params.seed)
    run_id, _, run_name = tracking.open_run(client, step="ensemble", model="ensemble",
                                            experiment=params.experiment or splits.name,
                                            adopt=job_run_id)
    try:
        outcomes = []
        for i in range(params.bagging):
            log(f"bagging member {i + 1}/{params.bagging}")
            outcome = train(params.train_params(), tracking_uri, progress=False, log=log,
                            train_sample=bootstrap_train(params.seed + 1 + i),
                            parent_run_id=run_id)
            client.set_tag(outcome.run_id, "cnnflow.bootstrap_seed", str(params.seed + 1 + i))
            outcomes.append(outcome)
        runs = [client.get_run(o.run_id) for o in outcomes]
        check_members(runs)
        weights = resolve_weights(params.weights, runs)
        splits = run_splits(client, runs[0])
        members = [load_member(r) for r in runs]
    except BaseException as exc:
        tracking.end_failed(client, run_id, exc)
        raise
    return _finish(client, params, run_id, run_name, runs, members, weights, splits, device, log)


def _finish(client: MlflowClient, params: EnsembleParams, run_id: str, run_name: str,
            runs: Sequence[Run], members: Sequence[ImageClassifier], weights: list[float],
            splits: DatasetSplits, device: torch.device,
            log: Callable[[str], None]) -> EnsembleOutcome:
    """Log params, manifest, val/test metrics, figures, the table and the model; end the run."""
    try:
        first = runs[0]
        config = {"vote": params.vote, "weights": weights,
                  "members": [{"dir": str(i), "run_id": r.info.run_id,
                               "model": r.data.tags.get(MODEL_TAG, "")}
                              for i, r in enumerate(runs)]}
        model = EnsembleClassifier().build(config, members).to(device)
        logged = {"members": ",".join(r.info.run_id for r in runs), "n_members": len(runs),
                  "vote": params.vote, "vote_weights": params.weights,
                  "member_weights": ",".join(f"{w:.6g}" for w in weights),
                  "num_classes": len(splits.classes),
                  "member_image_sizes": ",".join(sorted({str(m.config["image_size"])
                                                         for m in members}))}
        if params.bagging:  # the same values `mlflow run -e ensemble` logs for these names
            logged.update(bagging=params.bagging, data=params.data, model=params.model,
                          epochs=params.epochs, lr=params.lr, seed=params.seed)
        # Where the members' data lives, as a tag: under `mlflow run` the run already holds a
        # `data` param (the entry point's default) that cannot be changed.
        tags = {DATA_TAG: first.data.params.get("data", ""),
                DATASET_TAG: first.data.tags.get(DATASET_TAG, splits.name),
                DATASET_DIGEST_TAG: first.data.tags.get(DATASET_DIGEST_TAG, ""),
                CLASS_NAMES_TAG: first.data.tags.get(CLASS_NAMES_TAG, ""),
                DEVICE_TAG: device.type,
                "cnnflow.members": ",".join(r.info.run_id for r in runs)}
        # `mlflow run` already logged the entry point's params as typed (`1e-3`); MLflow
        # refuses to change a param, so those stay as they are.
        present = client.get_run(run_id).data.params
        logged = {k: v for k, v in logged.items() if k not in present}
        tracking.log_params_and_tags(client, run_id, logged, tags)
        with tempfile.TemporaryDirectory(prefix="cnnflow-ensemble-") as tmp:
            work = Path(tmp)
            manifest = client.download_artifacts(first.info.run_id, MANIFEST,
                                                 str(work / "src"))
            client.log_artifact(run_id, manifest, artifact_path="data")
            metrics, table = _evaluate(model, runs, weights, splits, run_id, params, work)
            tracking.log_metrics(client, run_id, metrics)
            client.log_artifacts(run_id, str(work / "eval"), artifact_path="evaluation")
            client.log_artifacts(run_id, str(work / "table"), artifact_path="members")
            (work / "model").mkdir()
            (work / "model" / "ensemble.json").write_text(json.dumps(config, indent=2))
            save_members(members, work / "model" / "members")
            model_uri = log_python_model(
                run_id, EnsembleClassifier(),
                {"ensemble": str(work / "model" / "ensemble.json"),
                 "members": str(work / "model" / "members")},
                model.class_names, splits.train[0][0] if splits.train else None,
                name="ensemble")
        client.set_tag(run_id, MODEL_URI_TAG, model_uri)
        tracking.finish_run(client, run_id, "FINISHED")
    except BaseException as exc:
        tracking.end_failed(client, run_id, exc)
        raise
    return EnsembleOutcome(run_id, run_name, [r.info.run_id for r in runs], weights, metrics,
                           table, model_uri)


def _evaluate(model: EnsembleClassifier, runs: Sequence[Run], weights: list[float],
              splits: DatasetSplits, run_id: str, params: EnsembleParams, work: Path
              ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Val and test metrics of the ensemble, and of each member from the same predictions."""
    metrics: dict[str, float] = {}
    rows: list[dict[str, Any]] = [
        {"member": r.info.run_name, "run_id": r.info.run_id,
         "model": r.data.tags.get(MODEL_TAG, ""), "weight": round(w, 6)}
        for r, w in zip(runs, weights, strict=True)]
    rows.append({"member": "ensemble", "run_id": run_id, "model": f"{params.vote} vote",
                 "weight": 1.0})
    for split in ("val", "test"):
        if not splits.split(split):
            continue
        figures = work / "eval" / split if split == "test" else None
        preds, split_metrics, _ = evaluate_model(
            model, splits, split, run_id, batch_size=auto_batch_size(model.device),
            num_workers=params.num_workers, figures_dir=figures)
        metrics.update(split_metrics)
        for row, member_lp in zip(rows[:-1], preds.members, strict=True):
            m, _ = classification_metrics(member_lp, preds.labels, splits.classes,
                                                     f"{split}_")
            row[f"{split}_acc"], row[f"{split}_loss"] = m[f"{split}_acc"], m[f"{split}_loss"]
        rows[-1][f"{split}_acc"] = split_metrics[f"{split}_acc"]
        rows[-1][f"{split}_loss"] = split_metrics[f"{split}_loss"]
    write_table(rows, work / "table", "comparison")
    return metrics, rows
