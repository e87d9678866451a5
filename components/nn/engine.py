"""The training loop: plain PyTorch, reporting through callbacks so it never imports MLflow.

Flat and explicit in the spirit of torchvision's references/classification/train.py: every
knob is a field of `TrainConfig` (components/nn/config.py), optimisers and schedulers come
from small registries, and each epoch writes `last.pt` (and `best.pt` when validation loss
improves) so any run can be resumed exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from tqdm import tqdm

from components.errors import CnnflowError
from components.nn.config import TrainConfig
from components.nn.distributed import is_main, sum_across_ranks, sync_buffers, world
from components.params import DataParams, RuntimeParams


class EngineError(CnnflowError, RuntimeError):
    """A training problem the user can act on (bad option, unavailable device)."""


class NonFiniteLossError(EngineError):
    """Raised as soon as a batch produces NaN or inf loss: continuing would waste the run."""


def check_config(config: TrainConfig) -> None:
    """Reject bad values before any work starts, with one line naming the fix: the ranges
    `TrainConfig` declares, then the names the registries below must know."""
    from components.params import check_bounds

    check_bounds(config)
    checks = [
        (config.optimizer in OPTIMIZERS,
         f"unknown optimizer '{config.optimizer}'; choose one of: {', '.join(OPTIMIZERS)}"),
        (config.scheduler in SCHEDULERS,
         f"unknown scheduler '{config.scheduler}'; choose one of: {', '.join(SCHEDULERS)}"),
        (config.amp in ("auto", "on", "off"),
         f"amp must be auto, on or off (got '{config.amp}')"),
    ]
    for ok, message in checks:
        if not ok:
            raise EngineError(message)


# --- registries -------------------------------------------------------------------------

OptimizerBuilder = Callable[[Iterable[nn.Parameter], TrainConfig], torch.optim.Optimizer]
OPTIMIZERS: dict[str, OptimizerBuilder] = {
    "adam": lambda p, c: torch.optim.Adam(p, lr=c.lr, weight_decay=c.weight_decay),
    "adamw": lambda p, c: torch.optim.AdamW(p, lr=c.lr, weight_decay=c.weight_decay),
    "sgd": lambda p, c: torch.optim.SGD(p, lr=c.lr, momentum=c.momentum,
                                        weight_decay=c.weight_decay, nesterov=c.momentum > 0),
}

# Each builder gets (optimizer, config, steps_per_epoch); `per_batch` schedulers step per batch.
SCHEDULERS: dict[str, Callable[..., Any]] = {
    "none": lambda opt, c, n: None,
    "plateau": lambda opt, c, n: torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", patience=c.scheduler_patience, factor=c.scheduler_factor),
    "cosine": lambda opt, c, n: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=c.epochs),
    "onecycle": lambda opt, c, n: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=c.lr, epochs=c.epochs, steps_per_epoch=max(1, n)),
}
PER_BATCH_SCHEDULERS = {"onecycle"}

# Batch mixing: a `TrainConfig` field (the alpha; 0 = off) -> torchvision's batch transform.
BATCH_MIXERS: dict[str, Callable[..., Any]] = {"mixup": v2.MixUp, "cutmix": v2.CutMix}


def batch_mixer(config: TrainConfig, num_classes: int) -> Callable | None:
    """MixUp / CutMix as one per-batch transform (labels -> class probabilities), or None.

    With both alphas set, each batch gets one of the two at random (timm's and torchvision's
    reference recipe); draws come from torch's global generator, which the loop re-seeds per
    epoch, so a resumed run mixes the same pairs."""
    chosen = [mixer(alpha=getattr(config, name), num_classes=num_classes)
              for name, mixer in BATCH_MIXERS.items() if getattr(config, name) > 0]
    if not chosen:
        return None
    return chosen[0] if len(chosen) == 1 else v2.RandomChoice(chosen)


def ema_model(model: nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of `model`'s weights and buffers (BatchNorm statistics
    included, so the averaged model can be validated as it is).

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates (TensorFlow's
    `ExponentialMovingAverage(num_updates=)` rule): without it the average drags the random
    initial weights along for ~1 / (1 - decay) steps, longer than a short run on a small folder
    (measured: digits, 5 epochs, decay 0.99: test accuracy 0.70 instead of 0.95)."""
    def update(averaged: Any, current: Any, n_averaged: torch.Tensor) -> None:
        n = float(n_averaged)
        get_ema_multi_avg_fn(min(decay, (1.0 + n) / (10.0 + n)))(averaged, current, n_averaged)

    return AveragedModel(model, multi_avg_fn=update, use_buffers=True)


# --- callbacks --------------------------------------------------------------------------

