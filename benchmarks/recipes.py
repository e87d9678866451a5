"""What each training recipe buys on a small folder: test accuracy and epoch time, side by side.

The same model is trained on the bundled `digits` (1,797 images, 10 classes) at 32 px, under
several seeds, with train's defaults (the baseline) and with each recipe on its own: MixUp,
CutMix, an EMA of the weights, gradient accumulation, gradient clipping, balanced sampling
(and, with `--compile`, torch.compile), then with the `small-data` and `small-photos` presets
(`--recipe`; digits are the wrong folder for `small-photos`' flips: it shows what they cost). Every
configuration is built as `cnnflow train` builds it (`TrainParams(...)`, so a preset fills the
fields it sets), trained by `components.nn.engine.fit` (no MLflow: the recipes' own cost is
what is timed) and scored on the test split with the weights the run would log (best.pt: the
EMA's when EMA is on). Configurations are interleaved per seed, so a busy spell on a shared
machine hits all of them alike.

It prints, per configuration, test accuracy mean +- std over the seeds, its difference from the
baseline, mean epoch time (train + val pass) and its ratio to the baseline's.

Run from the repository root (CPU, defaults: about 2 minutes on 2 idle cores; more when busy):

    .venv/bin/python benchmarks/recipes.py
    .venv/bin/python benchmarks/recipes.py --seeds 5 --epochs 15 --model custom_cnn
    .venv/bin/python benchmarks/recipes.py --only baseline,ema,small-data --compile
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the checkout's package
    sys.path.insert(0, str(ROOT))

# Name -> `train` parameters on top of the defaults. One recipe each, then the preset.
CONFIGS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "mixup 0.2": {"mixup": 0.2},
    "cutmix 1.0": {"cutmix": 1.0},
    "ema 0.99": {"ema": 0.99},
    "grad_accum 2": {"grad_accum": 2},
    "clip 1.0": {"clip_grad_norm": 1.0},
    "sampling balanced": {"sampling": "balanced"},
    "recipe small-data": {"recipe": "small-data"},
    "recipe small-photos": {"recipe": "small-photos"},
}
COMPILE = {"compile": {"compile": True}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--only", default="", help="comma-separated configuration names "
                                                   "(baseline always runs)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    return parser.parse_args(argv)


def run_one(name: str, overrides: dict[str, Any], seed: int, args: argparse.Namespace,
            splits: Any) -> tuple[float, float]:
    """Train one configuration under one seed; (test accuracy, mean epoch seconds)."""
    import torch
    from torch import nn

    from components.data.datasets import make_loaders
    from components.nn.engine import evaluate, fit, load_checkpoint, seed_everything
    from components.nn.models import create_model, model_normalization
    from components.steps.params import TrainParams

    params = TrainParams(model=args.model, epochs=args.epochs, image_size=args.image_size,
                         batch_size=args.batch_size, weights="none", seed=seed, num_workers=0,
                         **overrides)
    params.validate()
    seed_everything(seed)
    model, _ = create_model(params.model, len(splits.classes), weights="none",
                            dropout=params.dropout, image_size=params.image_size)
    mean, std = model_normalization(params.model)
    loaders = make_loaders(splits, params.image_size, params.batch_size,
                           augmentation=params.augmentation, mean=mean, std=std,
                           num_workers=0, seed=seed, sampling=params.sampling)
    with tempfile.TemporaryDirectory(prefix="cnnflow-recipes-") as tmp:
        result = fit(model, loaders["train"], loaders["val"], params.engine_config(),
                     Path(tmp), device="cpu", seed=seed, progress=False,
                     num_classes=len(splits.classes))
        model.load_state_dict(load_checkpoint(result.best_path)["model"])
    _, test_acc = evaluate(model, loaders["test"], nn.CrossEntropyLoss(),
                           torch.device("cpu"))
    epoch_sec = statistics.mean(h["epoch_time_sec"] for h in result.history)
    print(f"  {name:<18} seed {seed}: test_acc {test_acc:.4f}  epoch {epoch_sec:.2f} s  "
          f"(best epoch {result.best_epoch}/{result.epochs_run})", file=sys.stderr, flush=True)
    return test_acc, epoch_sec


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from components.data.datasets import load_splits

    configs = {**CONFIGS, **(COMPILE if args.compile else {})}
    if args.only:
        wanted = {"baseline", *(n.strip() for n in args.only.split(","))}
        unknown = wanted - set(configs)
        if unknown:
            sys.exit(f"unknown configuration(s) {', '.join(sorted(unknown))}: choose from "
                     f"{', '.join(configs)}")
        configs = {k: v for k, v in configs.items() if k in wanted}
    splits = load_splits("digits")
    print(f"digits: train {len(splits.train)}, val {len(splits.val)}, test {len(splits.test)}; "
          f"{args.model} at {args.image_size} px, batch {args.batch_size}, {args.epochs} "
          f"epochs (patience 10), seeds 0..{args.seeds - 1}", flush=True)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
    started = time.perf_counter()
    for seed in range(args.seeds):  # interleaved: a busy spell hits every configuration
        for name, overrides in configs.items():
            results[name].append(run_one(name, overrides, seed, args, splits))
    base_acc, _ = spread([a for a, _ in results["baseline"]])
    base_sec, _ = spread([s for _, s in results["baseline"]])
    print(f"\n| configuration | test acc (mean +- std, {args.seeds} seeds) | vs baseline | "
          "epoch s | time ratio |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        acc, acc_std = spread([a for a, _ in runs])
        sec, sec_std = spread([s for _, s in runs])
        print(f"| {name} | {acc:.4f} +- {acc_std:.4f} | {acc - base_acc:+.4f} | "
              f"{sec:.2f} +- {sec_std:.2f} | {sec / base_sec:.2f}x |")
    print(f"\n{time.perf_counter() - started:.0f} s in all", flush=True)


if __name__ == "__main__":
    main()
