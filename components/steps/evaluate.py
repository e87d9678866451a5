"""Judge a logged model the way the seeds did, on the data its run was trained against.

`evaluate()` finds the model (a run id or a `models:/` URI), rebuilds the run's own split from
its `data/manifest.csv` artifact and `data` param (so a re-split folder can never leak into
the numbers), predicts through the same preprocessing and forward pass that serving uses,
and logs into the evaluated run:

- quality: loss, accuracy, Top-5 (>= 5 classes), macro/weighted precision, recall, F1,
  per-class accuracy and mean loss, expected calibration error (`<split>_` prefix);
- figures and `classification_report.json` under `evaluation/<split>/`;
- a Grad-CAM gallery under `evaluation/<split>/explain/` (`--explain-images N`): the N
  highest-loss images and up to 2 of each confusion pair's worst (at most N more), each with
  the map of the class the model predicted, true / predicted label and confidence, plus
  `overview.png` with all of them; the run's `cnnflow.explain_overview` tag names that
  overview (the test split's; a val gallery only when the run has none);
- cost on the run's device: parameter count, size on disk, latency at batch 1 (p50/p95),
  throughput at `batch_size`, peak memory, and `cost_reliable` (0 with a note when the
  machine was too busy for the timings to compare; the load and spread are in the report).

On the test split it also scores the val split (same prediction path, `val_` prefix; no
figures), so a registry version carries both: validation chooses among candidates, test
judges. Metrics are linked to the MLflow 3 logged model (`model_id`), whose page then shows
them; on a training run, `val_loss`/`val_acc` stay per-epoch curves and are not logged.
Then (test split) it registers the model as a new registry version with the alias
`challenger` and applies the promotion rule of `components.tracking.registry`.

Every input problem is found before anything is written: a bad run id, a missing model, an
empty split or missing image files leave the run and the registry untouched.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from components import tracking
from components.data.datasets import SPLITS, DatasetSplits, load_rgb, resolve_data
from components.errors import CnnflowError
from components.files import read_csv, slug, write_csv
from components.names import (
    DATA_TAG,
    DEVICE_TAG,
    EPOCH_METRICS,
    EVALUATED_RUN_TAG,
    EXPLAIN_OVERVIEW_TAG,
    MODEL_URI_TAG,
    REGISTERED_VERSION_TAG,
    SPLIT_TAG,
    STEP_TAG,
    TTA_TAG,
)
from components.nn.engine import resolve_device
from components.serving.cost import PeakMemory, measure_cost
from components.serving.metrics import classification_metrics
from components.serving.predict import Predictions, auto_batch_size, load_model, predict_samples
from components.steps.params import EvalParams
from components.tracking import registry

MAX_MISCLASSIFIED = 16
MANIFEST = "data/manifest.csv"
PER_CONFUSION_PAIR = 2  # gallery images per (true, predicted) pair


class EvaluationError(CnnflowError, RuntimeError):
    """Bad evaluation input (run, model, split, data); one line saying what to do."""


# --------------------------------------------------------------------------------------------
# What to evaluate
# --------------------------------------------------------------------------------------------


@dataclass
class Target:
    """The model to evaluate and the run it came from (where metrics are logged)."""

    run: Run
    model_uri: str
    experiment: str

    @property
    def run_id(self) -> str:
        return self.run.info.run_id


def get_run(client: MlflowClient, run_id: str) -> Run:
    """The run, or a one-line error when it does not exist on this server."""
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise EvaluationError(f"run '{run_id}' does not exist on this tracking server: "
                              "check the id (cnnflow compare lists the runs)") from None


def resolve_target(client: MlflowClient, run_id: str = "", model_uri: str = "") -> Target:
    """A run id (its `cnnflow.model_uri` tag) or a `models:/` URI -> model + source run."""
    if bool(run_id) == bool(model_uri):
        raise EvaluationError("pass exactly one of --run-id or --model-uri")
    if run_id:
        run = get_run(client, run_id)
        uri = run.data.tags.get(MODEL_URI_TAG, "")
        if not uri:
            raise EvaluationError(
                f"run '{run_id}' has no logged model (no cnnflow.model_uri tag; status "
                f"{run.info.status}): evaluate a finished train or ensemble run")
    else:
        uri = model_uri
        source_run = registry.source_run_id(client, model_uri)
        run = get_run(client, source_run)
    experiment = client.get_experiment(run.info.experiment_id).name
    return Target(run=run, model_uri=uri, experiment=experiment)


# --------------------------------------------------------------------------------------------
# The run's own data
# --------------------------------------------------------------------------------------------


def run_splits(client: MlflowClient, run: Run) -> DatasetSplits:
    """Rebuild a run's train/val/test lists from its manifest artifact and `data` param
    (an ensemble run names its members' data in the `cnnflow.data` tag instead).

    The manifest holds paths relative to the data root, so the same run evaluates on another
    machine as long as `data` resolves there (the bundled `digits` is regenerated).
    """
    run_id = run.info.run_id
    data = run.data.tags.get(DATA_TAG) or run.data.params.get("data")  # tag: ensembles
    if not data:
        raise EvaluationError(f"run '{run_id}' has no 'data' param: it was not logged by "
                              "cnnflow train or ensemble")
    with tempfile.TemporaryDirectory(prefix="cnnflow-manifest-") as tmp:
        try:
            local = client.download_artifacts(run_id, MANIFEST, tmp)
        except (MlflowException, OSError):
            raise EvaluationError(f"run '{run_id}' has no {MANIFEST} artifact: its split "
                                  "cannot be rebuilt; evaluate a run logged by cnnflow "
                                  "train or ensemble") from None
        rows = read_csv(local)
    name, root = resolve_data(data)
    classes: dict[int, str] = {}
    for row in rows:
        classes[int(row["class_index"])] = row["label"]
    names = [classes[i] for i in sorted(classes)]
    if sorted(classes) != list(range(len(names))):
        raise EvaluationError(f"run '{run_id}': {MANIFEST} has gaps in class_index; the "
                              "manifest is damaged")
    lists: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    for row in rows:
        lists[row["split"]].append((str(root / row["path"]), int(row["class_index"])))
    # The content hashes the run recorded give its digest without re-reading the files
    # (manifests logged before they had a sha1 column are hashed from the files).
    hashes = {str(root / r["path"]): r["sha1"] for r in rows if r.get("sha1")}
    return DatasetSplits(name=name, root=root, classes=names, hashes=hashes, **lists)


def split_samples(splits: DatasetSplits, split: str, run_id: str) -> list[tuple[str, int]]:
    """The split's (path, label) list; empty splits and missing files are errors."""
    samples = splits.split(split)
    if not samples:
        raise EvaluationError(f"the {split} split of run '{run_id}' is empty: train with "
                              f"--{split}-ratio > 0 (or a {split}/ folder), or pick another "
                              "--split")
    missing = [p for p, _ in samples if not os.path.isfile(p)]
    if missing:
        raise EvaluationError(f"{len(missing)} of {len(samples)} {split} images of run "
                              f"'{run_id}' are missing under {splits.root} (first: "
                              f"{missing[0]}): restore the data folder the run was trained on")
    return samples


# --------------------------------------------------------------------------------------------
# Figures and files
# --------------------------------------------------------------------------------------------


def write_evaluation_files(folder: Path, predictions: Predictions, report: dict[str, Any],
                           root: Path) -> list[Path]:
    """classification_report.json, predictions.csv and the figures, into `folder`."""
    from components import plots

    folder.mkdir(parents=True, exist_ok=True)
    classes = report["classes"]
    confusion = np.array(report["confusion_matrix"])
    probs = predictions.probs
    preds = probs.argmax(1)
    (folder / "classification_report.json").write_text(json.dumps(report, indent=2))
    write_csv(folder / "predictions.csv",
              ({"path": Path(os.path.relpath(path, root)).as_posix(), "label": classes[label],
                "predicted": classes[pred], "confidence": f"{p[pred]:.6f}",
                "correct": int(pred == label)}
               for path, label, pred, p in zip(predictions.paths, predictions.labels, preds,
                                               probs, strict=True)))
    wrong = [i for i in range(len(preds)) if preds[i] != predictions.labels[i]]
    wrong.sort(key=lambda i: -probs[i, preds[i]])  # most confidently wrong first
    worst = [(predictions.paths[i], classes[predictions.labels[i]], classes[preds[i]],
              float(probs[i, preds[i]])) for i in wrong[:MAX_MISCLASSIFIED]]
    return [
        plots.plot_confusion_matrix(confusion, classes, folder / "confusion_matrix.png"),
        plots.plot_confusion_matrix(confusion, classes,
                                    folder / "confusion_matrix_normalized.png", normalize=True),
        plots.plot_per_class_accuracy(report["per_class"], folder / "per_class_accuracy.png"),
        plots.plot_misclassified(worst, folder / "misclassified.png"),
        plots.plot_reliability(report["calibration_bins"], report["metrics"]["ece"],
                               folder / "reliability.png"),
    ]


def gallery_indices(probs: np.ndarray, labels: np.ndarray, n: int) -> list[tuple[int, str]]:
    """Which images the Grad-CAM gallery shows, as (index, reason): the `n` highest-loss
    ones (`loss`), then up to 2 per confusion pair not shown yet, worst first, the most
    frequent pairs first, at most `n` of them (`confusion`)."""
    if n <= 0 or not len(labels):
        return []
    loss = -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))
    order = [int(i) for i in np.argsort(-loss, kind="stable")]
    chosen = [(i, "loss") for i in order[:n]]
    shown = {i for i, _ in chosen}
    preds = probs.argmax(1)
    pairs: dict[tuple[int, int], list[int]] = {}
    for i in order:  # worst first within each pair
        if preds[i] != labels[i]:
            pairs.setdefault((int(labels[i]), int(preds[i])), []).append(i)
    extra: list[tuple[int, str]] = []
    for members in sorted(pairs.values(), key=len, reverse=True):
        extra += [(i, "confusion") for i in members if i not in shown][:PER_CONFUSION_PAIR]
    return chosen + extra[:n]


