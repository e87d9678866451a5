"""Images per second delivered to the model: decoding the folder vs. the preprocess cache.

One generated folder of photo-like JPEGs (benchmarks/synth_images.py) is split once by
`components.steps.preprocess.plan_split` with cache=true (each image decoded once and resized to
--image-size; the one-off cost is printed). Then the same train split is served by
`components.data.datasets.make_loaders` two ways, with the same batch size, augmentation preset,
worker count and seed:

* folder: each sample's file is opened, decoded and resized on every access (`ImageDataset`);
* cache: each sample is a row of the memory-mapped uint8 `.npy` (`ArrayImageDataset`); no
  JPEG/PNG decoding, the augmentation runs on a PIL image made from the row.

Loader throughput is one full pass over the train loader after one warm-up pass (workers
started, files in the OS cache), alternating folder/cache, best of --repeats. Then one
training epoch of a small model (`custom_cnn` through `components.nn.engine.fit`, train + val
pass) is timed both ways from the same initial weights. Benchmarks print; they never assert.

    .venv/bin/python benchmarks/data_pipeline.py                    # ~2-3 min on 2 cores
    .venv/bin/python benchmarks/data_pipeline.py --num-workers 0 2  # both worker settings
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from synth_images import SIZE_PRESETS, make_photo_folder  # noqa: E402

from components.data.datasets import SPLITS, make_loaders  # noqa: E402
from components.nn.config import TrainConfig  # noqa: E402
from components.nn.engine import fit, seed_everything  # noqa: E402
from components.nn.models import create_model  # noqa: E402
from components.steps.params import PreprocessParams  # noqa: E402
from components.steps.preprocess import plan_split, write_outputs  # noqa: E402

TARGET = 3.0


def one_pass(loader) -> tuple[int, float]:
    started = time.perf_counter()
    seen = 0
    for images, _ in loader:
        seen += images.shape[0]
    return seen, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--size", choices=list(SIZE_PRESETS), default="web",
                        help="source image size preset (see benchmarks/synth_images.py)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--augmentation", default="light")
    parser.add_argument("--num-workers", type=int, nargs="+", default=[2],
                        help="DataLoader workers (both ways); several values = several rows")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="custom_cnn")
    parser.add_argument("--no-epoch", action="store_true", help="skip the training epochs")
    args = parser.parse_args(argv)
    import torch

    dims = ", ".join(sorted({f"{w}x{h}" for w, h in SIZE_PRESETS[args.size]}))
    print(f"{args.images} {args.size} JPEGs ({dims}) -> image_size {args.image_size}, "
          f"batch {args.batch_size}, augmentation "
          f"{args.augmentation}; CPU cores {os.cpu_count()}, torch threads "
          f"{torch.get_num_threads()}; 1-min load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="cnnflow-data-bench-") as tmp:
        tmp_path = Path(tmp)
        t = time.perf_counter()
        make_photo_folder(tmp_path / "photos", args.images, size=args.size)
        print(f"generated the folder in {time.perf_counter() - t:.0f} s", file=sys.stderr)

        params = PreprocessParams(data=str(tmp_path / "photos"), train_ratio=0.8,
                                  val_ratio=0.2, test_ratio=0.0, cache=True,
                                  image_size=args.image_size)
        t = time.perf_counter()
        plan = plan_split(params, tmp_path / "scratch")
        write_outputs(plan, tmp_path / "out")
        prep = time.perf_counter() - t
        splits = plan.splits
        arrays = {s: tmp_path / "out" / "cache" / f"{s}_images.npy" for s in SPLITS
                  if splits.split(s)}
        cache_mib = sum(p.stat().st_size for p in arrays.values()) / 2**20
        print(f"preprocess with cache (one-off: hash, decode and resize every image once, in "
              f"worker processes): {prep:.1f} s for {args.images} images; cache {cache_mib:.0f} "
              f"MiB; train {len(splits.train)}, val {len(splits.val)}")

        print()
        print(f"{'workers':>7} {'way':>7} {'pass s':>8} {'images/s':>9}")
        ratios = {}
        for workers in args.num_workers:
            best = {"folder": 0.0, "cache": 0.0}
            for name, arr in (("folder", None), ("cache", arrays)) * args.repeats:
                loaders = make_loaders(splits, args.image_size, args.batch_size,
                                       args.augmentation, num_workers=workers, seed=1,
                                       arrays=arr)
                one_pass(loaders["train"])  # warm-up: start workers, fill the OS file cache
                seen, secs = one_pass(loaders["train"])
                best[name] = max(best[name], seen / secs)
                print(f"{workers:>7} {name:>7} {secs:>8.2f} {seen / secs:>9.0f}")
                del loaders
            ratios[workers] = best["cache"] / best["folder"]

        epochs = {}
        if not args.no_epoch:
            workers = args.num_workers[-1]
            print()
            print(f"one training epoch of {args.model} (train + val pass, {workers} workers, "
                  f"same initial weights):")
            for name, arr in (("folder", None), ("cache", arrays)):
                loaders = make_loaders(splits, args.image_size, args.batch_size,
                                       args.augmentation, num_workers=workers, seed=1,
                                       arrays=arr)
                one_pass(loaders["train"])  # same warm-up as above
                seed_everything(1)
                model, _ = create_model(args.model, len(splits.classes), weights="none",
                                        image_size=args.image_size)
                result = fit(model, loaders["train"], loaders["val"],
                             TrainConfig(epochs=1, patience=0), tmp_path / f"ckpt-{name}",
                             device="cpu", seed=1, progress=False)
                row = result.history[0]
                epochs[name] = row["epoch_time_sec"]
                print(f"  {name:>6}: epoch {row['epoch_time_sec']:.2f} s, "
                      f"{row['train_images_per_sec']:.0f} train images/s, "
                      f"val_acc {row['val_acc']:.3f}")
                del loaders

    print()
    for workers, ratio in ratios.items():
        verdict = "OK" if ratio >= TARGET else "below target"
        print(f"loader throughput cache/folder, {workers} workers (best passes): {ratio:.2f}x "
              f"(target >= {TARGET:g}x: {verdict})")
    if epochs:
        print(f"training epoch time folder/cache: {epochs['folder'] / epochs['cache']:.2f}x "
              f"({epochs['folder']:.2f} s vs {epochs['cache']:.2f} s)")
    print(f"1-min load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
