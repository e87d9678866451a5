"""Confident pseudo-labelling, and adding the labelled images to training without leakage.

The jellyfish seed grew a 900-image dataset by collecting images from the web and keeping
only those a pretrained EfficientNetV2 labelled with >= 95 % confidence, taking care that
val/test images never leaked into train. Here:

- `run_pseudo_label` predicts every image of an unlabelled folder with a logged model (a
  `models:/` URI or a run id), writes those at or above the threshold into a new dataset
  folder in class layout (copies, hard links or symlinks) with `.cnnflow/pseudo_labels.csv`
  (source path, file, predicted class, confidence), lists the rest in
  `.cnnflow/below_threshold.csv`, and logs a `pseudo_label-vN` run with the counts per class.
  The CSVs sit in a hidden folder, so no class folder can collide with them and dataset scans
  skip them; the folder is built beside `--out` and moved into place only when complete, so a
  failure leaves nothing behind and a re-run works.
- `extra_train_samples` reads such a folder for `train --extra-train`: the images join the
  train split only, and any whose content (sha1 of the file bytes, as `preprocess` hashes)
  equals a val or test image of the run's split is excluded, so nothing leaks.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from components import tracking
from components.data.datasets import (
    IMAGE_EXTENSIONS,
    remove_stale_tmp,
    verify_images,
)
from components.errors import CnnflowError
from components.files import replace_dir, write_csv
from components.humanize import plural
from components.nn.engine import resolve_device
from components.serving.metrics import metric_key
from components.serving.predict import auto_batch_size, load_model, predict_samples
from components.steps.evaluate import resolve_target
from components.steps.params import PseudoLabelParams


class PseudoLabelError(CnnflowError, ValueError):
    """Bad pseudo-labelling input; one line saying what to do."""


REPORT_DIR = ".cnnflow"  # in --out; hidden, so never a class folder and skipped by dataset scans
REPORT_FILES = ("pseudo_labels.csv", "below_threshold.csv", "skipped_files.csv")


# --------------------------------------------------------------------------------------------
# Placing files: a registry, so another way (e.g. reflinks) is one decorated function
# --------------------------------------------------------------------------------------------

PLACERS: dict[str, Callable[[Path, Path], None]] = {
    "copy": lambda src, dst: shutil.copy2(src, dst),
    "hardlink": lambda src, dst: os.link(src, dst),
    "symlink": lambda src, dst: os.symlink(src.resolve(), dst),
}


# --------------------------------------------------------------------------------------------
# The `pseudo-label` step
# --------------------------------------------------------------------------------------------


def check(params: PseudoLabelParams) -> None:
    """Every check before a run exists: the parameters' own, then `mode` against PLACERS."""
    params.validate()
    if params.mode not in PLACERS:
        raise PseudoLabelError(f"unknown mode '{params.mode}': use one of "
                               f"{', '.join(sorted(PLACERS))}")


