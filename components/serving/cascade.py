"""Detector -> classifier: find the objects, then re-classify the crops a classifier knows.

The cup/glass seed ran a general detector first: bottles stayed "bottle", and whatever it
called "cup" or "wine glass" was cropped and re-classified by a fine-tuned MobileNetV2 into
cup / beer glass / soju glass. Here:

- `filter_boxes`: boxes below the score threshold, or narrower / shorter than `min_box`
  pixels, go; then non-maximum suppression across classes (torchvision's `nms`);
- `Cascade.classify`: the boxes whose detector label is in `refine` are cropped (padded by
  `margin` of their width and height, clamped to the image) and run through the cnnflow
  classifier in batches of `batch_size` crops (0: 4 on CPU, 64 on CUDA, as evaluate), with
  the classifier's own preprocessing (each crop resized like its training images); the
  others keep the detector's label and score;
- `CascadeModel`: detector + classifier as one `mlflow.pyfunc` model, base64 images in, one
  row per box out (`CASCADE_COLUMNS`, `image` = the input's index), so
  `mlflow models serve` answers an image with its boxes and final labels;
- `detection_metrics`: final boxes against true ones, matched by pycocotools at IoU 0.5
  (per class: precision and recall of the kept boxes; class-agnostic: the confusion of final
  labels), mAP@0.5 by torchmetrics' `MeanAveragePrecision`. Both are imported only there: a
  served cascade needs neither.

A final box's `confidence` is the classifier's probability for a refined box, the detector's
score otherwise; its ranking `score` (for mAP) is the detector's score times that
probability for a refined box.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from PIL import Image, ImageDraw

from components.data.boxes import Box
from components.errors import CnnflowError
from components.serving.classifier import IMAGE_COLUMN, _items, to_pil


class CascadeError(CnnflowError, ValueError):
    """A cascade that cannot be built as asked; one line saying what to do."""


# One row per final box, the same in detections.csv (`image` = the file) and when served
# (`image` = the index of the input image).
CASCADE_COLUMNS = ("image", "x1", "y1", "x2", "y2", "detector_label", "detector_score",
                   "label", "confidence", "refined")
_COLUMN_TYPES = ("long", "double", "double", "double", "double", "string", "double", "string",
                 "double", "boolean")
BACKGROUND = "background"  # the confusion's row / column for extra and missed boxes
IOU_MATCH = 0.5


@dataclass(frozen=True)
class CascadeSettings:
    """What decides the cascade's output, beside its two models."""

    refine: tuple[str, ...]
    score_threshold: float = 0.5
    iou_threshold: float = 0.5
    margin: float = 0.1
    min_box: int = 8
    batch_size: int = 0  # crops per forward pass; 0 = auto_batch_size of the classifier's device

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "refine": list(self.refine)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CascadeSettings:
        return cls(**{**data, "refine": tuple(data["refine"])})


@dataclass(frozen=True)
class Detection:
    """One final box: the detector's box, label and score, and the label it ends with."""

    box: Box
    label: str
    confidence: float
    refined: bool

    @property
    def score(self) -> float:
        """How sure the cascade is of this box and label: what mAP ranks by."""
        return self.box.score * self.confidence if self.refined else self.box.score

    def row(self, image: Any) -> dict[str, Any]:
        b = self.box
        return {"image": image, "x1": b.x1, "y1": b.y1, "x2": b.x2, "y2": b.y2,
                "detector_label": b.label, "detector_score": b.score, "label": self.label,
                "confidence": self.confidence, "refined": self.refined}


