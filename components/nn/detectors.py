"""The detector registry: torchvision detection models, their weights and their class names.

`@register_detector(name)` adds a builder `(num_classes) -> nn.Module` (a torchvision
detection model taking a list of CxHxW float images in [0, 1], returning boxes, labels and
scores per image); `cnnflow cascade --detector NAME` then works. Registered: the two Faster
R-CNN MobileNetV3 models, SSDlite and RetinaNet v2, the ones that run on a CPU.

Weights, never downloaded unless asked:
- `coco`: torchvision's COCO weights from the torch hub cache (`download=True` fetches them
  there first); missing offline, one line names the exact file and folder to place;
- a PATH: a detector file `save_detector` wrote (`{"detector", "class_names", "state_dict"}`,
  e.g. a fine-tuned model), or a bare torchvision state dict of that architecture (then the
  class names are torchvision's COCO categories). A file of another architecture, or one whose
  tensors do not fit, is one line.

Class names come with the weights (index 0 is the background). No MLflow here.
"""

from __future__ import annotations

import difflib
import os
import pickle
import tempfile
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from components.data.boxes import Box
from components.errors import CnnflowError
from components.registrar import registrar


class DetectorError(CnnflowError, ValueError):
    """A detector name, weights file or class list that cannot be used; one line."""


DETECTORS: dict[str, Callable[[int], nn.Module]] = {}
register_detector = registrar(DETECTORS, "detector")
COCO = "coco"
FILE_KEYS = ("detector", "class_names", "state_dict")


def _torchvision(name: str, num_classes: int) -> nn.Module:
    from torchvision.models import get_model

    return get_model(name, weights=None, weights_backbone=None, num_classes=num_classes)


@register_detector("fasterrcnn_mobilenet_v3_large_fpn")
def fasterrcnn_mobilenet_v3_large_fpn(num_classes: int) -> nn.Module:
    """Faster R-CNN, MobileNetV3-Large FPN backbone, images resized to 800 px."""
    return _torchvision("fasterrcnn_mobilenet_v3_large_fpn", num_classes)