def write_gallery(folder: Path, model: Any, predictions: Predictions, classes: list[str],
                  n: int) -> Path | None:
    """`folder/explain/`: one Grad-CAM figure per chosen image, `gallery.csv` and
    `overview.png`; returns the overview (None: nothing chosen)."""
    from components import plots
    from components.serving.explain import explain_images

    probs, labels = predictions.probs, predictions.labels
    chosen = gallery_indices(probs, labels, n)
    if not chosen:
        return None
    out = folder / "explain"
    out.mkdir(parents=True)
    images = [load_rgb(predictions.paths[i]) for i, _ in chosen]
    preds = [int(probs[i].argmax()) for i, _ in chosen]
    explained = explain_images(model, images, preds)
    tiles, rows = [], []
    for k, ((i, reason), image, pred, cam) in enumerate(
            zip(chosen, images, preds, explained, strict=True), start=1):
        true, conf = classes[labels[i]], float(probs[i, pred])
        loss = -math.log(max(float(probs[i, labels[i]]), 1e-12))
        tile = plots.cam_tile(image, cam.cam, f"true {true}\npred {classes[pred]} "
                              f"({conf:.0%})\nloss {loss:.2f} ({reason})",
                              correct=pred == labels[i])
        name = f"{k:02d}_{reason}_{slug(true)}_as_{slug(classes[pred])}.png"
        tile.save(out / name)
        tiles.append(tile)
        rows.append({"figure": name, "path": Path(predictions.paths[i]).name, "label": true,
                     "predicted": classes[pred], "confidence": f"{conf:.6f}",
                     "loss": f"{loss:.6f}", "reason": reason})
    write_csv(out / "gallery.csv", rows)
    return plots.save_cam_sheet(tiles, out / "overview.png",
                                "Grad-CAM of the predicted class (red: most evidence): the "
                                "highest-loss images, then confusion pairs")