def check_refine(refine: Sequence[str], labels: Sequence[str], source: str) -> None:
    """Every `--refine` name must be a class the detector (or boxes file) has; one line
    naming the close ones otherwise."""
    import difflib

    if not refine:
        raise CascadeError("pass --refine: the detector classes the classifier re-labels, "
                           "e.g. --refine 'cup,wine glass'")
    for name in refine:
        if name in labels:
            continue
        lower = {label.lower(): label for label in labels}
        close = difflib.get_close_matches(name.lower(), list(lower), n=5, cutoff=0.5)
        if name.lower() in lower and lower[name.lower()] not in close:
            close.insert(0, name.lower())
        hint = (f"close: {', '.join(repr(lower[c]) for c in close)}" if close else
                f"it has {len(labels)} classes, e.g. {', '.join(map(repr, labels[:5]))}")
        raise CascadeError(f"--refine '{name}' is not a class of {source} ({hint}): pass "
                           "class names exactly as the detector spells them")


def filter_boxes(boxes: Sequence[Box], settings: CascadeSettings) -> list[Box]:
    """Score threshold, minimum size, then NMS across classes; best score first."""
    from torchvision.ops import nms

    kept = [b for b in boxes if b.score >= settings.score_threshold
            and b.width >= settings.min_box and b.height >= settings.min_box]
    if len(kept) < 2:
        return kept
    keep = nms(torch.tensor([b.xyxy for b in kept], dtype=torch.float32),
               torch.tensor([b.score for b in kept], dtype=torch.float32),
               settings.iou_threshold)
    return [kept[i] for i in keep.tolist()]


def crop(image: Image.Image, box: Box, margin: float) -> Image.Image:
    """The box padded by `margin` of its width and height on each side, clamped to the
    image, at least one pixel."""
    dx, dy = box.width * margin, box.height * margin
    x1, y1 = max(0, int(np.floor(box.x1 - dx))), max(0, int(np.floor(box.y1 - dy)))
    x2 = min(image.width, max(x1 + 1, int(np.ceil(box.x2 + dx))))
    y2 = min(image.height, max(y1 + 1, int(np.ceil(box.y2 + dy))))
    return image.crop((x1, y1, x2, y2))


def input_sizes(classifier: Any, uri: str = "the classifier") -> list[int]:
    """The square input sizes the classifier resizes crops to (one per distinct member
    preprocessing); one line when a model does not say."""
    members = getattr(classifier, "members", [classifier])
    sizes = []
    for member in members:
        size = (getattr(member, "config", None) or {}).get("image_size")
        if not isinstance(size, int) or size <= 0:
            raise CascadeError(f"{uri} does not record its input size (no image_size in its "
                               "model config): use a classifier logged by cnnflow train, "
                               "ensemble or export")
        sizes.append(size)
    return sorted(set(sizes))


