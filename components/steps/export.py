"""Export a logged model to ONNX (fp32) and ONNX Runtime int8, check each export against the
PyTorch model on the run's own test split, and log and register the ones that pass.

Everything that can fail on the user's input is done before the `export-vN` run exists: the
run or URI, its model and split, the formats, enough train images to calibrate on, and the
export itself (the graphs are written to a temp folder first). Then, in the run:

- the PyTorch model and every format predict the same test images, and are timed on the
  same decoded images with the same threads (`measure_cost`): metrics `pytorch.<m>` and
  `<format>.<m>` (max_abs_prob_diff, top1_agreement, test_acc, test_acc_delta,
  model_size_mb, latency_ms_p50/p95, throughput_images_per_sec, passed);
- each format meets its gate (`components.serving.export.GATES`); one that fails is tagged
  `cnnflow.export.<format>` = `rejected: <reason>` and neither logged as a model nor registered;
- a passing format is logged as a pyfunc model (`<model>-<format>`, ONNX Runtime inside, the
  same signature and input example) and registered as a new version of the registered model,
  tagged `cnnflow.format` and `cnnflow.source_run`, with the alias `challenger`. Nothing is
  promoted: `cnnflow promote` applies the rule when you choose to.

The export run also carries the source run's manifest and data tags, so `cnnflow evaluate
--model-uri models:/<name>/<version>` rebuilds the same split for an exported version.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow import MlflowClient

from components import tracking
from components.data.datasets import DatasetSplits, load_rgb
from components.errors import CnnflowError
from components.names import (
    CLASS_NAMES_TAG,
    DATA_TAG,
    DATASET_DIGEST_TAG,
    DATASET_TAG,
    EXPORT_GATE_TAG,
    FORMAT_TAG,
    MODEL_TAG,
    SOURCE_MODEL_TAG,
    SOURCE_MODEL_URI_TAG,
    SOURCE_RUN_TAG,
)
from components.serving.classifier import ImageClassifier
from components.serving.cost import measure_cost
from components.serving.ensemble import EnsembleClassifier, load_member
from components.serving.export import (
    GATES,
    calibration_batch,
    check_formats,
    export_fp32,
    parity,
    write_member,
)
from components.serving.metrics import classification_metrics
from components.serving.onnx_model import ONNX_FILE, OnnxClassifier
from components.serving.predict import auto_batch_size, load_model, predict_samples
from components.steps.evaluate import (
    MANIFEST,
    check_classes,
    resolve_target,
    run_splits,
    split_samples,
)
from components.steps.params import ExportParams
from components.tracking import registry
from components.tracking.models import log_python_model

REFERENCE = "pytorch"
COST_KEYS = ("model_size_mb", "params_count", "latency_ms_p50", "latency_ms_p95",
             "throughput_images_per_sec", "cost_reliable")


class ExportStepError(CnnflowError, RuntimeError):
    """Bad export input (run, model, split, calibration); one line saying what to do."""


@dataclass
class FormatResult:
    """One format's checks, gate and (when it passed) its logged model and version."""

    fmt: str
    metrics: dict[str, float]
    reason: str = ""  # why the gate failed; empty: passed
    model_uri: str = ""
    version: Any = None

    @property
    def passed(self) -> bool:
        return not self.reason


@dataclass
class ExportOutcome:
    run_id: str
    run_name: str
    source_run_id: str
    reference: dict[str, float]
    results: list[FormatResult]
    notes: list[str] = field(default_factory=list)
    url: str = ""


def _members(model: Any) -> list[ImageClassifier]:
    return list(getattr(model, "members", [model]))


def _check_exportable(model: Any, uri: str) -> None:
    if any(not isinstance(m, ImageClassifier) for m in _members(model)):
        raise ExportStepError(f"{uri} is already an exported model (format {model.format}): "
                              "export the PyTorch model it came from")


