"""`cnnflow cascade`: find the objects in scene images, then classify each crop.

Everything that can fail on the user's input is checked before the `cascade-vN` run exists:
the images folder (and that it holds readable images), the detector name and its weights
(or the `--boxes` file, every line of it), the `--refine` names against the detector's
classes, the ground truth, the classifier (run id or `models:/` URI) and its input size, the
output folder and the registered model's name. Then, in the run:

- the images are decoded (DataLoader workers: `num_workers`), a batch at a time, detected (or
  their boxes looked up), filtered, and the `refine` boxes' crops classified in batches
  (`components.serving.cascade.Cascade`);
- `detections.csv` (image, box, detector label and score, final label and confidence,
  whether refined) and `annotated/` (every image with its final boxes drawn) are written to
  a temp folder beside `--out` and swapped into place when the run is complete;
- the run gets the parameters, both models (tags `cnnflow.classifier_uri`, `cnnflow.detector`,
  `cnnflow.detector_weights`), counts per final class (`n_final_<class>`), the stage timings,
  `detections.csv` and the first `annotated_artifacts` annotated images (`cascade/`);
- with `--ground-truth`: precision and recall per class at IoU 0.5, AP@0.5 and mAP@0.5,
  overall precision and recall, and under `evaluation/` the confusion of final labels of
  matched boxes (PNG and CSV) and a per-class table;
- with a detector: the cascade logged as one pyfunc model (`cascade`: base64 image in, one
  row per box out) and, with `register`, a new version of `<experiment>-cascade` with the
  alias `challenger` (never promoted by this step).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from torch.utils.data import DataLoader, Dataset

from components import tracking
from components.data.boxes import BoxSet, image_key, read_boxes
from components.data.datasets import IMAGE_EXTENSIONS, load_rgb, remove_stale_tmp, scan_images
from components.errors import CnnflowError
from components.files import building, write_csv
from components.names import (
    CASCADE_MODEL_URI_TAG,
    CLASSIFIER_URI_TAG,
    DETECTOR_TAG,
    DETECTOR_WEIGHTS_TAG,
    REGISTERED_VERSION_TAG,
    SOURCE_RUN_TAG,
)
from components.nn.detectors import Detector, get_detector, load_detector, save_detector
from components.nn.engine import resolve_device
from components.params import bool_text
from components.progress import track
from components.serving.cascade import (
    CASCADE_COLUMNS,
    Cascade,
    CascadeModel,
    CascadeSettings,
    Detection,
    annotate,
    cascade_signature,
    check_refine,
    detection_frame,
    detection_metrics,
    input_sizes,
)
from components.serving.metrics import metric_key
from components.serving.predict import auto_batch_size, load_model
from components.steps.evaluate import resolve_target
from components.steps.params import CascadeParams
from components.tracking import registry
from components.tracking.models import log_python_model


class CascadeStepError(CnnflowError, ValueError):
    """Bad cascade input (images, boxes, ground truth, classifier); one line."""


MODEL_NAME = "cascade"  # the logged model's name in its run


def registered_name(experiment: str) -> str:
    """`<experiment>-cascade`: the cascades of an experiment, beside its -classifier."""
    return re.sub(r"[/:]", "-", f"{experiment}-cascade")


def check(params: CascadeParams) -> None:
    """The parameters' own checks, then the detector's name against the registry."""
    params.validate()
    if params.detector:
        get_detector(params.detector)


@dataclass
class CascadeOutcome:
    run_id: str
    run_name: str
    out: Path
    n_images: int
    n_boxes: int
    n_refined: int
    per_class: dict[str, int]
    metrics: dict[str, float]
    model_uri: str = ""
    version: Any = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    url: str = ""


def scene_images(folder: Path) -> list[Path]:
    """Every image file under `folder` (any depth, hidden entries skipped), sorted."""
    return sorted((p for p in folder.rglob("*")
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
                  key=lambda p: p.as_posix())


class _Scenes(Dataset):
    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Any:
        return load_rgb(self.paths[index])


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


@dataclass
class _Inputs:
    """What `prepare` checked and loaded before any run exists."""

    root: Path
    paths: list[Path]
    keys: list[str]
    skipped: list[tuple[str, str]]
    digest: str
    detector: Detector | None
    given: BoxSet | None
    truth: BoxSet | None
    target: Any
    classifier: Any
    final_classes: list[str]


def prepare(params: CascadeParams, client: MlflowClient) -> _Inputs:
    """Every input read and checked, in the order a user fixes them; one line each."""
    root = Path(params.images).expanduser().resolve()
    found = scene_images(root)
    hashes, skipped = scan_images(found)
    bad = {p for p, _ in skipped}
    paths = [p for p in found if str(p) not in bad]
    if not paths:
        raise CascadeStepError(f"no readable images in {root}: pass a folder of scene images "
                               "(any depth)")
    keys = [image_key(p, root) for p in paths]
    digest = hashlib.sha1("\n".join(f"{k} {hashes.get(str(p), '')}" for k, p in
                                    zip(keys, paths, strict=True)).encode()).hexdigest()
    detector, given = None, None
    refine = params.refine_list()
    if params.boxes:
        given = read_boxes(params.boxes, root, paths)
        labels, source = given.classes, f"the boxes in {given.source}"
    else:
        detector = load_detector(params.detector, params.detector_weights,
                                 download=params.download_weights)
        labels, source = detector.labels, f"detector {detector.name} ({detector.source})"
    check_refine(refine, labels, source)
    is_uri = params.classifier.startswith("models:/")
    target = resolve_target(client, run_id="" if is_uri else params.classifier,
                            model_uri=params.classifier if is_uri else "")
    classifier = load_model(target.model_uri)
    input_sizes(classifier, target.model_uri)
    final = list(dict.fromkeys([*classifier.class_names,
                                *(c for c in labels if c not in refine)]))
    truth = None
    if params.ground_truth:
        truth = read_boxes(params.ground_truth, root, paths)
        unknown = [c for c in truth.classes if c not in final]
        if unknown:
            raise CascadeStepError(
                f"ground truth class '{unknown[0]}' ({truth.source}) is no final class of this "
                f"cascade (the classifier's {', '.join(classifier.class_names)} and the "
                "detector classes not refined): give the true boxes the final class names")
    if detector is not None and params.register:
        registry.check_name(params.registered_model or registered_name(
            params.experiment or target.experiment))
    return _Inputs(root, paths, keys, skipped, digest, detector, given, truth, target,
                   classifier, final)


def run_cascade(params: CascadeParams, tracking_uri: str,
                log: Callable[[str], None] = lambda s: print(s, file=sys.stderr), *,
                job_run_id: str | None = None) -> CascadeOutcome:
    """Detect (or read boxes), classify the crops, write and log everything (`job_run_id`:
    the run `mlflow run` opened for this job, filled in as `cascade-vN`)."""
    check(params)
    device = resolve_device(params.device)
    client = tracking.connect(tracking_uri)
    inputs = prepare(params, client)
    inputs.classifier.to(device)
    if inputs.detector is not None:
        inputs.detector.to(device)
    settings = CascadeSettings(tuple(params.refine_list()), params.score_threshold,
                               params.iou_threshold, params.margin, params.min_box,
                               params.batch_size)
    cascade = Cascade(inputs.classifier, settings, inputs.detector)
    experiment = params.experiment or inputs.target.experiment
    out = params.out_dir()
    detector_tag = (f"{inputs.detector.name}" if inputs.detector is not None
                    else f"boxes:{Path(params.boxes).expanduser().resolve()}")
    run_id, exp_id, run_name = tracking.open_run(
        client, step="cascade", experiment=experiment, adopt=job_run_id,
        tags={CLASSIFIER_URI_TAG: inputs.target.model_uri, DETECTOR_TAG: detector_tag,
              SOURCE_RUN_TAG: inputs.target.run_id,
              **({DETECTOR_WEIGHTS_TAG: inputs.detector.source} if inputs.detector else {})})
    remove_stale_tmp(out.parent, f".{out.name}-tmp-*")
    # an earlier cascade output at --out (checked) is replaced when this one is complete
    with tracking.ending_run(client, run_id), building(out) as work:
        outcome = _run(params, client, run_id, run_name, inputs, cascade, device, work, log)
    outcome.out = out
    outcome.url = tracking.run_url(tracking_uri, exp_id, run_id)
    return outcome


def _run(params: CascadeParams, client: MlflowClient, run_id: str, run_name: str,
         inputs: _Inputs, cascade: Cascade, device: Any, work: Path,
         log: Callable[[str], None]) -> CascadeOutcome:
    log(f"{run_name}: {len(inputs.paths)} images, "
        f"{'detector ' + inputs.detector.name if inputs.detector else 'boxes ' + params.boxes}"
        f", classifier {inputs.target.model_uri} ({device.type})")
    batch = auto_batch_size(device)
    loader = DataLoader(_Scenes(inputs.paths), batch_size=batch, shuffle=False,
                        num_workers=min(params.num_workers, len(inputs.paths)),
                        collate_fn=_as_list)
    annotated = work / "annotated"
    detections: dict[str, list[Detection]] = {}
    start = time.perf_counter()
    batches = track(loader, len(inputs.paths), f"cascade {run_name}", "image", log=log,
                    weight=len)
    for first, images in zip(range(0, len(inputs.paths), batch), batches, strict=True):
        keys = inputs.keys[first:first + len(images)]
        if inputs.given is not None:
            found = cascade.classify(images, [inputs.given.of(k) for k in keys])
        else:
            found = cascade.run(images)
        for key, image, image_dets in zip(keys, images, found, strict=True):
            detections[key] = image_dets
            target = annotated / key
            target.parent.mkdir(parents=True, exist_ok=True)
            annotate(image, image_dets).save(target)
    wall = time.perf_counter() - start

    frame = detection_frame([detections[k] for k in inputs.keys], inputs.keys)
    write_csv(work / "detections.csv", frame.to_dict("records"), CASCADE_COLUMNS)
    write_csv(work / "skipped_files.csv",
              [{"path": p, "reason": r} for p, r in inputs.skipped], ["path", "reason"])
    n_boxes = len(frame)
    n_refined = int(frame["refined"].sum()) if n_boxes else 0
    per_class = dict.fromkeys(inputs.classifier.class_names, 0)
    for label in frame["label"] if n_boxes else []:
        per_class[label] = per_class.get(label, 0) + 1
    metrics: dict[str, float] = {
        "n_images": len(inputs.paths), "n_skipped": len(inputs.skipped), "n_boxes": n_boxes,
        "n_refined": n_refined, "detector_sec": cascade.detector_sec,
        "classifier_sec": cascade.classifier_sec,
        "images_per_sec": len(inputs.paths) / wall if wall > 0 else 0.0,
        **{f"n_final_{metric_key(c)}": n for c, n in per_class.items()}}

    logged = {f.name: bool_text(getattr(params, f.name)) for f in fields(params)
              if f.name not in ("experiment", "register", "registered_model")}
    present = client.get_run(run_id).data.params  # `mlflow run` logged its own already
    tracking.log_params_and_tags(client, run_id,
                                 {k: v for k, v in logged.items() if k not in present}, {})
    client.log_artifact(run_id, str(work / "detections.csv"), artifact_path="cascade")
    if inputs.skipped:
        client.log_artifact(run_id, str(work / "skipped_files.csv"), artifact_path="cascade")
    for key in inputs.keys[:params.annotated_artifacts]:
        folder = "/".join(["cascade", "annotated", *Path(key).parent.parts])
        client.log_artifact(run_id, str(work / "annotated" / key), artifact_path=folder)

    if inputs.truth is not None:
        report = detection_metrics(detections, {k: inputs.truth.of(k) for k in inputs.keys},
                                   [*inputs.final_classes])
        metrics.update(report.metrics)
        _log_evaluation(client, run_id, report, work / "evaluation")
        log(f"mAP@0.5 {report.metrics['map50']:.4f}  precision "
            f"{report.metrics['precision50']:.4f}  recall {report.metrics['recall50']:.4f}")
    tracking.log_metrics(client, run_id, metrics)

    outcome = CascadeOutcome(run_id, run_name, work, len(inputs.paths), n_boxes, n_refined,
                             per_class, metrics, skipped=inputs.skipped)
    if inputs.detector is not None:
        outcome.model_uri = log_cascade_model(run_id, inputs.detector, inputs.target.model_uri,
                                              cascade.settings, inputs.paths[0])
        client.set_tag(run_id, CASCADE_MODEL_URI_TAG, outcome.model_uri)
        if params.register:
            outcome.version = _register(client, params, run_id, outcome, inputs)
    return outcome


def _log_evaluation(client: MlflowClient, run_id: str, report: Any, folder: Path) -> None:
    from components.plots import plot_confusion_matrix

    folder.mkdir(parents=True, exist_ok=True)
    labels = report.labels
    write_csv(folder / "confusion.csv",
              [{"true": t, **{p: int(report.confusion[i, j]) for j, p in enumerate(labels)}}
               for i, t in enumerate(labels)], ["true", *labels])
    write_csv(folder / "per_class.csv", report.per_class,
              ["class", "n_true", "n_predicted", "true_positives", "precision50", "recall50",
               "ap50"])
    (folder / "detection_report.json").write_text(json.dumps(
        {"iou": 0.5, "metrics": report.metrics, "per_class": report.per_class,
         "confusion": {"labels": labels, "matrix": report.confusion.tolist()}}, indent=2))
    plot_confusion_matrix(report.confusion, labels, folder / "confusion.png")
    for name in ("confusion.csv", "per_class.csv", "detection_report.json", "confusion.png"):
        client.log_artifact(run_id, str(folder / name), artifact_path="evaluation")


def log_cascade_model(run_id: str, detector: Detector, classifier_uri: str,
                      settings: CascadeSettings, example_image: Path) -> str:
    """Detector + classifier logged as one pyfunc model (`cascade`) in the run; its URI.

    The classifier travels as its own MLflow model folder, the detector as a detector file
    (architecture, class names, state dict); `components` travels as code, as with every
    cnnflow model. One scene image is the input example, run through the model at log time.
    """
    with tempfile.TemporaryDirectory(prefix="cnnflow-cascade-") as tmp:
        folder = Path(tmp)
        config = folder / "cascade.json"
        config.write_text(json.dumps({"detector": detector.name,
                                      "settings": settings.to_dict()}, indent=2))
        weights = save_detector(folder / "detector.pt", detector.name, detector.model,
                                detector.class_names)
        classifier = mlflow.artifacts.download_artifacts(classifier_uri,
                                                         dst_path=str(folder / "classifier"))
        return log_python_model(run_id, CascadeModel(),
                                {"cascade": str(config), "detector": str(weights),
                                 "classifier": classifier}, (), example_image,
                                name=MODEL_NAME, signature=cascade_signature())


def _register(client: MlflowClient, params: CascadeParams, run_id: str,
              outcome: CascadeOutcome, inputs: _Inputs) -> Any:
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id).name
    name = params.registered_model or registered_name(experiment)
    version = registry.register_version(client, outcome.model_uri, client.get_run(run_id),
                                        name, outcome.metrics, inputs.digest,
                                        inputs.root.name)
    tags = {DETECTOR_TAG: inputs.detector.name, CLASSIFIER_URI_TAG: inputs.target.model_uri,
            **{k: repr(float(v)) for k, v in outcome.metrics.items()
               if k in ("map50", "precision50", "recall50")}}
    for key, value in tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    description = (f"cnnflow cascades (detector -> classifier) of experiment {experiment}: "
                   "base64 image in, one row per box out. Serve one: `mlflow models serve -m "
                   f"models:/{name}@{registry.CHALLENGER} --env-manager local`.")
    if client.get_registered_model(name).description != description:
        client.update_registered_model(name, description=description)
    client.set_tag(run_id, REGISTERED_VERSION_TAG, f"{name}/{version.version}")
    return version