class Callback:
    """Hooks the loop calls; override what you need. Tracking and printing live here."""

    def on_train_start(self, config: TrainConfig, start_epoch: int) -> None: ...

    def on_batch_end(self, epoch: int, batch: int, batches: int, images: int) -> None:
        """After each optimiser batch: `batch` of `batches` done, `images` seen this epoch
        (this rank's count). Called on the hot path: keep it to a few attribute writes."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None: ...

    def on_checkpoint(self, epoch: int, last_path: Path, best_path: Path | None) -> None: ...

    def on_train_end(self, result: FitResult) -> None: ...


class ConsoleCallback(Callback):
    """One readable line per epoch on stderr, so long runs show progress without a UI."""

    def __init__(self, label: str = "", stream=None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.epochs = 0

    def on_train_start(self, config: TrainConfig, start_epoch: int) -> None:
        self.epochs = config.epochs

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        print(f"{self.label}epoch {epoch}/{self.epochs}  "
              f"train_loss {metrics['train_loss']:.4f}  train_acc {metrics['train_acc']:.4f}  "
              f"val_loss {metrics['val_loss']:.4f}  val_acc {metrics['val_acc']:.4f}  "
              f"lr {metrics['lr']:.2e}  {metrics['epoch_time_sec']:.1f}s "
              f"({metrics['train_images_per_sec']:.0f} img/s)", file=self.stream, flush=True)


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = math.inf
    best_val_acc: float = 0.0
    epochs_run: int = 0
    stopped_early: bool = False
    best_path: Path | None = None
    last_path: Path | None = None

    def final_metrics(self) -> dict[str, float]:
        return {"best_val_loss": self.best_val_loss, "best_val_acc": self.best_val_acc,
                "best_epoch": float(self.best_epoch), "epochs_run": float(self.epochs_run),
                "stopped_early": float(self.stopped_early)}


# --- helpers ----------------------------------------------------------------------------

def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then CPU; asking for a missing device is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError(f"device '{name}' requested but CUDA is not available; use --device cpu")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise EngineError(f"unknown device '{name}'; choose auto, cpu, cuda or cuda:N")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Same seed, same CPU metrics: Python, NumPy and torch generators all start here."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _use_amp(config: TrainConfig, device: torch.device) -> bool:
    return device.type == "cuda" and config.amp in ("auto", "on")


def evaluate(model: nn.Module, loader: DataLoader, criterion: nn.Module, device: torch.device,
             amp: bool = False, channels_last: bool = False) -> tuple[float, float]:
    """Mean loss and accuracy over a loader, without gradients.

    Under DistributedDataParallel each rank passes its shard of the split; the sums are
    reduced across ranks, so every rank returns the single-process numbers for the full split.
    """
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    with torch.inference_mode():
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, enabled=amp):
                logits = model(images)
            total_loss += criterion(logits.float(), labels).item() * labels.size(0)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += labels.size(0)
    total_loss, correct, seen = sum_across_ranks([total_loss, correct, seen], device)
    return total_loss / max(seen, 1), correct / max(seen, 1)


def _train_one_epoch(model, loader, criterion, optimizer, scaler, scheduler_per_batch, device,
                     amp, channels_last, progress, desc, epoch=0, callbacks=(), *,
                     mix=None, grad_accum=1, clip_grad_norm=0.0, ema=None
                     ) -> tuple[float, float, int]:
    """One pass over the train split; returns mean loss, accuracy and images seen.

    `mix` (MixUp / CutMix) turns each batch's labels into class probabilities; train accuracy
    then counts a prediction as right when it is the mixed target's dominant class (argmax).
    With `grad_accum` N the optimiser steps once per group of N batches (and at the epoch's
    end): each batch's loss is divided by its group's batch count, so the summed gradient is
    the mean a single batch of the group's images would give. Gradients are clipped (after
    unscaling) and the per-batch scheduler and the `ema` model step once per optimiser step.
    """
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    batches = len(loader)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, file=sys.stderr,
               mininterval=1.0)
    for batch, (images, labels) in enumerate(bar, 1):
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        targets = labels
        if mix is not None:
            images, targets = mix(images, labels)
        group_start = (batch - 1) // grad_accum * grad_accum  # batches before this group
        group_size = min(grad_accum, batches - group_start)
        step = batch == group_start + group_size
        if batch == group_start + 1:
            optimizer.zero_grad(set_to_none=True)
        # DDP: only the group's last backward all-reduces the summed gradients.
        no_sync = getattr(model, "no_sync", None)
        with contextlib.nullcontext() if step or no_sync is None else no_sync():
            with torch.autocast(device.type, enabled=amp):
                logits = model(images)
                loss = criterion(logits.float(), targets)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss became {loss.item()} at batch {batch}: "
                    "lower --lr, or check the data for broken images")
            scaler.scale(loss / group_size).backward()
        if step:
            if clip_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            if scheduler_per_batch is not None:
                scheduler_per_batch.step()
            if ema is not None:
                ema.update_parameters(model)
        total_loss += loss.item() * labels.size(0)
        truth = targets.argmax(1) if targets.ndim > 1 else labels
        correct += (logits.argmax(1) == truth).sum().item()
        seen += labels.size(0)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", refresh=False)
        for cb in callbacks:
            cb.on_batch_end(epoch, batch, batches, seen)
    # Means over every rank's samples (seen is the global count, for images/sec).
    total_loss, correct, seen = sum_across_ranks([total_loss, correct, seen], device)
    return total_loss / max(seen, 1), correct / max(seen, 1), int(seen)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Checkpoints hold only tensors and plain values, so they load with weights_only=True."""
    return torch.load(path, map_location="cpu", weights_only=True)


