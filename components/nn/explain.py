"""Grad-CAM on a `Classifier`: where in the image the evidence for a class sits.

Grad-CAM (Selvaraju et al., 2017) weights each channel of a convolutional layer's output by
the mean gradient of the class score with respect to it, sums the channels and keeps the
positive part: a coarse map, at that layer's resolution, of the regions that raise the
score. captum's `LayerGradCam` computes it; the layer is the model's own `cam_layer`,
declared once in the model registry (`components/nn/models.py`).

Torch only: no MLflow, no files. `components/serving/explain.py` applies it to a logged
model (single or ensemble); the steps draw and log the maps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn

from components.nn.models import Classifier

__all__ = ["grad_cam", "normalise_maps"]


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """N x H x W maps scaled to [0, 1] each (a map with no positive evidence stays all 0)."""
    flat = maps.flatten(1).clamp_min(0)
    peak = flat.max(1, keepdim=True).values
    return (flat / torch.where(peak > 0, peak, torch.ones_like(peak))).view_as(maps)


def grad_cam(model: Classifier, inputs: torch.Tensor, targets: Sequence[int] | torch.Tensor,
             *, layer: nn.Module | None = None) -> torch.Tensor:
    """Grad-CAM maps of `targets` (one class index per image) for a batch of model inputs.

    Returns N x H x W in [0, 1] on the CPU, H x W the input's size: the layer's map with the
    ReLU of the original method, upsampled bilinearly and normalised per image so maps of
    different images (and of ensemble members) compare. The model is used in eval mode and
    left in the mode it was in; no parameter gradient is kept.
    """
    layer = layer if layer is not None else model.explained_layer
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    x = inputs.to(device).detach().clone().requires_grad_(True)  # frozen blocks still give grads
    target = torch.as_tensor(list(targets) if not isinstance(targets, torch.Tensor)
                             else targets, dtype=torch.long, device=device)
    try:
        with torch.enable_grad():
            cam = LayerGradCam(model, layer).attribute(x, target=target,
                                                       relu_attributions=True)
            cam = LayerAttribution.interpolate(cam.detach(), tuple(inputs.shape[-2:]),
                                               interpolate_mode="bilinear")
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return normalise_maps(cam[:, 0].float().cpu())