# --------------------------------------------------------------------------------------------
# The `evaluate` step
# --------------------------------------------------------------------------------------------


@dataclass
class EvalOutcome:
    run_id: str
    run_name: str
    split: str
    metrics: dict[str, float]
    report: dict[str, Any]
    version: Any = None  # the registry version created (test split)
    decision: registry.Decision | None = None
    notes: list[str] = field(default_factory=list)
    url: str = ""  # the evaluated run's page in the MLflow UI
    experiment: str = ""  # the evaluated run's experiment (the CLI's next-step line names it)


def eval_device(name: str, run: Run) -> tuple[torch.device, str]:
    """`run`: the device the run trained on when this machine has it, else the best one."""
    if name != "run":
        return resolve_device(name), ""
    trained_on = run.data.tags.get(DEVICE_TAG, "cpu")
    try:
        return resolve_device(trained_on), ""
    except Exception:  # noqa: BLE001 - any missing device falls back the same way
        device = resolve_device("auto")
        return device, (f"run trained on {trained_on}, not available here: cost measured "
                        f"on {device.type}")


def check_classes(model: Any, splits: DatasetSplits, run_id: str) -> None:
    if list(model.class_names) != list(splits.classes):
        raise EvaluationError(f"the model's classes ({', '.join(model.class_names)}) differ "
                              f"from run '{run_id}' manifest's ({', '.join(splits.classes)})")