class Cascade:
    """A detector (optional: boxes may come from elsewhere) and a cnnflow classifier.

    `detector_sec` and `classifier_sec` add up the time spent in each stage.
    """

    def __init__(self, classifier: Any, settings: CascadeSettings,
                 detector: Any | None = None) -> None:
        self.classifier = classifier
        self.settings = settings
        self.detector = detector
        self.refine = frozenset(settings.refine)
        self.detector_sec = 0.0
        self.classifier_sec = 0.0
        if detector is not None:
            detector.lower_score_threshold(settings.score_threshold)

    def detect(self, images: Sequence[Image.Image]) -> list[list[Box]]:
        if self.detector is None:
            raise CascadeError("this cascade has no detector: pass the boxes")
        start = time.perf_counter()
        found = self.detector.detect(images)
        self.detector_sec += time.perf_counter() - start
        return found

    def crop_batch(self) -> int:
        """Crops per forward pass: the setting, else evaluate's choice for the classifier's
        device (64 on CUDA; 4 on CPU, where larger batches of 224-px inputs are no faster)."""
        from components.serving.predict import auto_batch_size

        return self.settings.batch_size or auto_batch_size(
            getattr(self.classifier, "device", torch.device("cpu")))

    def classify_crops(self, crops: Sequence[Image.Image], batch_size: int | None = None
                       ) -> tuple[list[str], list[float]]:
        """Crops -> (class name, probability), `batch_size` (default `crop_batch()`) crops
        per forward pass."""
        batch_size = batch_size or self.crop_batch()
        transforms = self.classifier.input_transforms()
        names = self.classifier.class_names
        labels: list[str] = []
        confidences: list[float] = []
        start = time.perf_counter()
        for first in range(0, len(crops), batch_size):
            chunk = crops[first:first + batch_size]
            inputs = [torch.stack([t(c) for c in chunk]) for t in transforms]
            probs = self.classifier.score_batch(inputs)[0].exp()
            best = probs.max(dim=1)
            labels += [names[i] for i in best.indices.tolist()]
            confidences += best.values.double().tolist()
        self.classifier_sec += time.perf_counter() - start
        return labels, confidences

    def classify(self, images: Sequence[Image.Image], boxes: Sequence[Sequence[Box]]
                 ) -> list[list[Detection]]:
        """Filter each image's boxes, re-classify the refined ones (all crops of the batch
        together), keep the others as the detector labelled them."""
        kept = [filter_boxes(b, self.settings) for b in boxes]
        crops, where = [], []
        for i, (image, image_boxes) in enumerate(zip(images, kept, strict=True)):
            for j, box in enumerate(image_boxes):
                if box.label in self.refine:
                    crops.append(crop(image, box, self.settings.margin))
                    where.append((i, j))
        labels, confidences = self.classify_crops(crops) if crops else ([], [])
        refined = {w: (lab, conf) for w, lab, conf in zip(where, labels, confidences,
                                                            strict=True)}
        out = []
        for i, image_boxes in enumerate(kept):
            row = []
            for j, box in enumerate(image_boxes):
                if (i, j) in refined:
                    label, confidence = refined[(i, j)]
                    row.append(Detection(box, label, confidence, True))
                else:
                    row.append(Detection(box, box.label, box.score, False))
            out.append(row)
        return out

    def run(self, images: Sequence[Image.Image]) -> list[list[Detection]]:
        return self.classify(images, self.detect(images))


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------

REFINED_COLOUR, KEPT_COLOUR = (230, 40, 40), (40, 110, 230)


