"""Inference throughput: `cnnflow evaluate`'s batched path vs. the seeds' per-image loop.

The cup/glass seed measured MobileNetV2, ResNet50 and VGG16 on 600 images (15 s, 59 s and
170 s on its machine) with the loop everybody writes first: open a file with PIL, transform
it, run the model on a batch of one, next file. `cnnflow evaluate` instead decodes through a
DataLoader and runs one forward pass per batch under `torch.inference_mode`
(`components.serving.predict.predict_samples`, the same code the evaluate step runs, with the
served model's channels-last network and evaluate's default batch size: 4 on CPU, 64 on CUDA).

For each model (random init: nothing is downloaded; speed does not depend on the weights)
this script times both ways on the same JPEG files (synthetic 320x240 photo-like images,
resized to `--image-size`), after an untimed warm-up of each with the same input shapes (the
first call at a new batch shape builds its kernels: several times slower), `--repeats` times
alternately (the median counts: this machine is shared), checks that both give the same
probabilities, and prints images/s both ways and the ratio batched/naive.

Run from the repository root (defaults: 64 images at 224 px, 3 repeats, evaluate's batch
size; about 1 minute on 2 idle CPU cores, several times that when other work shares them):

    .venv/bin/python benchmarks/inference.py
    .venv/bin/python benchmarks/inference.py --images 600 --models mobilenetv2 --batch-size 32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the checkout's package
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from components.nn.engine import resolve_device  # noqa: E402
from components.nn.models import create_model, model_normalization  # noqa: E402
from components.serving.classifier import ImageClassifier  # noqa: E402
from components.serving.predict import auto_batch_size, predict_samples  # noqa: E402

# The seed's measurement: seconds for 600 images (its own machine; for scale only).
SEED_SECONDS_600 = {"mobilenetv2": 15.0, "resnet50": 59.0, "vgg16": 170.0}
CLASSES = ["beer_glass", "cup", "soju_glass"]


def write_images(folder: Path, count: int, seed: int = 0) -> list[tuple[str, int]]:
    """JPEGs with smooth colour regions and noise (decode cost like a small photo)."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((320, 240), Image.BICUBIC)
        noisy = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (240, 320, 3)),
                        0, 255).astype(np.uint8)
        path = folder / f"img{i:04d}.jpg"
        Image.fromarray(noisy).save(path, quality=90)
        samples.append((str(path), i % len(CLASSES)))
    return samples


def build(name: str, image_size: int) -> tuple[ImageClassifier, torch.nn.Module]:
    """The served model class and, for the naive loop, a plain copy of the same network."""
    torch.manual_seed(0)
    net, _ = create_model(name, len(CLASSES), weights="none", image_size=image_size)
    net.eval()
    mean, std = model_normalization(name)
    config = {"model": name, "class_names": CLASSES, "image_size": image_size,
              "mean": list(mean), "std": list(std), "dropout": 0.5, "head_hidden": None}
    state = {k: v.clone() for k, v in net.state_dict().items()}
    return ImageClassifier().build(config, state), net


def naive(net: torch.nn.Module, transform, samples: list[tuple[str, int]],
          device: torch.device) -> np.ndarray:
    """The seeds' loop: PIL open, transform, forward one image at a time under no_grad."""
    out = []
    with torch.no_grad():
        for path, _ in samples:
            img = Image.open(path).convert("RGB")
            logits = net(transform(img).unsqueeze(0).to(device))
            out.append(torch.softmax(logits, dim=1)[0].cpu().numpy())
    return np.stack(out)


def batched(model: ImageClassifier, samples: list[tuple[str, int]], batch_size: int,
            num_workers: int) -> np.ndarray:
    return predict_samples(model, samples, batch_size, num_workers).probs


def timed(fn, *args) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images per model (default 64)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=0,
                        help="evaluate's batch size (default 0: evaluate's auto choice)")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="evaluate's DataLoader workers (its default: 0)")
    parser.add_argument("--models", default="mobilenetv2,resnet50,vgg16")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of each way, alternating; the median is reported")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (default: torch's choice, one per core)")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    args.batch_size = args.batch_size or auto_batch_size(device)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}; "
          f"{args.images} JPEG images (320x240) -> {args.image_size} px, "
          f"batched: batch {args.batch_size}, {args.num_workers} workers; "
          f"median of {args.repeats} alternating runs")
    header = (f"{'model':<12} {'naive img/s':>12} {'batched img/s':>14} {'ratio':>6} "
              f"{'max |dp|':>9} {'seed img/s':>11}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(prefix="cnnflow-inference-") as tmp:
        samples = write_images(Path(tmp), args.images)
        for name in models:
            model, net = build(name, args.image_size)
            model.to(device)
            net.to(device)
            # Untimed warm-up with the timed shapes (oneDNN builds kernels per input shape).
            naive(net, model.transform, samples[:2], device)
            batched(model, samples[:args.batch_size], args.batch_size, args.num_workers)
            naive_times, batched_times = [], []
            for _ in range(args.repeats):  # alternate, so background load hits both alike
                t, p_naive = timed(naive, net, model.transform, samples, device)
                naive_times.append(t)
                t, p_batched = timed(batched, model, samples, args.batch_size,
                                     args.num_workers)
                batched_times.append(t)
            t_naive, t_batched = statistics.median(naive_times), statistics.median(batched_times)
            diff = float(np.abs(p_naive - p_batched).max())
            seed = 600 / SEED_SECONDS_600[name] if name in SEED_SECONDS_600 else float("nan")
            naive_ips, batched_ips = args.images / t_naive, args.images / t_batched
            print(f"{name:<12} {naive_ips:>12.1f} {batched_ips:>14.1f} "
                  f"{batched_ips / naive_ips:>5.2f}x {diff:>9.1e} {seed:>11.1f}   "
                  f"(runs, s: naive {' '.join(f'{t:.1f}' for t in naive_times)}; "
                  f"batched {' '.join(f'{t:.1f}' for t in batched_times)})", flush=True)
    print("ratio = batched / naive images per second (same files, same model, same outputs: "
          "max |dp| is the largest probability difference); seed img/s = the cup/glass "
          "seed's 600 images in 15 / 59 / 170 s on its own machine, for scale only")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