@register_detector("fasterrcnn_mobilenet_v3_large_320_fpn")
def fasterrcnn_mobilenet_v3_large_320_fpn(num_classes: int) -> nn.Module:
    """The same at 320 px: the fastest on a CPU."""
    return _torchvision("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes)


@register_detector("ssdlite320_mobilenet_v3_large")
def ssdlite320_mobilenet_v3_large(num_classes: int) -> nn.Module:
    """SSDlite, MobileNetV3-Large backbone, 320 px: the smallest (2.2 M parameters)."""
    return _torchvision("ssdlite320_mobilenet_v3_large", num_classes)


@register_detector("retinanet_resnet50_fpn_v2")
def retinanet_resnet50_fpn_v2(num_classes: int) -> nn.Module:
    """RetinaNet v2, ResNet-50 FPN: the most accurate of these, the slowest."""
    return _torchvision("retinanet_resnet50_fpn_v2", num_classes)


def list_detectors() -> list[str]:
    return sorted(DETECTORS)


def get_detector(name: str) -> Callable[[int], nn.Module]:
    """The builder registered as `name`, or one line listing the names (closest first)."""
    if name in DETECTORS:
        return DETECTORS[name]
    close = difflib.get_close_matches(str(name), list_detectors(), n=3, cutoff=0.4)
    hint = f" (closest: {', '.join(close)})" if close else ""
    raise DetectorError(f"unknown detector '{name}'{hint}: use one of "
                        f"{', '.join(list_detectors())}")


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------


def _coco_weights(name: str) -> Any:
    from torchvision.models import get_model_weights

    return get_model_weights(name).DEFAULT


def coco_class_names(name: str) -> list[str]:
    """torchvision's COCO categories for a detector (91 entries, index 0 `__background__`)."""
    return list(_coco_weights(name).meta["categories"])


def coco_weights_file(name: str) -> Path:
    """Where the COCO weights of `name` live in the torch hub cache (whether or not they do)."""
    url = _coco_weights(name).url
    filename = os.path.basename(urllib.parse.urlparse(url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def save_detector(path: Path, name: str, model: nn.Module, class_names: Sequence[str]) -> Path:
    """A detector file: architecture, class names and state dict (tensors only, never a
    pickled module), written to a temp file and renamed, so no reader sees half of it."""
    get_detector(name)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        torch.save({"detector": name, "class_names": list(class_names), "state_dict": state},
                   tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _read_weights(name: str, weights: str, download: bool) -> tuple[dict[str, Any], str]:
    """(state dict or detector file contents, where they came from)."""
    if weights.strip().lower() == COCO:
        cached = coco_weights_file(name)
        if not cached.is_file():
            if not download:
                raise DetectorError(
                    f"COCO weights for {name} are not in the torch hub cache: place "
                    f"{cached.name} in {cached.parent}/ (or pass --download-weights true on "
                    "a machine with network, or --detector-weights PATH)")
            try:
                torch.hub.load_state_dict_from_url(_coco_weights(name).url, map_location="cpu",
                                                   progress=False, check_hash=True)
            except Exception as exc:  # noqa: BLE001  offline, proxy, bad hash...
                raise DetectorError(
                    f"downloading COCO weights for {name} failed ({type(exc).__name__}): "
                    f"place {cached.name} in {cached.parent}/") from None
        path = cached
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise DetectorError(f"detector weights file {path} does not exist: pass a file "
                                "written by save_detector, a torchvision state dict, or coco")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        raise DetectorError(f"cannot read detector weights {path} ({type(exc).__name__}): "
                            "pass a state dict saved with torch.save") from None
    if not isinstance(obj, dict):
        raise DetectorError(f"{path} does not hold a state dict: pass a file written by "
                            "save_detector or torch.save(model.state_dict(), path)")
    return obj, str(path)


def _fit(model: nn.Module, state: dict[str, Any], name: str, source: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise DetectorError(
            f"{source} holds weights of another architecture, not {name} ({len(missing)} of "
            f"{len(own)} tensors missing, {len(unexpected)} unknown, e.g. '{example}'): pass "
            f"weights saved from {name}, or the --detector they were saved from")
    for key, value in own.items():
        if not isinstance(state[key], torch.Tensor) or state[key].shape != value.shape:
            shape = tuple(getattr(state[key], "shape", ()))
            raise DetectorError(
                f"{source} does not fit {name}: {key} has shape {shape}, expected "
                f"{tuple(value.shape)} (another class count or architecture?)")
    model.load_state_dict(state)


def load_detector(name: str, weights: str, *, download: bool = False) -> Detector:
    """The detector `name` with `weights` (`coco` or a path), in eval mode on the CPU."""
    builder = get_detector(name)
    obj, source = _read_weights(name, weights, download)
    if all(k in obj for k in FILE_KEYS):
        if obj["detector"] != name:
            raise DetectorError(f"{source} holds a {obj['detector']} detector, not {name}: "
                                f"pass --detector {obj['detector']}")
        classes, state = [str(c) for c in obj["class_names"]], obj["state_dict"]
    else:
        classes, state = coco_class_names(name), obj
    if len(classes) < 2:
        raise DetectorError(f"{source} names {len(classes)} classes: a detector needs the "
                            "background and at least one class")
    model = builder(len(classes))
    _fit(model, state, name, source)
    return Detector(name, model.eval(), classes, source)


# --------------------------------------------------------------------------------------------
# Running one
# --------------------------------------------------------------------------------------------


class Detector:
    """A detection model with its class names: PIL images in, `Box` lists out."""

    def __init__(self, name: str, model: nn.Module, class_names: Sequence[str],
                 source: str = "") -> None:
        self.name = name
        self.model = model
        self.class_names = list(class_names)
        self.source = source
        self.device = torch.device("cpu")

    @property
    def labels(self) -> list[str]:
        """The class names a box can carry: all but the background (index 0), each once."""
        return list(dict.fromkeys(self.class_names[1:]))

    def to(self, device: torch.device | str) -> Detector:
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def lower_score_threshold(self, threshold: float) -> None:
        """Let the model keep boxes down to `threshold` (its own cut-off is 0.05 or 0.001):
        the cascade applies the user's threshold itself, after the model."""
        holder = getattr(self.model, "roi_heads", self.model)  # Faster R-CNN: in its heads
        if hasattr(holder, "score_thresh"):
            holder.score_thresh = min(float(holder.score_thresh), float(threshold))

    def detect(self, images: Sequence[Image.Image]) -> list[list[Box]]:
        """Boxes (pixels of each image), labels and scores for a batch of RGB images."""
        from torchvision.transforms.functional import pil_to_tensor

        if not images:
            return []
        tensors = [pil_to_tensor(img).to(self.device, non_blocking=True).float().div_(255)
                   for img in images]
        with torch.inference_mode():
            outputs = self.model(tensors)
        found = []
        for out in outputs:
            boxes = out["boxes"].float().cpu().numpy().astype(np.float64)
            labels = out["labels"].cpu().tolist()
            scores = out["scores"].float().cpu().tolist()
            found.append([Box(*map(float, b), self.class_names[label], float(s))
                          for b, label, s in zip(boxes, labels, scores, strict=True)])
        return found