def annotate(image: Image.Image, detections: Sequence[Detection]) -> Image.Image:
    """A copy of the image with each final box and `label confidence` drawn: red for boxes
    the classifier re-labelled, blue for boxes that kept the detector's label."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = max(1, round(max(out.size) / 200))
    for det in detections:
        b, colour = det.box, REFINED_COLOUR if det.refined else KEPT_COLOUR
        draw.rectangle(b.xyxy, outline=colour, width=width)
        text = f"{det.label} {det.confidence:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text)
        y = b.y1 - (bottom - top) - 2 if b.y1 >= bottom - top + 2 else b.y1
        draw.rectangle((b.x1, y, b.x1 + right - left + 2, y + bottom - top + 2), fill=colour)
        draw.text((b.x1 + 1, y), text, fill=(255, 255, 255))
    return out


# --------------------------------------------------------------------------------------------
# The pyfunc model
# --------------------------------------------------------------------------------------------


def cascade_signature() -> ModelSignature:
    """Base64 `image` in; one row per final box out (`image` = the input's index)."""
    return ModelSignature(inputs=Schema([ColSpec("string", IMAGE_COLUMN)]),
                          outputs=Schema([ColSpec(t, c) for c, t in
                                          zip(CASCADE_COLUMNS, _COLUMN_TYPES, strict=True)]))


def detection_frame(detections: Sequence[Sequence[Detection]],
                    names: Sequence[Any] | None = None) -> pd.DataFrame:
    """One row per final box; `image` is `names[i]` (default: the index i)."""
    rows = [det.row(i if names is None else names[i])
            for i, image_dets in enumerate(detections) for det in image_dets]
    frame = pd.DataFrame(rows, columns=list(CASCADE_COLUMNS))
    return frame.astype({"refined": bool}) if len(frame) else frame


class CascadeModel(mlflow.pyfunc.PythonModel):
    """Detector + classifier as one servable model. Artifacts: `cascade` (settings and the
    detector's name, JSON), `detector` (a detector file: architecture, class names, state
    dict) and `classifier` (the cnnflow classifier's own MLflow model folder)."""

    _skip_type_hint_validation = True

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from components.nn.detectors import load_detector
        from components.serving.predict import load_model

        config = json.loads(Path(context.artifacts["cascade"]).read_text())
        detector = load_detector(config["detector"], context.artifacts["detector"])
        classifier = load_model(context.artifacts["classifier"])
        self.build(config, classifier, detector)

    def build(self, config: dict[str, Any], classifier: Any, detector: Any) -> CascadeModel:
        self.config = config
        self.cascade = Cascade(classifier, CascadeSettings.from_dict(config["settings"]),
                               detector)
        return self

    def predict(self, context, model_input, params: dict[str, Any] | None = None
                ) -> pd.DataFrame:
        images = [to_pil(item) for item in _items(model_input)]
        detections: list[list[Detection]] = []
        for first in range(0, len(images), 4):  # a few images per detector pass
            detections += self.cascade.run(images[first:first + 4])
        return detection_frame(detections)


# --------------------------------------------------------------------------------------------
# Judging final boxes against true ones
# --------------------------------------------------------------------------------------------


@dataclass
class DetectionReport:
    """What `detection_metrics` found: metrics, and the confusion of final labels over
    `labels` (the classes, then `background`: rows true, columns predicted)."""

    metrics: dict[str, float]
    labels: list[str]
    confusion: np.ndarray
    per_class: list[dict[str, Any]]


def _coco(keys: Sequence[str], boxes: dict[str, Sequence[tuple[Box, float]]],
          category: dict[str, int]) -> Any:
    from pycocotools.coco import COCO

    coco = COCO()
    annotations = []
    for image_id, key in enumerate(keys, start=1):
        for box, score in boxes.get(key, []):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "category_id": category[box.label],
                                "bbox": [box.x1, box.y1, box.width, box.height],
                                "area": box.width * box.height, "iscrowd": 0,
                                "score": score})
    coco.dataset = {"images": [{"id": i} for i in range(1, len(keys) + 1)],
                    "annotations": annotations,
                    "categories": [{"id": i, "name": n} for n, i in category.items()]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _matches(truth: Any, found: Any, use_cats: bool) -> list[dict[str, Any]]:
    """pycocotools' per-image matching at IoU 0.5 (greedy by score, as COCO evaluates)."""
    from pycocotools.cocoeval import COCOeval

    evaluation = COCOeval(truth, found, "bbox")
    evaluation.params.iouThrs = np.array([IOU_MATCH])
    evaluation.params.maxDets = [1_000_000]
    evaluation.params.areaRng = [[0, 1e12]]
    evaluation.params.areaRngLbl = ["all"]
    evaluation.params.useCats = int(use_cats)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation.evaluate()
    return [e for e in evaluation.evalImgs if e is not None]


def detection_metrics(predicted: dict[str, Sequence[Detection]],
                      truth: dict[str, Sequence[Box]], classes: Sequence[str]
                      ) -> DetectionReport:
    """Per class: precision and recall of the final boxes at IoU 0.5 (pycocotools'
    matching) and AP@0.5; overall: mAP@0.5 (torchmetrics), precision and recall over all
    boxes; the confusion of final labels of class-agnostic matches at IoU 0.5.

    `predicted` and `truth` are keyed by image; an image missing from one has no boxes there.
    """
    from torchmetrics.detection import MeanAveragePrecision

    from components.serving.metrics import metric_key

    keys = sorted(set(predicted) | set(truth))
    labels = list(dict.fromkeys([*classes, *(b.label for k in keys for b in truth.get(k, [])),
                                 *(d.label for k in keys for d in predicted.get(k, []))]))
    category = {name: i for i, name in enumerate(labels, start=1)}
    final = {k: [(Box(*d.box.xyxy, d.label, d.score), d.score) for d in predicted.get(k, [])]
             for k in keys}
    gt = _coco(keys, {k: [(b, 1.0) for b in truth.get(k, [])] for k in keys}, category)
    dt = _coco(keys, final, category)

    counts = {c: {"tp": 0, "n_predicted": 0, "n_true": 0} for c in category.values()}
    for e in _matches(gt, dt, use_cats=True):
        count = counts[e["category_id"]]
        ignored = np.asarray(e["dtIgnore"][0], bool)
        count["tp"] += int(((np.asarray(e["dtMatches"][0]) > 0) & ~ignored).sum())
        count["n_predicted"] += int((~ignored).sum())
        count["n_true"] += int((np.asarray(e["gtIgnore"]) == 0).sum())

    index = {name: i for i, name in enumerate(labels)}
    background = len(labels)
    confusion = np.zeros((len(labels) + 1, len(labels) + 1), dtype=np.int64)
    for e in _matches(gt, dt, use_cats=False):
        matched_true = set()
        for dt_id, gt_id in zip(e["dtIds"], np.asarray(e["dtMatches"][0]).astype(int),
                                strict=True):
            row = index[labels[gt.anns[gt_id]["category_id"] - 1]] if gt_id else background
            col = index[labels[dt.anns[dt_id]["category_id"] - 1]]
            confusion[row, col] += 1
            matched_true.add(gt_id)
        for gt_id in e["gtIds"]:
            if gt_id not in matched_true:
                confusion[index[labels[gt.anns[gt_id]["category_id"] - 1]], background] += 1

    mean_ap = MeanAveragePrecision(box_format="xyxy", iou_type="bbox",
                                   iou_thresholds=[IOU_MATCH], class_metrics=True,
                                   backend="pycocotools")
    for k in keys:
        preds = final[k]
        mean_ap.update(
            [{"boxes": torch.tensor([b.xyxy for b, _ in preds], dtype=torch.float32
                                    ).reshape(-1, 4),
              "scores": torch.tensor([s for _, s in preds], dtype=torch.float32),
              "labels": torch.tensor([category[b.label] for b, _ in preds], dtype=torch.long)}],
            [{"boxes": torch.tensor([b.xyxy for b in truth.get(k, [])], dtype=torch.float32
                                    ).reshape(-1, 4),
              "labels": torch.tensor([category[b.label] for b in truth.get(k, [])],
                                     dtype=torch.long)}])
    with contextlib.redirect_stdout(io.StringIO()):
        result = mean_ap.compute()
    ap = dict(zip(result["classes"].reshape(-1).tolist(),
                  result["map_per_class"].reshape(-1).tolist(), strict=True))

    metrics: dict[str, float] = {}
    per_class = []
    for name, cat in category.items():
        c = counts[cat]
        entry = {"class": name, "n_true": c["n_true"], "n_predicted": c["n_predicted"],
                 "true_positives": c["tp"],
                 "precision50": c["tp"] / c["n_predicted"] if c["n_predicted"] else None,
                 "recall50": c["tp"] / c["n_true"] if c["n_true"] else None,
                 "ap50": ap[cat] if ap.get(cat, -1) >= 0 else None}
        per_class.append(entry)
        for key in ("precision50", "recall50", "ap50"):
            if entry[key] is not None:
                metrics[f"{key}_{metric_key(name)}"] = float(entry[key])
    tp = sum(c["tp"] for c in counts.values())
    n_predicted = sum(c["n_predicted"] for c in counts.values())
    n_true = sum(c["n_true"] for c in counts.values())
    metrics.update({"map50": max(float(result["map"]), 0.0), "n_true_boxes": n_true,
                    "precision50": tp / n_predicted if n_predicted else 0.0,
                    "recall50": tp / n_true if n_true else 0.0})
    return DetectionReport(metrics, [*labels, BACKGROUND], confusion, per_class)