@dataclass
class PseudoLabelOutcome:
    run_id: str
    run_name: str
    out: Path
    n_images: int
    n_confident: int
    n_below: int
    per_class: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _unlabelled_images(folder: Path) -> list[Path]:
    """Every image file under `folder` (any depth, hidden entries ignored), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.as_posix())


def run_pseudo_label(params: PseudoLabelParams, tracking_uri: str,
                     log: Callable[[str], None] = lambda s: print(s, file=sys.stderr), *,
                     job_run_id: str | None = None) -> PseudoLabelOutcome:
    """Label confidently predicted images into a new class-layout folder; log the run
    (`job_run_id`: the run opened for this job, filled in instead of a new one)."""
    check(params)
    client = tracking.connect(tracking_uri)
    is_uri = params.model.startswith("models:/")
    target = resolve_target(client, run_id="" if is_uri else params.model,
                            model_uri=params.model if is_uri else "")
    images_dir = Path(params.images).expanduser().resolve()
    paths = _unlabelled_images(images_dir)
    skipped = verify_images(paths)
    bad = {p for p, _ in skipped}
    paths = [p for p in paths if str(p) not in bad]
    if not paths:
        raise PseudoLabelError(f"no readable images in {images_dir}")
    device = resolve_device(params.device)
    model = load_model(target.model_uri).to(device)
    classes = list(model.class_names)
    _check_class_names(classes, target.model_uri)
    out = params.out_dir()
    run_id, _, run_name = tracking.open_run(
        client, step="pseudo_label", experiment=params.experiment or target.experiment,
        adopt=job_run_id)
    # Built beside --out and moved into place when complete: a failure leaves nothing behind.
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(out.parent, f".{out.name}-tmp-*")
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-tmp-", dir=out.parent))
    try:
        with tracking.ending_run(client, run_id):
            log(f"pseudo-labelling {plural(len(paths), 'image')} with {target.model_uri} "
                f"({device.type})")
            predictions = predict_samples(
                model, [(str(p), 0) for p in paths],
                params.batch_size or auto_batch_size(device), params.num_workers,
                progress=f"pseudo-label {run_name}")
            confident, below = [], []
            for path, row in zip(paths, predictions.probs, strict=True):
                best = int(row.argmax())
                entry = {"path": str(path), "predicted": classes[best],
                         "confidence": float(row[best])}
                (confident if row[best] >= params.threshold else below).append(entry)
            per_class = dict.fromkeys(classes, 0)
            for entry in confident:
                src = Path(entry["path"])
                dst = _free_name(work / entry["predicted"], src, images_dir)
                PLACERS[params.mode](src, dst)
                entry["file"] = dst.relative_to(work).as_posix()
                per_class[entry["predicted"]] += 1
            report = work / REPORT_DIR
            report.mkdir()
            write_csv(report / "pseudo_labels.csv", confident,
                      ["path", "file", "predicted", "confidence"])
            write_csv(report / "below_threshold.csv", below, ["path", "predicted", "confidence"])
            write_csv(report / "skipped_files.csv",
                      [{"path": p, "reason": r} for p, r in skipped], ["path", "reason"])
            logged = {f.name: getattr(params, f.name) for f in fields(params)}
            logged["out"] = str(out)
            present = client.get_run(run_id).data.params
            tracking.log_params_and_tags(
                client, run_id, {k: v for k, v in logged.items() if k not in present},
                {"cnnflow.model_uri_used": target.model_uri,
                 "cnnflow.source_run_id": target.run_id})
            metrics = {"n_images": len(paths), "n_confident": len(confident),
                       "n_below_threshold": len(below), "n_skipped": len(skipped),
                       **{f"n_confident_{metric_key(c)}": n for c, n in per_class.items()}}
            tracking.log_metrics(client, run_id, metrics)
            for name in REPORT_FILES:
                client.log_artifact(run_id, str(report / name), artifact_path="pseudo_label")
            if out.exists():
                out.rmdir()  # validated empty up front; refuses anything written there since
            replace_dir(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return PseudoLabelOutcome(run_id, run_name, out, len(paths), len(confident), len(below),
                              per_class, skipped)


def _check_class_names(classes: list[str], model_uri: str) -> None:
    """Every class must be a plain, visible folder name, or its images would land elsewhere."""
    for name in classes:
        if name in ("", ".", "..") or name.startswith(".") or "/" in name or os.sep in name:
            raise PseudoLabelError(f"class {name!r} of {model_uri} is not a plain folder name: "
                                   "pseudo-label only models whose classes are folder names")


def _free_name(folder: Path, src: Path, root: Path) -> Path:
    """`<class>/<name>`, or `<class>/<sub_dir_name>` when two sources share a file name."""
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / src.name
    if not dst.exists() and not dst.is_symlink():
        return dst
    flat = "_".join(src.relative_to(root).parts)
    dst = folder / flat
    n = 1
    while dst.exists() or dst.is_symlink():
        dst = folder / f"{n}_{flat}"
        n += 1
    return dst
