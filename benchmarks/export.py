"""Export speed: eager PyTorch vs ONNX Runtime fp32 vs ONNX Runtime static int8, side by side.

For each model and size (random init: nothing is downloaded; speed does not depend on the
weights) the script builds the served model (`ImageClassifier`, channels-last as evaluate
runs it), exports it with the code `cnnflow export` runs (`components.serving.export`:
dynamo exporter, int8 QDQ per-channel calibrated on `--calibration` images through the
model's own transform) and loads the exports as `OnnxClassifier`s. All three score the same
preprocessed batches (`score_batch`: the forward pass and softmax, no decoding) at batch 1
and at evaluate's batch, after an untimed warm-up at each shape, `--repeats` rounds that
alternate the three (the median counts: this machine is shared), with torch's thread count
for all. It prints images/s, the ratios to eager PyTorch, and how far the exports' outputs
are from PyTorch's (max |dp|, top-1 agreement: on random weights, the int8 agreement says
little about a trained model; `cnnflow export` measures that on the test split).

Run from the repository root (a few minutes on 2 CPU cores):

    .venv/bin/python benchmarks/export.py
    .venv/bin/python benchmarks/export.py --cases mobilenetv2:224 --repeats 5
"""

from __future__ import annotations

import argparse
import os
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

from components.nn.models import create_model, model_normalization  # noqa: E402
from components.serving.classifier import ImageClassifier  # noqa: E402
from components.serving.export import calibration_batch, export_fp32, write_member  # noqa: E402
from components.serving.onnx_model import OnnxClassifier  # noqa: E402
from components.serving.predict import auto_batch_size  # noqa: E402

CLASSES = ["beer_glass", "cup", "soju_glass"]
CASES = "mobilenetv2:224,resnet18:224,custom_cnn:224,custom_cnn:32"
FORMATS = ("pytorch", "onnx", "int8")


def photos(count: int, seed: int = 0) -> list[Image.Image]:
    """Photo-like 320x240 images (smooth colour regions plus noise)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        arr = np.asarray(low.resize((320, 240), Image.BICUBIC), dtype=np.int16)
        out.append(Image.fromarray(np.clip(arr + rng.integers(-12, 13, arr.shape), 0, 255)
                                   .astype(np.uint8)))
    return out


def build(name: str, size: int, calibration: list[Image.Image], work: Path) -> dict:
    """The PyTorch model and its two exports, as `cnnflow export` writes them."""
    torch.manual_seed(0)
    net, _ = create_model(name, len(CLASSES), weights="none", image_size=size)
    mean, std = model_normalization(name)
    config = {"model": name, "class_names": CLASSES, "image_size": size, "mean": list(mean),
              "std": list(std), "dropout": 0.5, "head_hidden": None}
    model = ImageClassifier().build(config, {k: v.clone() for k, v in net.state_dict().items()})
    fp32 = work / f"{name}-{size}.onnx"
    exported = export_fp32(model.model, size, fp32, name)
    model.to("cpu")  # channels-last again after the exporter's contiguous copy
    batch = calibration_batch(model.transform, calibration)
    models = {"pytorch": model}
    for fmt in ("onnx", "int8"):
        folder = write_member(fmt, fp32, exported, config, work / f"{name}-{size}-{fmt}", batch)
        models[fmt] = OnnxClassifier().load(folder / "model_config.json", folder / "model.onnx")
    return models


def images_per_sec(model, x: torch.Tensor, seconds: float) -> float:
    """Calls on the batch `x` for at least `seconds` (and 3 calls): images per second."""
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        model.score_batch([x])
        calls += 1
    return calls * len(x) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=CASES, help="model:size,... (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=1.0, help="per timing")
    parser.add_argument("--calibration", type=int, default=32, help="int8 calibration images")
    parser.add_argument("--images", type=int, default=64, help="images compared for parity")
    args = parser.parse_args()

    batch = auto_batch_size(torch.device("cpu"))
    pictures = photos(max(args.images, batch))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start; "
          f"batches 1 and {batch}, {args.repeats} alternating repeats (median)")
    header = (f"{'model':<12} {'px':>4} {'batch':>5} {'pytorch/s':>10} {'onnx/s':>8} "
              f"{'int8/s':>8} {'onnx x':>7} {'int8 x':>7}")
    rows, parity = [header], []
    with tempfile.TemporaryDirectory(prefix="cnnflow-bench-export-") as tmp:
        for case in args.cases.split(","):
            name, size = case.split(":")
            models = build(name, int(size), pictures[:args.calibration], Path(tmp))
            x_all = torch.stack([models["pytorch"].transform(p) for p in pictures])
            probs = {f: models[f].score_batch([x_all])[0].exp().numpy() for f in FORMATS}
            ref = probs["pytorch"]
            parity.append(f"{name:<12} {size:>4}  " + "  ".join(
                f"{f}: max|dp| {np.abs(probs[f] - ref).max():.1e}, top-1 agreement "
                f"{(probs[f].argmax(1) == ref.argmax(1)).mean():.3f}" for f in FORMATS[1:]))
            for n in (1, batch):
                x = x_all[:n].contiguous()
                for f in FORMATS:  # warm-up at this shape
                    images_per_sec(models[f], x, 0.05)
                speeds: dict[str, list[float]] = {f: [] for f in FORMATS}
                for _ in range(args.repeats):
                    for f in FORMATS:
                        speeds[f].append(images_per_sec(models[f], x, args.seconds))
                med = {f: statistics.median(v) for f, v in speeds.items()}
                rows.append(f"{name:<12} {size:>4} {n:>5} {med['pytorch']:>10.1f} "
                            f"{med['onnx']:>8.1f} {med['int8']:>8.1f} "
                            f"{med['onnx'] / med['pytorch']:>6.2f}x "
                            f"{med['int8'] / med['pytorch']:>6.2f}x")
                print(rows[-1] if len(rows) > 2 else "\n".join(rows), flush=True)
    print("\n".join(["", "parity on the benchmark images (random weights):", *parity]))
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
