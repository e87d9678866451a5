"""The training loop's knobs, declared once: `train`, `tune`, the `main` pipeline and bagging
inherit them (components/steps/params.py), and the command line, MLproject and the parameter
reference are generated from them.

Torch-free on purpose, so help and MLproject generation never load torch. Where the loop
runs and how it reports (`device`, `seed`, `progress`) are arguments of `engine.fit`, not
knobs: `device` and `seed` are declared by the shared groups in components/params.py.
`engine.check_config` validates these values against the optimiser and scheduler registries.
"""

from __future__ import annotations

from dataclasses import dataclass

from components.params import param


@dataclass
class TrainConfig:
    """Every knob of the loop, with the seeds' defaults (Adam 1e-3, wd 1e-4, patience 10)."""

    epochs: int = param(10, "Maximum number of epochs.", ge=1, le=100_000)
    optimizer: str = param("adam", "adam | adamw | sgd.")
    lr: float = param(1e-3, "Learning rate.", gt=0)
    weight_decay: float = param(1e-4, "Weight decay (L2).", ge=0)
    momentum: float = param(0.9, "SGD momentum (Nesterov when > 0).", ge=0, lt=1)
    scheduler: str = param("none", "none | plateau | cosine | onecycle.")
    scheduler_patience: int = param(3, "plateau: epochs without improvement before the LR is "
                                       "reduced.", ge=0, le=10_000)
    scheduler_factor: float = param(0.1, "plateau: factor the LR is multiplied by.",
                                    gt=0, lt=1)
    patience: int = param(10, "Early stopping: epochs without val_loss improvement; "
                              "0 disables.", ge=0, le=100_000)
    min_delta: float = param(0.0, "Early stopping: smallest val_loss decrease that counts as "
                                  "improvement.", ge=0)
    label_smoothing: float = param(0.0, "Label smoothing for the training loss.",
                                    ge=0, lt=1)
    amp: str = param("auto", "Mixed precision: auto (on for CUDA) | on | off.")
    mixup: float = param(0.0, "MixUp alpha (Beta(alpha, alpha) mixing of image pairs, per "
                              "batch); 0 = off.", ge=0, le=10)
    cutmix: float = param(0.0, "CutMix alpha (pasted patches, per batch; with mixup: one of "
                               "the two, at random, per batch); 0 = off.", ge=0, le=10)
    ema: float = param(0.0, "Exponential moving average of the weights with this decay (e.g. "
                            "0.999): validated, checkpointed and logged instead of the raw "
                            "weights; 0 = off.", ge=0, lt=1)
    grad_accum: int = param(1, "Batches whose gradients are summed before each optimiser "
                               "step (a batch_size x grad_accum batch on a small GPU).",
                            ge=1, le=1024)
    clip_grad_norm: float = param(0.0, "Clip the gradients' total L2 norm to this before each "
                                       "optimiser step; 0 = off.", ge=0)
    compile: bool = param(False, "torch.compile the model (opt-in: needs a working compiler "
                                 "toolchain; the first epoch pays the compile time).")