def build_formats(model: Any, formats: list[str], calibration: list[Any], work: Path
                  ) -> dict[str, Path]:
    """Every format of every member written under `work/<format>/members/<i>/`; returns
    format -> members folder. Raises `ExportError` (one line) when an exporter gives up."""
    folders: dict[str, Path] = {}
    for i, member in enumerate(_members(model)):
        fp32 = work / "fp32" / f"{i}.onnx"
        fp32.parent.mkdir(parents=True, exist_ok=True)
        exported = export_fp32(member.model, member.config["image_size"], fp32,
                               member.config["model"])
        batch = (calibration_batch(member.transform, calibration) if "int8" in formats
                 else np.zeros((0,), np.float32))
        for fmt in formats:
            folders[fmt] = work / fmt / "members"
            write_member(fmt, fp32, exported, member.config, folders[fmt] / str(i), batch)
        member.to("cpu")  # the exporter used a contiguous CPU copy of the weights
    return folders


def load_export(model: Any, members: Path) -> Any:
    """The exported counterpart of `model`: an `OnnxClassifier`, or the same ensemble (vote,
    weights) over exported members."""
    loaded = [load_member(members / str(i)) for i in range(len(_members(model)))]
    if isinstance(model, EnsembleClassifier):
        return EnsembleClassifier().build(model.config, loaded)
    return loaded[0]


def _log_export(client: MlflowClient, run_id: str, model: Any, exported: Any, members: Path,
                name: str, example: str | None) -> str:
    """Log the exported pyfunc into the export run; returns its model URI."""
    import onnxruntime

    extra = [f"onnxruntime=={onnxruntime.__version__}"]
    if isinstance(model, EnsembleClassifier):
        with tempfile.TemporaryDirectory(prefix="cnnflow-export-") as tmp:
            config = Path(tmp) / "ensemble.json"
            config.write_text(json.dumps(model.config, indent=2))
            return log_python_model(run_id, EnsembleClassifier(),
                                    {"ensemble": str(config), "members": str(members)},
                                    exported.class_names, example, name=name,
                                    extra_requirements=extra)
    folder = members / "0"
    return log_python_model(run_id, OnnxClassifier(),
                            {"config": str(folder / "model_config.json"),
                             "onnx": str(folder / ONNX_FILE)},
                            exported.class_names, example, name=name, extra_requirements=extra)


def export(params: ExportParams, tracking_uri: str,
           log: Callable[[str], None] = lambda s: print(s, file=sys.stderr), *,
           job_run_id: str | None = None) -> ExportOutcome:
    """Export, check, log and register (`job_run_id`: the run `mlflow run` opened for this
    job, filled in as `export-vN` instead of a new run)."""
    params.validate()
    formats = check_formats(params.format_list())
    client = tracking.connect(tracking_uri)
    target = resolve_target(client, params.run_id, params.model_uri)
    source, source_id = target.run, target.run_id
    splits = run_splits(client, source)
    test = split_samples(splits, "test", source_id)
    train = split_samples(splits, "train", source_id)
    if "int8" in formats and len(train) < params.calibration_images:
        raise ExportStepError(
            f"run '{source_id}' has {len(train)} train images, fewer than "
            f"--calibration-images {params.calibration_images}: pass --calibration-images "
            f"{len(train)} or less")
    name = params.registered_model or registry.default_name(target.experiment)
    registry.check_name(name)
    model = load_model(target.model_uri).to("cpu")
    check_classes(model, splits, source_id)
    _check_exportable(model, target.model_uri)
    label = source.data.tags.get(MODEL_TAG) or ("ensemble" if hasattr(model, "members")
                                                else model.config["model"])
    calibration = ([load_rgb(p) for p, _ in train[:params.calibration_images]]
                   if "int8" in formats else [])
    with tempfile.TemporaryDirectory(prefix="cnnflow-export-") as tmp:
        work = Path(tmp)
        log(f"exporting {source.info.run_name} ({target.model_uri}) to {', '.join(formats)}")
        folders = build_formats(model, formats, calibration, work)  # before any run exists
        run_id, exp_id, run_name = tracking.open_run(
            client, step="export", experiment=params.experiment or target.experiment,
            adopt=job_run_id, tags={SOURCE_RUN_TAG: source_id,
                                    SOURCE_MODEL_URI_TAG: target.model_uri})
        with tracking.ending_run(client, run_id):
            outcome = _check_and_log(client, params, model, folders, splits, test, source,
                                     target.model_uri, name, label, run_id, run_name, work, log)
    outcome.url = tracking.run_url(tracking_uri, exp_id, run_id)
    return outcome


