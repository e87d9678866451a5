"""Test-time augmentation: a registry of view sets, each a list of tensor-level views of a
preprocessed batch; a model's probabilities are averaged over the views.

Views work on the tensors a model's `input_transforms()` made (N x C x H x W, already resized
and normalised), so the same code serves `cnnflow evaluate --tta`, the served pyfunc model
(its config's `tta`) and any model with `score_batch`: evaluation and serving cannot drift.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from components.errors import CnnflowError
from components.registrar import registrar

View = Callable[[torch.Tensor], torch.Tensor]
VIEW_SETS: dict[str, Callable[[], list[View]]] = {}
# A crop keeps this share of each side (torchvision's 224/256 evaluation crop), then is resized
# back to the input size, so the network sees the same shape.
CROP_SHARE = 0.875

# `@register_tta(name)` adds a view set; `--tta name` then works in evaluate and serving.
register_tta = registrar(VIEW_SETS, "tta")


class TtaError(CnnflowError, ValueError):
    """An unknown test-time augmentation name; one line naming the known ones."""


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _hflip(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x, dims=[-1])


def _crop(where: str) -> View:
    """A zoomed crop: `CROP_SHARE` of each side at a corner or the centre, resized back."""
    def view(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ch, cw = max(1, round(h * CROP_SHARE)), max(1, round(w * CROP_SHARE))
        top = {"t": 0, "b": h - ch, "c": (h - ch) // 2}[where[0]]
        left = {"l": 0, "r": w - cw, "c": (w - cw) // 2}[where[1]]
        patch = x[..., top:top + ch, left:left + cw]
        return torch.nn.functional.interpolate(patch, size=(h, w), mode="bilinear",
                                               align_corners=False)
    return view


@register_tta("none")
def no_tta() -> list[View]:
    """The image as preprocessed: no extra cost."""
    return [_identity]


@register_tta("hflip")
def hflip_tta() -> list[View]:
    """The image and its mirror: 2 forward passes per image."""
    return [_identity, _hflip]


@register_tta("hflip+crops")
def hflip_crops_tta() -> list[View]:
    """The image, its mirror, and five zoomed crops (four corners, centre): 7 passes."""
    return [_identity, _hflip, *(_crop(w) for w in ("tl", "tr", "bl", "br", "cc"))]


def check_tta(name: str) -> str:
    """`name` when it is a registered view set, else one line naming the known ones."""
    if name not in VIEW_SETS:
        raise TtaError(f"unknown tta '{name}': use one of {' | '.join(VIEW_SETS)}")
    return name


def views(name: str) -> list[View]:
    return VIEW_SETS[check_tta(name)]()


def averaged_log_proba(score: Callable[[list[torch.Tensor]], torch.Tensor],
                       inputs: Sequence[torch.Tensor], name: str) -> torch.Tensor:
    """log of the mean, over the views of `name`, of the probabilities `score` gives (it maps
    a list of input tensors to N x C log-probabilities); `none` is `score(inputs)` itself."""
    view_set = views(name)
    if len(view_set) == 1:
        return score([view_set[0](x) for x in inputs])
    logs = torch.stack([score([view(x) for x in inputs]).double() for view in view_set])
    return torch.logsumexp(logs, dim=0) - torch.log(torch.tensor(float(len(view_set)),
                                                                 dtype=torch.float64))
