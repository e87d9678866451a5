"""Grad-CAM for a loaded cnnflow model: a single model, or an ensemble member by member.

`explain_images` takes decoded images and the class to explain for each (usually the
predicted one) and returns one `Explanation` per image: the Grad-CAM map at a display size,
and for an ensemble each member's map too. An ensemble's map is the weighted mean of its
members' maps (each normalised to [0, 1] and upsampled to the largest member input, weights
= the vote weights), normalised again: the regions the members agree on stay bright. ONNX
models have no gradients: `torch_members` leaves them out, and a model with no PyTorch
member is a `NoGradCamError` (explain its source model instead).

No MLflow tracking and no steps: what the evaluate and explain steps share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from components.errors import CnnflowError
from components.nn.explain import grad_cam, normalise_maps
from components.nn.models import Classifier

EXPLAIN_BATCH = 8  # images per Grad-CAM pass: the backward pass holds the activations


class NoGradCamError(CnnflowError, ValueError):
    """A model Grad-CAM cannot look into (ONNX only); one line saying what to do."""


@dataclass
class Explanation:
    """Grad-CAM of one image for one class: `cam` (H x W in [0, 1]); for an ensemble also
    `members` (one map per PyTorch member, same size) named by `member_names`."""

    cam: np.ndarray
    target: int
    members: list[np.ndarray] = field(default_factory=list)
    member_names: list[str] = field(default_factory=list)


def torch_members(model: Any) -> list[tuple[Any, float]]:
    """The model's PyTorch networks with their vote weights: itself for an ImageClassifier,
    its PyTorch members for an ensemble (ONNX members left out)."""
    members = list(getattr(model, "members", [model]))
    weights = getattr(model, "weights", None)
    weights = ([float(w) for w in weights] if weights is not None and len(members) > 1
               else [1.0] * len(members))
    return [(m, w) for m, w in zip(members, weights, strict=True)
            if isinstance(getattr(m, "model", None), Classifier)]


def check_explainable(model: Any, model_uri: str) -> None:
    if not torch_members(model):
        raise NoGradCamError(
            f"{model_uri} has no PyTorch network (format {getattr(model, 'format', '?')}): "
            "Grad-CAM needs gradients; explain the model it was exported from")


def member_name(member: Any, index: int) -> str:
    return f"{index + 1}: {member.config.get('model', 'model')}"


def explain_images(model: Any, images: Sequence[Image.Image], targets: Sequence[int],
                   batch_size: int = EXPLAIN_BATCH) -> list[Explanation]:
    """Grad-CAM of `targets[i]` on `images[i]` (decoded RGB), for every PyTorch member."""
    members = torch_members(model)
    if not members:
        raise NoGradCamError("this model has no PyTorch network: Grad-CAM needs gradients")
    size = max(int(m.config["image_size"]) for m, _ in members)
    ensemble = len(getattr(model, "members", [])) > 1
    out: list[Explanation] = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        wanted = [int(t) for t in targets[start:start + batch_size]]
        maps = []
        for member, _ in members:
            x = torch.stack([member.transform(img) for img in chunk])
            if getattr(member, "channels_last", False):
                x = x.contiguous(memory_format=torch.channels_last)
            cam = grad_cam(member.model, x, wanted)
            maps.append(F.interpolate(cam[:, None], (size, size), mode="bilinear")[:, 0])
        weights = torch.tensor([w for _, w in members], dtype=torch.float32).view(-1, 1, 1, 1)
        mean = normalise_maps((torch.stack(maps) * weights).sum(0) / weights.sum())
        for i in range(len(chunk)):
            out.append(Explanation(
                cam=mean[i].numpy(), target=wanted[i],
                members=[m[i].numpy() for m in maps] if ensemble else [],
                member_names=([member_name(m, j) for j, (m, _) in enumerate(members)]
                              if ensemble else [])))
    return out
