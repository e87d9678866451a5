"""`explain`: what a logged model sees in your own photos - prediction, top-3, Grad-CAM.

`run_explain` takes a model (a train or ensemble run id, or a `models:/` URI) and an image
file or a folder of images (any depth), predicts them through the model's own serving path,
computes the Grad-CAM map of the predicted class (`components/serving/explain.py`; per
member for an ensemble) and writes, into `--out` (default
`<reports_dir>/explain/<images>_<model run>/`):

- one figure per image (`<NNN>_<name>.png`: the image, the model's map, and each member's
  map for an ensemble), `predictions.csv` (file, predicted class, confidence, top-3);
- `index.html`, rendered from `templates/explain.html.j2`, linking the figures relatively.

The folder is built beside `--out` and swapped into place when complete (an earlier explain
output there is replaced; any other non-empty folder is refused), and logged under
`explain/` into an `explain-vN` run tagged with the model it explained (`cnnflow.source_run`,
`cnnflow.source_model_uri`), in the model's run's experiment.

An ONNX export (a version `cnnflow export` registered, or the export run's id) has no
gradients: its source model, named by the export run's tags, is explained instead, and the
command says so in one line.

Every input problem is found before the run is created: a missing path, a file that is not
an image, a folder without images, a run without a model, an unknown `models:/` URI.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient

from components import tracking
from components.data.datasets import (
    IMAGE_EXTENSIONS,
    load_rgb,
    remove_stale_tmp,
    verify_images,
)
from components.errors import CnnflowError
from components.files import building, slug, write_csv
from components.humanize import plural
from components.names import MODEL_URI_TAG, SOURCE_MODEL_URI_TAG, SOURCE_RUN_TAG
from components.nn.engine import resolve_device
from components.serving.predict import auto_batch_size, load_model, predict_samples
from components.steps.evaluate import Target, get_run, resolve_target
from components.steps.params import ExplainParams

TEMPLATE = "explain.html.j2"
TOP_K = 3
# The files an explain output holds: a folder with both may be replaced by a new one.
MARKERS = ("index.html", "predictions.csv")


class ExplainError(CnnflowError, ValueError):
    """Bad explain input (images, model, output folder); one line saying what to do."""


@dataclass
class ExplainOutcome:
    run_id: str
    run_name: str
    out: Path  # the output folder
    index: Path  # out/index.html
    n_images: int
    model_uri: str  # the model explained (an export's source model)
    notes: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Checks, before any run exists
# --------------------------------------------------------------------------------------------


def list_images(path: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """(readable images, [(path, reason) skipped]) of an image file or a folder (any depth,
    hidden entries ignored). A lone file that is not an image, or a folder with no readable
    image, is an ExplainError."""
    if path.is_file():
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            raise ExplainError(f"{path} is not an image file ({path.suffix or 'no suffix'}): "
                               f"pass a {', '.join(sorted(IMAGE_EXTENSIONS))} file or a "
                               "folder of images")
        bad = verify_images([path])
        if bad:
            raise ExplainError(f"{path} cannot be read as an image ({bad[0][1]}): pass an "
                               "image file or a folder of images")
        return [path], []
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / n for n in sorted(filenames)
                  if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_EXTENSIONS]
    found.sort(key=lambda p: p.as_posix())
    skipped = verify_images(found)
    bad = {p for p, _ in skipped}
    images = [p for p in found if str(p) not in bad]
    if not images:
        raise ExplainError(f"no readable images in {path} ({len(skipped)} unreadable): pass "
                           f"a folder holding {', '.join(sorted(IMAGE_EXTENSIONS))} files")
    return images, skipped


def resolve_explained(client: MlflowClient, model: str) -> tuple[Target, str]:
    """The model to explain and a note: a run id or `models:/` URI; an ONNX export (its
    version, or its export run) is followed to the model it was exported from."""
    model = model.strip()
    is_uri = model.startswith("models:/")
    if not is_uri:
        tags = get_run(client, model).data.tags
        if not tags.get(MODEL_URI_TAG) and not tags.get(SOURCE_MODEL_URI_TAG):
            raise ExplainError(f"run '{model}' has no logged model (no cnnflow.model_uri "
                               "tag): pass a finished train or ensemble run, or a models:/ "
                               "URI")
        if not tags.get(MODEL_URI_TAG):  # an export run
            return _source_of(client, model, tags)
        return resolve_target(client, run_id=model), ""
    target = resolve_target(client, model_uri=model)
    tags = target.run.data.tags
    if not tags.get(MODEL_URI_TAG) and tags.get(SOURCE_MODEL_URI_TAG):
        return _source_of(client, model, tags)
    return target, ""


def _source_of(client: MlflowClient, given: str, tags: dict[str, str]) -> tuple[Target, str]:
    source = tags[SOURCE_MODEL_URI_TAG]
    source_run = tags.get(SOURCE_RUN_TAG, "")
    target = (resolve_target(client, run_id=source_run) if source_run
              and not source.startswith("models:/") else resolve_target(client, model_uri=source))
    return target, (f"{given} is an ONNX export (no gradients for Grad-CAM): explaining the "
                    f"model it was exported from, {source} (run {target.run_id})")


def check_out(out: Path, images: Path) -> None:
    """The output folder may be new, empty, or an earlier explain output; never inside the
    images (a second run would explain the figures)."""
    root = images if images.is_dir() else images.parent
    if images.is_dir() and out.resolve().is_relative_to(root.resolve()):
        raise ExplainError(f"output folder {out} is inside the images folder: pass an --out "
                           "elsewhere")
    if out.exists() and not out.is_dir():
        raise ExplainError(f"output {out} is a file: pass a folder as --out")
    if out.is_dir() and any(out.iterdir()) and not all((out / m).is_file() for m in MARKERS):
        raise ExplainError(f"output folder {out} is not empty and not an earlier explain "
                           "output: pass a new --out")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def render_index(values: dict[str, Any]) -> str:
    """index.html from the Jinja2 template (autoescaped)."""
    from components.steps.templating import render

    return render(TEMPLATE, **values)


def _write(work: Path, model: Any, paths: list[Path], root: Path, probs: Any,
           batch_size: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """One figure per image and the rows of predictions.csv / index.html, into `work`."""
    from components import plots
    from components.serving.explain import EXPLAIN_BATCH, explain_images

    classes = list(model.class_names)
    rows: list[dict[str, Any]] = []
    step = max(EXPLAIN_BATCH, batch_size)
    for start in range(0, len(paths), step):
        chunk = paths[start:start + step]
        images = [load_rgb(p) for p in chunk]
        preds = [int(probs[start + i].argmax()) for i in range(len(chunk))]
        for i, (path, image, cam) in enumerate(zip(chunk, images,
                                                   explain_images(model, images, preds),
                                                   strict=True)):
            k = start + i
            p = probs[k]
            top = [(classes[j], float(p[j])) for j in p.argsort()[::-1][:TOP_K]]
            name = path.relative_to(root).as_posix() if root != path else path.name
            figure = f"{k + 1:03d}_{slug(path.stem)}.png"
            panels = [("model" if not cam.members else "ensemble (mean)", cam.cam)]
            panels += list(zip(cam.member_names, cam.members, strict=True))
            plots.plot_cam_panels(image, panels, work / figure,
                                  f"{name}: {top[0][0]} ({top[0][1]:.0%})")
            rows.append({"name": name, "figure": figure, "predicted": top[0][0],
                         "confidence": top[0][1], "top": top})
        if len(paths) > step:
            log(f"explain: {min(start + step, len(paths))}/{len(paths)} images")
    table = []
    for row in rows:
        entry = {"file": row["name"], "figure": row["figure"], "predicted": row["predicted"],
                 "confidence": f"{row['confidence']:.6f}"}
        for r, (cls, prob) in enumerate(row["top"], start=1):
            entry[f"top{r}"], entry[f"top{r}_prob"] = cls, f"{prob:.6f}"
        table.append(entry)
    write_csv(work / "predictions.csv", table)
    return rows


# --------------------------------------------------------------------------------------------
# The `explain` step
# --------------------------------------------------------------------------------------------


def run_explain(params: ExplainParams, tracking_uri: str,
                log: Callable[[str], None] = lambda s: print(s, file=sys.stderr), *,
                job_run_id: str | None = None) -> ExplainOutcome:
    """Predict, explain and write the images' report; log it into an `explain-vN` run
    (`job_run_id`: the run opened for this job, filled in instead of a new one)."""
    from components.serving.explain import check_explainable, torch_members

    params.validate()
    images_path = Path(params.images).expanduser().resolve()
    paths, skipped = list_images(images_path)
    client = tracking.connect(tracking_uri)
    target, note = resolve_explained(client, params.model)
    notes = [note] if note else []
    out = params.out_dir(target.run.info.run_name or target.run_id)
    check_out(out, images_path)
    device = resolve_device(params.device)
    model = load_model(target.model_uri).to(device)
    check_explainable(model, target.model_uri)
    if note:
        log(f"note: {note}")
    if skipped:
        notes.append(f"{len(skipped)} unreadable image files skipped (first: {skipped[0][0]})")
    members = torch_members(model)
    if len(members) < len(getattr(model, "members", [model])):
        notes.append(f"Grad-CAM of the {len(members)} PyTorch members only (ONNX members have "
                     "no gradients)")
    run_id, _, run_name = tracking.open_run(
        client, step="explain", experiment=params.experiment or target.experiment,
        adopt=job_run_id, tags={SOURCE_RUN_TAG: target.run_id,
                                SOURCE_MODEL_URI_TAG: target.model_uri})
    # Built beside --out and swapped in when complete: a failure leaves nothing behind.
    remove_stale_tmp(out.parent, f".{out.name}-tmp-*")
    with tracking.ending_run(client, run_id), building(out) as work:
        log(f"explaining {plural(len(paths), 'image')} with {target.model_uri} ({device.type})")
        batch_size = params.batch_size or auto_batch_size(device)
        predictions = predict_samples(model, [(str(p), 0) for p in paths], batch_size,
                                      params.num_workers, progress=f"explain {run_name}")
        rows = _write(work, model, paths, images_path, predictions.probs, batch_size, log)
        layers = sorted({f"{m.config['model']}.{m.model.cam_layer}" for m, _ in members})
        (work / "index.html").write_text(render_index({
            "title": f"{images_path.name} with {target.run.info.run_name}",
            "model_uri": target.model_uri, "source_run": target.run_id,
            "run_name": run_name, "images": str(images_path), "rows": rows,
            "notes": notes, "layers": ", ".join(layers),
            "ensemble": len(getattr(model, "members", [])) > 1}))
        present = client.get_run(run_id).data.params
        logged = {"model": params.model, "images": str(images_path), "out": str(out)}
        tracking.log_params_and_tags(
            client, run_id, {k: v for k, v in logged.items() if k not in present}, {})
        tracking.log_metrics(client, run_id, {"n_images": len(paths),
                                              "n_skipped": len(skipped)})
        client.log_artifacts(run_id, str(work), artifact_path="explain")
    return ExplainOutcome(run_id, run_name, out, out / "index.html", len(paths),
                          target.model_uri, notes, skipped)
