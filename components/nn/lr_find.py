"""The learning-rate range test (Smith 2015, "Cyclical Learning Rates"; fastai's `lr_find`).

Train for a few hundred batches while the learning rate grows exponentially from `start_lr`
to `end_lr`, record the loss of each batch, smooth it (bias-corrected exponential moving
average) and suggest the LR where the smoothed loss falls fastest. Torch only, no MLflow:
`cnnflow lr-find` and `train --lr auto` (components/steps) log what it returns.

The model's weights (and buffers) and the RNG states are put back afterwards, so a training
that follows starts from exactly the initial state it would have had without the test; the
test's optimiser is its own and is thrown away.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from components.nn.config import TrainConfig
from components.nn.engine import OPTIMIZERS, EngineError, _use_amp, batch_mixer, output_size

SMOOTHING = 0.98  # weight of the running average: fastai's beta
DIVERGE_FACTOR = 4.0  # stop once the smoothed loss exceeds this many times its best
SKIP_START = 0.1  # share of the first points left out of the suggestion (warm-up noise)


@dataclass
class RangeTest:
    """What the sweep saw: one entry per batch run, and the suggested learning rate."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    suggestion: float = math.nan
    diverged: bool = False  # stopped early: the loss exploded (or became NaN/inf)

    def rows(self) -> list[dict[str, float]]:
        """The curve as table rows (step, lr, loss, smoothed_loss)."""
        return [{"step": i, "lr": lr, "loss": loss, "smoothed_loss": smooth}
                for i, (lr, loss, smooth) in enumerate(
                    zip(self.lrs, self.losses, self.smoothed, strict=True))]


def exponential_lrs(start_lr: float, end_lr: float, num_batches: int) -> list[float]:
    """`num_batches` learning rates from `start_lr` to `end_lr`, evenly spaced in log."""
    return [float(v) for v in np.geomspace(start_lr, end_lr, num_batches)]


def suggest(lrs: list[float], smoothed: list[float]) -> float:
    """The LR at the steepest descent of the smoothed loss against log10(lr), leaving out the
    first `SKIP_START` of the points; the LR of the lowest loss / 10 when too few points."""
    n = len(smoothed)
    if n == 0:
        raise ValueError("no loss was recorded")
    start = max(1, int(n * SKIP_START)) if n >= 10 else 0
    if n - start < 3:
        return float(lrs[int(np.argmin(smoothed))] / 10) if n > 1 else float(lrs[0])
    slopes = np.gradient(np.asarray(smoothed[start:]), np.log10(np.asarray(lrs[start:])))
    return float(lrs[start + int(np.argmin(slopes))])


def _cycle(loader: DataLoader) -> Iterator:
    """Batches from the loader, starting over when it runs out (a small train split)."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise EngineError("the train split has no batches: add images or lower --batch-size")


def range_test(model: nn.Module, loader: DataLoader, config: TrainConfig, *,
               device: torch.device, start_lr: float = 1e-7, end_lr: float = 10.0,
               num_batches: int = 100, class_weights: torch.Tensor | None = None,
               smoothing: float = SMOOTHING, diverge_factor: float = DIVERGE_FACTOR
               ) -> RangeTest:
    """Sweep the LR over `num_batches` training batches with `config`'s optimiser, weight
    decay, label smoothing and MixUp / CutMix (the loss `engine.fit` trains on); return the
    curve and the suggestion, always one of the swept LRs. Stops early once the smoothed loss is
    `diverge_factor` times its best (or the loss is not finite). `model` is left as it came."""
    if not 0 < start_lr < end_lr:
        raise EngineError(f"the sweep needs 0 < start_lr < end_lr (got {start_lr:g}, "
                          f"{end_lr:g})")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise EngineError("the model has no trainable parameters: use a different --freeze")
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    was_training = model.training
    amp = _use_amp(config, device)
    model.to(device)
    optimizer = OPTIMIZERS[config.optimizer](params, replace(config, lr=start_lr))
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    weight = class_weights.to(device) if class_weights is not None else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
    mix = batch_mixer(config, output_size(model)) if config.mixup or config.cutmix else None
    result = RangeTest()
    average, best = 0.0, math.inf
    try:
        model.train()
        batches = _cycle(loader)
        for step, lr in enumerate(exponential_lrs(start_lr, end_lr, num_batches), 1):
            images, labels = next(batches)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if mix is not None:
                images, labels = mix(images, labels)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, enabled=amp):
                loss = criterion(model(images).float(), labels)
            value = loss.item()
            if not math.isfinite(value):
                result.diverged = True
                break
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            average = smoothing * average + (1 - smoothing) * value
            smooth = average / (1 - smoothing ** step)  # bias-corrected
            result.lrs.append(lr)
            result.losses.append(value)
            result.smoothed.append(smooth)
            best = min(best, smooth)
            if step > 1 and smooth > diverge_factor * best:
                result.diverged = True
                break
    finally:
        model.load_state_dict(saved)
        model.train(was_training)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    if not result.lrs:
        raise EngineError(f"the loss was not finite from the first batch at lr {start_lr:g}: "
                          "lower --start-lr, or check the data for broken images")
    result.suggestion = suggest(result.lrs, result.smoothed)
    return result
