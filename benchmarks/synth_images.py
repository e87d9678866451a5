"""Generate a photo-like image folder for the data benchmarks (no network, reproducible).

Real datasets behind cnnflow's users are folders of JPEGs: small web/Kaggle images (224 px),
web-size photos (~500x375) and camera photos (1600x1200 and up). Random noise would be an
unfair stand-in (it compresses and decodes unlike photos), so each image is a smooth colour
gradient with a few soft blobs (drawn at 1/4 size and upscaled) plus mild sensor noise, saved
as JPEG (quality 90) or PNG. Orientation varies (some portrait), so sizes are not all equal.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

# name -> the (width, height) cycle images get
SIZE_PRESETS = {
    "thumb": ((224, 224), (224, 224), (224, 168)),
    "web": ((500, 375), (500, 375), (500, 375), (375, 500), (640, 480)),
    "camera": ((1600, 1200), (1600, 1200), (1200, 1600), (2048, 1536)),
}
_NOISE: np.ndarray | None = None


def _noise(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A window of one per-process noise tile: sensor-like grain without per-image cost."""
    global _NOISE
    if _NOISE is None:
        _NOISE = np.random.default_rng(12345).normal(0, 4, (2200, 2200, 3)).astype(np.float32)
    y = int(rng.integers(0, _NOISE.shape[0] - h + 1))
    x = int(rng.integers(0, _NOISE.shape[1] - w + 1))
    return _NOISE[y:y + h, x:x + w]


def _one(args: tuple[str, int, int, str, tuple[int, int]]) -> None:
    path, seed, class_index, fmt, (w, h) = args
    rng = np.random.default_rng(seed)
    sw, sh = max(8, w // 4), max(8, h // 4)
    y, x = np.mgrid[0:sh, 0:sw].astype(np.float32)
    base = rng.uniform(40, 200, 3) + 25 * class_index
    slope = rng.uniform(-0.6, 0.6, (2, 3))
    small = base + x[..., None] * slope[0] + y[..., None] * slope[1]
    for _ in range(4):
        cx, cy, r = rng.uniform(0, sw), rng.uniform(0, sh), rng.uniform(5, 30)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        small += blob[..., None] * rng.uniform(-80, 80, 3)
    up = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8), "RGB").resize((w, h),
                                                                              Image.BICUBIC)
    pixels = np.clip(np.asarray(up, dtype=np.float32) + _noise(h, w, rng), 0, 255)
    out = Image.fromarray(pixels.astype(np.uint8), "RGB")
    if fmt == "png":
        out.save(path, compress_level=6)
    else:
        out.save(path, quality=90)


def make_photo_folder(root: Path, n_images: int, n_classes: int = 5, png_share: float = 0.0,
                      size: str = "web", workers: int | None = None) -> Path:
    """`root/class_k/img_XXXXX.{jpg,png}`: n_images split evenly over n_classes, reproducible."""
    root = Path(root)
    sizes = SIZE_PRESETS[size]
    jobs = []
    n_png = round(n_images * png_share)
    for i in range(n_images):
        cls = i % n_classes
        fmt = "png" if i < n_png else "jpg"
        folder = root / f"class_{cls}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((str(folder / f"img_{i:05d}.{fmt}"), i, cls, fmt, sizes[i % len(sizes)]))
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        list(pool.map(_one, jobs, chunksize=32))
    return root