def score_predictions(predictions: Predictions, splits: DatasetSplits, split: str,
                      figures_dir: Path | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """Metrics of one split's predictions (and the report files, when `figures_dir` is given)."""
    metrics, report = classification_metrics(predictions.log_proba, predictions.labels,
                                             splits.classes, f"{split}_")
    if figures_dir is not None:
        write_evaluation_files(figures_dir, predictions, report, splits.root)
    return metrics, report


def evaluate_model(model: Any, splits: DatasetSplits, split: str, run_id: str, *,
                   batch_size: int = 4, num_workers: int = 0, figures_dir: Path | None = None,
                   ) -> tuple[Predictions, dict[str, float], dict[str, Any]]:
    """Predict one split and compute its metrics (and files, when `figures_dir` is given)."""
    samples = split_samples(splits, split, run_id)
    check_classes(model, splits, run_id)
    predictions = predict_samples(model, samples, batch_size, num_workers)
    metrics, report = score_predictions(predictions, splits, split, figures_dir)
    return predictions, metrics, report


def log_tta_model(client: MlflowClient, run_id: str, model: Any, tta: str,
                  example_image: str) -> str:
    """Log the evaluated weights again, their config naming `tta`, as `<model>-tta` in the
    run (tagged TTA_TAG), so the registered version serves the probabilities evaluate
    measured; returns its URI. The run's own model (`cnnflow.model_uri`) stays plain."""
    from components.tracking.models import log_pyfunc_model

    with tempfile.TemporaryDirectory(prefix="cnnflow-tta-") as tmp:
        weights = Path(tmp) / "best.pt"
        torch.save({k: v.detach().to("cpu").contiguous()
                    for k, v in model.model.state_dict().items()}, weights)
        uri = log_pyfunc_model(run_id, weights, {**model.config, "tta": tta}, example_image,
                               name=f"{model.config['model']}-tta")
    logged_id = registry.logged_model_id(client, uri)
    if logged_id:
        client.set_logged_model_tags(logged_id, {TTA_TAG: tta})
    return uri


def _preload() -> None:
    """Import what loading, scoring and plotting need before the memory baseline is taken,
    so `peak_memory_mb` measures the model, not a first import of sklearn or matplotlib."""
    import mlflow.pyfunc  # noqa: F401
    import sklearn.metrics  # noqa: F401

    import components.plots  # noqa: F401
    import components.serving.classifier  # noqa: F401
    import components.serving.ensemble  # noqa: F401
    import components.serving.explain  # noqa: F401


def evaluate(params: EvalParams, tracking_uri: str,
             log: Callable[[str], None] = lambda s: print(s, file=sys.stderr), *,
             job_run_id: str | None = None) -> EvalOutcome:
    """Evaluate one model on its run's split, log everything into that run, then register
    (test split) and apply the promotion rule. `job_run_id`: the run opened for this job
    (by `mlflow run`, or the `main` pipeline's evaluate step), opened as `evaluate-vN` once
    the inputs are checked and tagged with what it evaluated and registered."""
    params.validate()
    client = tracking.connect(tracking_uri)
    target = resolve_target(client, params.run_id, params.model_uri)
    run, run_id = target.run, target.run_id
    splits = run_splits(client, run)
    samples = split_samples(splits, params.split, run_id)  # fail before loading anything
    # Judging on test also scores val (when the run has one): the pipeline chooses among its
    # candidates on those numbers, so the test split judges without ever selecting.
    val_samples = (split_samples(splits, "val", run_id)
                   if params.split == "test" and splits.split("val") else [])
    if params.tta != "none" and run.data.tags.get(STEP_TAG) != "train":
        raise EvaluationError(f"--tta {params.tta} applies to a single trained model, not to "
                              f"the {run.data.tags.get(STEP_TAG) or 'non-cnnflow'} run "
                              f"'{run_id}': evaluate it with --tta none")
    model_id = registry.logged_model_id(client, target.model_uri)
    name = params.registered_model or registry.default_name(target.experiment)
    register = params.register and params.split == "test"
    if register:
        registry.check_name(name)
    registered_uri = target.model_uri  # evaluate --tta: a model that serves with it
    device, note = eval_device(params.device, run)
    notes = [note] if note else []
    if params.register and not register:
        notes.append("split=val: not registered (the registry compares test metrics)")
    if job_run_id and job_run_id != run_id:
        tracking.open_run(client, step="evaluate", adopt=job_run_id,
                          tags={EVALUATED_RUN_TAG: run_id, SPLIT_TAG: params.split})

    _preload()
    memory = PeakMemory(device).start()
    model = load_model(target.model_uri).to(device)
    check_classes(model, splits, run_id)
    if params.tta != "none" and not hasattr(model, "tta"):
        raise EvaluationError(f"--tta {params.tta} needs the PyTorch model, not the "
                              f"{getattr(model, 'format', '')} model {target.model_uri}: "
                              "evaluate the model it was exported from")
    if hasattr(model, "tta"):
        model.tta = params.tta  # prediction, cost and the registered model all use it
    also = f", val {len(val_samples)}" if val_samples else ""
    log(f"evaluating {run.info.run_name} ({run_id}) on {params.split} "
        f"({len(samples)} images{also}, {device.type})")
    batch_size = params.batch_size or auto_batch_size(device)
    predictions = predict_samples(model, samples, batch_size, params.num_workers,
                                  progress=f"evaluate {run.info.run_name} ({params.split})")
    cost: dict[str, float] = {}
    cost_context: dict[str, Any] = {}
    if params.cost:
        images = [load_rgb(p) for p in predictions.paths[:params.latency_runs]]
        measured = measure_cost(model, images, batch_size, params.latency_runs)
        cost = {**measured.metrics, "peak_memory_mb": memory.peak_mb()}
        cost_context = measured.context
        if measured.note:
            notes.append(measured.note)
    val_metrics: dict[str, float] = {}
    if val_samples:
        val_predictions = predict_samples(model, val_samples, batch_size, params.num_workers,
                                          progress=f"evaluate {run.info.run_name} (val)")
        val_metrics, _ = score_predictions(val_predictions, splits, "val")
    with tempfile.TemporaryDirectory(prefix="cnnflow-eval-") as tmp:
        folder = Path(tmp) / params.split
        metrics, report = score_predictions(predictions, splits, params.split, folder)
        if cost:
            report["cost"] = {**cost, **cost_context, "device": device.type,
                              "format": getattr(model, "format", "pytorch"),
                              "batch_size": batch_size, "peak_memory_method": memory.method}
            (folder / "classification_report.json").write_text(json.dumps(report, indent=2))
            metrics.update(cost)
        metrics.update(val_metrics)
        overview = None
        if params.explain_images:
            from components.serving.explain import torch_members

            if torch_members(model):
                log(f"Grad-CAM gallery of up to {2 * params.explain_images} {params.split} "
                    "images")
                overview = write_gallery(folder, model, predictions, splits.classes,
                                         params.explain_images)
            else:
                notes.append(f"no Grad-CAM gallery: the {getattr(model, 'format', '')} model "
                             "has no PyTorch network (evaluate the model it was exported "
                             "from)")
        logged = dict(metrics)
        if run.data.tags.get(STEP_TAG) == "train":
            # val_loss/val_acc are curves there (step = epoch): no foreign point on them; the
            # checkpoint's values are best_val_loss/acc (the version tags keep these).
            for key in EPOCH_METRICS:
                logged.pop(key, None)
        report["tta"] = params.tta
        (folder / "classification_report.json").write_text(json.dumps(report, indent=2))
        if register and params.tta != "none":  # the version must serve what was measured
            registered_uri = log_tta_model(client, run_id, model, params.tta, samples[0][0])
            model_id = registry.logged_model_id(client, registered_uri)
        # Linked to the logged model too, so its page in the MLflow UI shows them.
        tracking.log_metrics(client, run_id, logged, model_id=model_id)
        client.set_tag(run_id, f"cnnflow.evaluated_{params.split}", device.type)
        client.set_tag(run_id, f"cnnflow.evaluated_{params.split}_format",
                       getattr(model, "format", "pytorch"))
        client.set_tag(run_id, f"cnnflow.evaluated_{params.split}_tta", params.tta)
        if job_run_id and job_run_id != run_id and "tta" not in client.get_run(
                job_run_id).data.params:  # `mlflow run` logged its -P values already
            client.log_param(job_run_id, "tta", params.tta)
        client.log_artifacts(run_id, str(folder), artifact_path=f"evaluation/{params.split}")
        if overview is not None and (params.split == "test"
                                     or EXPLAIN_OVERVIEW_TAG not in run.data.tags):
            client.set_tag(run_id, EXPLAIN_OVERVIEW_TAG,
                           f"evaluation/{params.split}/explain/{overview.name}")

    outcome = EvalOutcome(run_id, run.info.run_name, params.split, metrics, report, notes=notes,
                          url=tracking.run_url(tracking_uri, run.info.experiment_id, run_id),
                          experiment=target.experiment)
    if register:
        version = registry.register_version(client, registered_uri, run, name, metrics,
                                            splits.digest(), splits.name)
        client.set_model_version_tag(name, version.version, TTA_TAG, params.tta)
        version = client.get_model_version(name, version.version)
        outcome.version = version
        if params.promote:
            outcome.decision = registry.promote(client, name, version=None,
                                                metric=params.metric,
                                                min_delta=params.min_delta)
    if job_run_id and outcome.version is not None:
        client.set_tag(job_run_id, REGISTERED_VERSION_TAG,
                       f"{outcome.version.name}/{outcome.version.version}")
    return outcome
