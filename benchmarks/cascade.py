"""The cascade's speed: images/s end to end, detector vs classifier time, batched crops vs one.

`cnnflow cascade` runs a detector on each batch of images, then classifies every crop of
the `--refine` classes in batches of `--batch-size` crops
(`components.serving.cascade.Cascade`, the code the step and the served model run). The
cup/glass seed classified each detected object on its own: crop, transform, forward at
batch 1. This script times both ways on the same synthetic scenes (224-640 px, N coloured
boxes each, at known places), with the same models (random init: nothing is downloaded;
speed does not depend on the weights):

- detector: the registered detector on the scenes, `auto_batch_size` images per pass
  (4 on CPU, 64 on CUDA), as the step runs it;
- classifier: the N known boxes of every image cropped and classified, `--batch-size` crops
  per forward pass vs one crop at a time (the labels must agree);
- end to end: detector time + batched classifier time, as images per second.

Untimed warm-up first (kernels are built per input shape), then `--repeats` rounds; in each,
one-by-one and batched run back to back, their order swapped every round, so background load
hits both alike. Times are medians over the rounds; `batched x` is the median of the rounds'
own ratios (paired: robust when the machine is shared). From the repository root:

    .venv/bin/python benchmarks/cascade.py
    .venv/bin/python benchmarks/cascade.py --sizes 640 --objects 8,16 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the checkout's package
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from components.data.boxes import Box  # noqa: E402
from components.nn.detectors import Detector, get_detector  # noqa: E402
from components.nn.engine import resolve_device  # noqa: E402
from components.nn.models import create_model, model_normalization  # noqa: E402
from components.serving.cascade import Cascade, CascadeSettings  # noqa: E402
from components.serving.classifier import ImageClassifier  # noqa: E402
from components.serving.predict import auto_batch_size  # noqa: E402

CLASSES = ["beer_glass", "cup", "soju_glass"]


def scenes(count: int, size: int, objects: int, seed: int = 0
           ) -> tuple[list[Image.Image], list[list[Box]]]:
    """`count` size x size scenes with `objects` coloured boxes each (1/8 of the side,
    anywhere), and those boxes labelled `cup` with score 0.9."""
    rng = np.random.default_rng(seed)
    images, boxes = [], []
    side = max(8, size // 8)
    for _ in range(count):
        arr = rng.integers(90, 160, (size, size, 3)).astype(np.uint8)
        found = []
        for _ in range(objects):
            x, y = (int(v) for v in rng.integers(0, size - side, 2))
            arr[y:y + side, x:x + side] = rng.integers(0, 256, 3)
            found.append(Box(x, y, x + side, y + side, "cup", 0.9))
        images.append(Image.fromarray(arr))
        boxes.append(found)
    return images, boxes


def classifier(name: str, image_size: int) -> ImageClassifier:
    torch.manual_seed(0)
    net, _ = create_model(name, len(CLASSES), weights="none", image_size=image_size)
    mean, std = model_normalization(name)
    config = {"model": name, "class_names": CLASSES, "image_size": image_size,
              "mean": list(mean), "std": list(std), "dropout": 0.5, "head_hidden": None}
    return ImageClassifier().build(config, net.state_dict())


def detector(name: str) -> Detector:
    torch.manual_seed(0)
    return Detector(name, get_detector(name)(91).eval(),
                    ["__background__", "cup", *(f"c{i}" for i in range(89))])


def timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - started, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="224,640", help="scene sides in pixels")
    parser.add_argument("--objects", default="1,8,16", help="boxes per scene")
    parser.add_argument("--images", type=int, default=8, help="scenes per configuration")
    parser.add_argument("--detector", default="fasterrcnn_mobilenet_v3_large_320_fpn")
    parser.add_argument("--classifier", default="mobilenetv2",
                        help="the crops' classifier (the cup/glass seed's MobileNetV2)")
    parser.add_argument("--image-size", type=int, default=224, help="the classifier's input")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="crops per forward pass (default 0: the cascade's auto choice, "
                             "4 on CPU, 64 on CUDA)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (default: torch's choice, one per core)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    det = detector(args.detector).to(device)
    det.lower_score_threshold(0.5)
    clf = classifier(args.classifier, args.image_size).to(device)
    cascade = Cascade(clf, CascadeSettings(("cup",), score_threshold=0.0, iou_threshold=1.0,
                                           margin=0.1, min_box=0,
                                           batch_size=args.batch_size))
    per_pass = auto_batch_size(device)
    args.batch_size = cascade.crop_batch()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {device}; detector "
          f"{args.detector} ({per_pass} images per pass), classifier {args.classifier} at "
          f"{args.image_size} px, {args.batch_size} crops per batch; {args.images} scenes per "
          f"row; medians of {args.repeats} rounds")
    header = (f"{'size':>5} {'objs':>4} {'det ms/img':>10} {'cls ms/img':>10} "
              f"{'one-by-one ms/img':>17} {'batched x':>9} {'cascade img/s':>13}")
    print(header)
    print("-" * len(header))
    for size in (int(s) for s in args.sizes.split(",")):
        for objects in (int(n) for n in args.objects.split(",")):
            images, boxes = scenes(args.images, size, objects)
            crops = [c for image, bs in zip(images, boxes, strict=True) for c in
                     [image.crop(tuple(int(v) for v in b.xyxy)) for b in bs]]

            def detect(images=images):
                for first in range(0, len(images), per_pass):
                    det.detect(images[first:first + per_pass])
                if device.type == "cuda":
                    torch.cuda.synchronize()

            def one_by_one(crops=crops):
                return cascade.classify_crops(crops, batch_size=1)[0]

            def batched(crops=crops):
                return cascade.classify_crops(crops)[0]

            detect(images[:per_pass])  # warm-up: the timed shapes
            one_by_one(crops[:2])
            batched(crops[:args.batch_size])
            runs: dict[str, list[float]] = {"det": [], "one": [], "batched": []}
            for round_ in range(args.repeats):
                runs["det"].append(timed(detect)[0])
                order = ("one", "batched") if round_ % 2 == 0 else ("batched", "one")
                labels = {}
                for way in order:
                    t, labels[way] = timed(one_by_one if way == "one" else batched)
                    runs[way].append(t)
                assert labels["one"] == labels["batched"], "batched and one-by-one disagree"
            t_det, t_one, t_batched = (statistics.median(runs[k]) / args.images
                                       for k in ("det", "one", "batched"))
            ratio = statistics.median(a / b for a, b in zip(runs["one"], runs["batched"],
                                                            strict=True))
            print(f"{size:>5} {objects:>4} {t_det * 1e3:>10.1f} {t_batched * 1e3:>10.1f} "
                  f"{t_one * 1e3:>17.1f} {ratio:>8.2f}x "
                  f"{1 / (t_det + t_batched):>13.2f}", flush=True)
    print("det / cls ms/img: detector and batched-classifier time per scene; one-by-one: the "
          "crops classified at batch 1 (the seed's way); batched x = median of one-by-one / "
          "batched per round; "
          "cascade img/s = 1 / (detector + batched classifier) per scene")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