def _check_and_log(client: MlflowClient, params: ExportParams, model: Any,
                   folders: dict[str, Path], splits: DatasetSplits,
                   test: list[tuple[str, int]], source: Any, source_uri: str, name: str,
                   label: str, run_id: str, run_name: str, work: Path,
                   log: Callable[[str], None]) -> ExportOutcome:
    source_id = source.info.run_id
    logged = {"formats": params.formats, "calibration_images": params.calibration_images,
              "source_run": source_id, "source_model_uri": source_uri}
    present = client.get_run(run_id).data.params  # `mlflow run` logged its own already
    tracking.log_params_and_tags(
        client, run_id, {k: v for k, v in logged.items() if k not in present},
        {DATA_TAG: source.data.tags.get(DATA_TAG) or source.data.params.get("data", ""),
         DATASET_TAG: source.data.tags.get(DATASET_TAG, splits.name),
         DATASET_DIGEST_TAG: source.data.tags.get(DATASET_DIGEST_TAG, ""),
         CLASS_NAMES_TAG: source.data.tags.get(CLASS_NAMES_TAG, ""),
         SOURCE_MODEL_TAG: label})
    manifest = client.download_artifacts(source_id, MANIFEST, str(work / "manifest"))
    client.log_artifact(run_id, manifest, artifact_path="data")

    batch_size = params.batch_size or auto_batch_size(torch.device("cpu"))
    images = [load_rgb(p) for p, _ in test[:params.latency_runs]]
    labels = np.array([y for _, y in test])

    def measure(candidate: Any) -> tuple[np.ndarray, dict[str, float]]:
        predictions = predict_samples(candidate, test, batch_size)
        quality, _ = classification_metrics(predictions.log_proba, predictions.labels,
                                            splits.classes, "test_")
        cost = measure_cost(candidate, images, batch_size, params.latency_runs)
        return predictions.probs, {**quality, **cost.metrics}

    reference_probs, reference = measure(model)
    log(f"pytorch  test_acc {reference['test_acc']:.4f}  "
        f"{reference['model_size_mb']:.2f} MB  p50 {reference['latency_ms_p50']:.2f} ms")
    metrics = {f"{REFERENCE}.{k}": reference[k] for k in ("test_acc", *COST_KEYS)}
    results = []
    digest = splits.digest()
    for fmt, members in folders.items():
        exported = load_export(model, members)
        probs, measured = measure(exported)
        checks = {**parity(reference_probs, probs, labels),
                  **{k: measured[k] for k in COST_KEYS}}
        reason = GATES[fmt](checks)
        result = FormatResult(fmt, checks, reason)
        checks["passed"] = float(result.passed)
        metrics.update({f"{fmt}.{k}": v for k, v in checks.items()})
        if result.passed:
            result.model_uri = _log_export(client, run_id, model, exported, members,
                                           f"{label}-{fmt}", test[0][0])
            version_metrics = {**measured, **checks}
            run = client.get_run(run_id)
            result.version = registry.register_version(client, result.model_uri, run, name,
                                                       version_metrics, digest, splits.name)
            tags = {FORMAT_TAG: fmt, SOURCE_RUN_TAG: source_id, MODEL_TAG: label}
            for key, value in tags.items():
                client.set_model_version_tag(name, result.version.version, key, value)
            model_id = registry.logged_model_id(client, result.model_uri)
            if model_id:
                client.set_logged_model_tags(model_id, tags)
            client.set_tag(run_id, EXPORT_GATE_TAG.format(fmt),
                           f"registered {name} v{result.version.version}")
        else:
            client.set_tag(run_id, EXPORT_GATE_TAG.format(fmt), f"rejected: {reason}")
        log(f"{fmt}  {'passed' if result.passed else 'REJECTED (' + reason + ')'}")
        results.append(result)
    tracking.log_metrics(client, run_id, metrics)
    return ExportOutcome(run_id, run_name, source_id, reference, results)