# --- the loop ---------------------------------------------------------------------------

def fit(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader,
        config: TrainConfig, checkpoint_dir: Path, *,
        device: str = RuntimeParams.device, seed: int = DataParams.seed, progress: bool = True,
        class_weights: torch.Tensor | None = None,
        callbacks: Sequence[Callback] = (),
        resume_from: Path | None = None, num_classes: int | None = None) -> FitResult:
    """Train with early stopping on val_loss; write last/best checkpoints every epoch.

    `device` is `auto` or a torch device name; `seed` seeds the initial state and, with the
    epoch added, each epoch's batch order; `progress` shows a per-batch bar on stderr.
    `resume_from` is a `last.pt` written by an earlier call: training continues at the next
    epoch with the same optimiser, scheduler, early-stopping state and history.

    The recipes of `config`: MixUp / CutMix (`num_classes`: the one-hot size of the mixed
    labels; default the model's last Linear layer's outputs), gradient accumulation and
    clipping, `compile`, and an EMA of the weights: with `ema` on, the EMA model is the one
    validated, early-stopped on and saved as `model` in last.pt / best.pt (so the logged
    model is the EMA one); last.pt also keeps the raw weights (`raw_model`) and the EMA's
    update count, and a resume restores both exactly.

    With a live process group (torchrun) the model is wrapped in DistributedDataParallel and
    metrics are reduced across ranks, so every rank takes the same early-stopping and
    scheduler decisions; only rank 0 writes checkpoints and calls `callbacks`.
    """
    check_config(config)
    device = resolve_device(device)
    amp = _use_amp(config, device)
    channels_last = device.type == "cuda"
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)

    seed_everything(seed)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    ema = ema_model(model, config.ema) if config.ema else None
    judged = ema.module if ema is not None else model  # validated, checkpointed, logged
    mix = batch_mixer(config, num_classes or output_size(model)) if (
        config.mixup or config.cutmix) else None
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise EngineError("the model has no trainable parameters: use a different --freeze")
    net = model  # what trains; `model` stays unwrapped for evaluation and checkpoints
    if world()[1] > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    compile_failed: tuple[type[BaseException], ...] = ()  # `except ()` catches nothing
    if config.compile:
        net = _compiled(net, device)
        compile_failed = (torch._dynamo.exc.BackendCompilerFailed,)
    main = is_main()
    if not main:
        callbacks = ()
    optimizer = OPTIMIZERS[config.optimizer](params, config)
    steps_per_epoch = math.ceil(len(train_loader) / config.grad_accum)  # optimiser steps
    scheduler = SCHEDULERS[config.scheduler](optimizer, config, steps_per_epoch)
    per_batch = scheduler if config.scheduler in PER_BATCH_SCHEDULERS else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    weight = class_weights.to(device) if class_weights is not None else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
    eval_criterion = nn.CrossEntropyLoss(weight=weight)

    result = FitResult()
    bad_epochs, start_epoch = 0, 1
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        model.load_state_dict(state.get("raw_model", state["model"]))
        if ema is not None:  # a checkpoint without an EMA (0 updates) starts it afresh
            ema.module.load_state_dict(state["model"])
            ema.n_averaged.fill_(int(state.get("ema_updates", 0)))
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler"):
            scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        result.history = list(state["history"])
        result.best_epoch = state["best_epoch"]
        result.best_val_loss = state["best_val_loss"]
        result.best_val_acc = state["best_val_acc"]
        bad_epochs = state["bad_epochs"]
        start_epoch = state["epoch"] + 1
        if (checkpoint_dir / "best.pt").exists():
            result.best_path = checkpoint_dir / "best.pt"

    for cb in callbacks:
        cb.on_train_start(config, start_epoch)

    done = (start_epoch > config.epochs
            or (config.patience and bad_epochs >= config.patience))
    epoch = start_epoch - 1
    while not done:
        epoch += 1
        # Re-seeding per epoch makes a resumed run draw the same batches as an unbroken one.
        torch.manual_seed(seed + epoch)
        if isinstance(getattr(train_loader, "generator", None), torch.Generator):
            train_loader.generator.manual_seed(seed + epoch)
        if hasattr(getattr(train_loader, "sampler", None), "set_epoch"):
            train_loader.sampler.set_epoch(epoch)  # DistributedSampler: new shard order
        lr = optimizer.param_groups[0]["lr"]
        started = time.perf_counter()
        try:
            train_loss, train_acc, seen = _train_one_epoch(
                net, train_loader, criterion, optimizer, scaler, per_batch, device, amp,
                channels_last, progress and main, f"epoch {epoch}/{config.epochs}", epoch,
                callbacks, mix=mix, grad_accum=config.grad_accum,
                clip_grad_norm=config.clip_grad_norm, ema=ema)
        except compile_failed as exc:
            raise EngineError(f"torch.compile failed on this model ({_first_line(exc)}): "
                              "drop --compile") from None
        train_time = time.perf_counter() - started
        sync_buffers(model)
        val_loss, val_acc = evaluate(judged, val_loader, eval_criterion, device, amp,
                                     channels_last)
        if not math.isfinite(val_loss):
            raise NonFiniteLossError(f"validation loss became {val_loss} at epoch {epoch}: "
                                     "lower --lr")
        if scheduler is not None and per_batch is None:
            scheduler.step(val_loss) if config.scheduler == "plateau" else scheduler.step()

        metrics = {"train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
                   "val_acc": val_acc, "lr": lr,
                   "epoch_time_sec": time.perf_counter() - started,
                   "train_images_per_sec": seen / max(train_time, 1e-9)}
        result.history.append({"epoch": epoch, **metrics})
        result.epochs_run = epoch

        improved = val_loss < result.best_val_loss - config.min_delta
        if improved:
            result.best_epoch, result.best_val_loss, result.best_val_acc = epoch, val_loss, val_acc
            bad_epochs = 0
        else:
            bad_epochs += 1
        result.stopped_early = bool(config.patience) and bad_epochs >= config.patience
        done = result.stopped_early or epoch >= config.epochs
        if not main:
            continue

        state = {"epoch": epoch, "model": _cpu_state(judged), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict() if scheduler is not None else {},
                 "scaler": scaler.state_dict(), "history": result.history,
                 "best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
                 "best_val_acc": result.best_val_acc, "bad_epochs": bad_epochs,
                 "config": asdict(config)}
        if ema is not None:  # `model` is the EMA; the raw weights resume the training
            state.update(raw_model=_cpu_state(model), ema_updates=int(ema.n_averaged))
        result.last_path = _atomic_save(state, checkpoint_dir / "last.pt")
        best_written = None
        if improved:
            best_written = _atomic_save({"epoch": epoch, "model": state["model"]},
                                        checkpoint_dir / "best.pt")
            result.best_path = best_written
        for cb in callbacks:
            cb.on_checkpoint(epoch, result.last_path, best_written)
        for cb in callbacks:
            cb.on_epoch_end(epoch, metrics)

    result.epochs_run = max(result.epochs_run, start_epoch - 1)
    for cb in callbacks:
        cb.on_train_end(result)
    return result


def output_size(model: nn.Module) -> int:
    """The class count of a classifier whose last Linear layer is its output (every
    registered model's head): what MixUp / CutMix one-hot the labels to."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise EngineError("mixup / cutmix need the number of classes: pass num_classes to fit")
    return linears[-1].out_features


def _first_line(exc: BaseException) -> str:
    return next((line.strip() for line in str(exc).splitlines() if line.strip()),
                type(exc).__name__)[:200]


def _compiled(net: nn.Module, device: torch.device) -> nn.Module:
    """`torch.compile(net)`, after a tiny probe compiled with the same backend: compiling is
    lazy, so without the probe a missing toolchain (C compiler, Triton) would surface as a
    long traceback inside the first batch."""
    try:
        probe = torch.compile(lambda x: torch.relu(x) * 2 + 1)
        probe(torch.ones(8, device=device))
    except Exception as exc:  # noqa: BLE001 - any failure means: this platform cannot compile
        raise EngineError(f"torch.compile does not work on this platform ({type(exc).__name__}: "
                          f"{_first_line(exc)}): drop --compile") from None
    return torch.compile(net)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _atomic_save(obj: Any, path: Path) -> Path:
    """Write then rename, so a crash mid-save never leaves a truncated checkpoint."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
    return path
