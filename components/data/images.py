"""Per-file image work - content hash, header facts, small histograms, perceptual hash, cache
pixels - in parallel.

`eda` and `preprocess` must read every file of a dataset, and a naive loop that fully decodes
each image is slow on real photo folders. Here each file is read exactly once: its bytes are
hashed (sha1, for exact-duplicate and leakage checks), size/mode/format come from the header
(no decode), and pixels are decoded only as far as the caller needs them:

- decode check only: JPEGs are decoded at 1/8 scale (`draft`), which still reads the whole
  stream, so truncated files are caught exactly as a full decode would catch them;
- histograms: JPEGs are decoded at reduced scale (`draft`, DCT scaling) to about
  `HIST_SIDE` px, other formats are decoded fully and shrunk with `Image.reduce` (box filter)
  before counting - colour distributions survive downscaling, the work drops 10-50x;
- perceptual hash (near-duplicate detection, `components.data.near_duplicates`): a 256-bit
  pHash of that same reduced image (`reduced`), so eda and preprocess get the same hash for
  a file whatever else they decode; the decode check then uses the reduced decode too;
- cache pixels: a full decode, `to_rgb`, then the exact resize `build_transform` applies, so a
  cached image is bit-identical to one decoded on the fly (with a perceptual hash asked for,
  a drafted JPEG is decoded a second time, at full scale, from the bytes already read).

Every decode goes through `to_rgb`, which first applies the EXIF Orientation tag (`upright`):
phone photos are stored sideways with a tag saying so, and training, the tensor cache, eda and
serving must all see the image the way a viewer shows it.

This module imports no torch, so worker processes (fork or spawn) start fast.
"""

from __future__ import annotations

import array
import functools
import hashlib
import io
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps

from components.errors import one_line
from components.progress import Progress

_IN_MEMORY = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")
HIST_SIDE = 64  # histograms are computed on images shrunk to about this size
HIST_BINS = 256
PHASH_SIDE = 16  # perceptual hash: 16x16 = 256 bits (components.data.near_duplicates)
_HALF = PHASH_SIDE * PHASH_SIDE // 2
HASH_INPUT = 4 * PHASH_SIDE  # imagehash's image size for the DCT (highfreq_factor 4)
_AUTO_SERIAL_BELOW = 64  # with workers=-1, fewer files than this are read in-process


def exif_orientation(img: Image.Image) -> int:
    """The EXIF Orientation tag (1 = upright, 2-8 = stored flipped/rotated); 1 when absent."""
    value = img.getexif().get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright(img: Image.Image) -> Image.Image:
    """The image as a viewer shows it (EXIF Orientation applied); the same object if upright.

    `ImageOps.exif_transpose` does the work; the tag is checked first so the common, upright
    case costs no copy and the caller's image is never modified.
    """
    if exif_orientation(img) == 1:
        return img
    return ImageOps.exif_transpose(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to upright 8-bit RGB; transparency is composited on white, 16-bit scaled."""
    img = upright(img)
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = arr.max() if arr.size else 0.0
        if img.mode == "F" and top <= 1.0:
            arr = arr * 255.0
        elif top > 255.0:
            arr = arr / (65535.0 if top <= 65535.0 else top) * 255.0
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def sha1_file(path: str | Path) -> str:
    """sha1 of a file's bytes: the content hash of the leakage guard and the dataset digest."""
    digest = hashlib.sha1()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resize_square(img: Image.Image, image_size: int) -> Image.Image:
    """What torchvision's `Resize((s, s))` does to a PIL image (bilinear, antialiased).

    `build_transform` resizes with `T.Resize`; the tensor cache resizes here, and a test pins
    the two to identical pixels. On an image already `s`x`s`, PIL returns an unchanged copy,
    so the transform re-applied to a cached image is a no-op.
    """
    return img.resize((image_size, image_size), Image.BILINEAR)


@dataclass
class FileFacts:
    """What one read of a file tells: content hash, header facts, and optional pixels."""

    path: str
    n_bytes: int = 0
    sha1: str = ""
    format: str = ""
    mode: str = ""
    width: int = 0  # as displayed: EXIF orientation applied
    height: int = 0
    orientation: int = 1  # the EXIF Orientation tag; not 1 = stored rotated or flipped
    error: str = ""  # one line; empty when the image decodes
    hist: np.ndarray | None = None  # (3, 256) float32, each channel sums to 1
    phash: str = ""  # 256-bit perceptual hash, 64 hex digits, when asked for
    pixels: np.ndarray | None = None  # (s, s, 3) uint8 when a cache size was asked for

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def rotated(self) -> bool:
        """Stored rotated or flipped (EXIF Orientation not 1): decoding turns it upright."""
        return self.orientation != 1


def read_file(path: str | Path, histogram: bool = False, cache_size: int = 0,
              phash: bool = False) -> FileFacts:
    """Hash, inspect and (as far as needed) decode one file; never raises for a bad image."""
    facts = FileFacts(str(path))
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        facts.error = one_line(f"cannot read file: {type(exc).__name__}: {exc}")
        return facts
    facts.n_bytes = len(data)
    facts.sha1 = hashlib.sha1(data).hexdigest()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette/transparency and EXIF chatter
            with Image.open(io.BytesIO(data)) as img:
                facts.format, facts.mode = img.format or "", img.mode
                facts.width, facts.height = img.size
                if histogram or phash:
                    small = to_rgb(reduced(img))
                    if histogram:
                        facts.hist = _histogram(small)
                    if phash:
                        facts.phash = perceptual_hash(small)
                if cache_size:
                    facts.pixels = _cache_pixels(img, data, (facts.width, facts.height),
                                                 cache_size)
                elif not (histogram or phash):
                    if img.format == "JPEG":
                        img.draft(None, (1, 1))
                    img.load()
                facts.orientation = exif_orientation(img)
                if facts.orientation >= 5:  # 5-8 swap width and height
                    facts.width, facts.height = facts.height, facts.width
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError ...)
        message = _IN_MEMORY.sub("", str(exc))  # "<_io.BytesIO object at 0x..>": no information
        facts.error = one_line(f"cannot decode image: {type(exc).__name__}: {message}")
        facts.hist = facts.pixels = None
        facts.phash = ""
    return facts


def _cache_pixels(img: Image.Image, data: bytes, size: tuple[int, int], cache_size: int
                  ) -> np.ndarray:
    """Full decode, `to_rgb`, the exact resize of `build_transform`: one cache row.

    When `reduced` has drafted `img` to a smaller scale, the bytes are decoded again at full
    scale (a JPEG larger than 2 x HIST_SIDE with a perceptual hash asked for)."""
    if img.size == size:
        img.load()
        return np.asarray(resize_square(to_rgb(img), cache_size), dtype=np.uint8)
    with Image.open(io.BytesIO(data)) as full:
        full.load()
        return np.asarray(resize_square(to_rgb(full), cache_size), dtype=np.uint8)


def reduced(img: Image.Image) -> Image.Image:
    """The image decoded to about HIST_SIDE px: the input of histograms and perceptual hashes.

    JPEGs are decoded at reduced scale (`draft`, DCT scaling; the decode still reads the whole
    stream, so a truncated file fails here as in a full decode); other formats are decoded
    fully and shrunk with `Image.reduce` (box filter). `img` is loaded by this call; when it
    was drafted, its size is the reduced one.
    """
    if img.format == "JPEG":
        img.draft("RGB", (HIST_SIDE, HIST_SIDE))  # DCT-domain downscale: decodes far less
    img.load()
    factor = max(1, min(img.size) // HIST_SIDE)
    return img.reduce(factor) if factor > 1 else img


def _histogram(rgb: Image.Image) -> np.ndarray:
    """Per-channel 256-bin histogram of an RGB image, normalised.

    PIL returns a list of 768 ints; `array.array` takes it in at C speed (numpy's own list
    conversion cost as much as the count itself)."""
    counts = np.frombuffer(array.array("q", rgb.histogram()), dtype=np.int64)
    return (counts.astype(np.float32) / np.float32(max(1, rgb.width * rgb.height))
            ).reshape(3, HIST_BINS)


def perceptual_hash(small: Image.Image) -> str:
    """256-bit pHash of a `reduced` image, as 64 hex digits.

    pHash as `imagehash.phash(img, hash_size=16)` defines it - grey, Lanczos resize to 64x64,
    2-D DCT-II, the 16x16 lowest frequencies, each bit = coefficient above their median -
    except that a reduced image of 64 px or more is not resized: the DCT is taken of it
    directly (basis rows of its own size). The lowest 16 frequencies are the same picture
    content at any size (the result stays within a few bits of imagehash's), and the resize
    cost more than the rest of a thumbnail's scan. A resized or recompressed photo lands
    within a few bits; unrelated pictures differ in about half of them
    (components.data.near_duplicates groups them).
    """
    grey = small.convert("L")
    if min(grey.size) < HASH_INPUT:  # a small original: imagehash's own Lanczos resize
        grey = grey.resize((HASH_INPUT, HASH_INPUT), Image.LANCZOS)
    rows, cols = _dct_basis(grey.height, grey.width)
    pixels = np.frombuffer(grey.tobytes(), np.uint8).reshape(grey.height, grey.width)
    coeffs = np.dot(np.dot(rows, pixels), cols).ravel()  # float32: ample for 8-bit input
    ranked = np.sort(coeffs)  # np.median's value, without its overhead
    return np.packbits(coeffs > (ranked[_HALF - 1] + ranked[_HALF]) * 0.5).tobytes().hex()


@functools.lru_cache(maxsize=256)
def _dct_basis(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The PHASH_SIDE lowest-frequency DCT-II basis rows for the image's columns (16, height)
    and, transposed, for its rows (width, 16): `rows @ pixels @ cols` is the 16x16 DCT."""
    def basis(n: int) -> np.ndarray:
        k, x = np.arange(PHASH_SIDE)[:, None], np.arange(n)[None, :]
        return np.cos(np.pi * k * (2 * x + 1) / (2 * n)).astype(np.float32)

    return basis(height), np.ascontiguousarray(basis(width).T)


def read_files(paths: Sequence[str | Path], *, histogram: bool = False, cache_size: int = 0,
               phash: bool = False, workers: int = -1, progress: bool = False,
               desc: str = "reading images") -> Iterator[FileFacts]:
    """`read_file` over many files, in order, in worker processes, with a progress bar
    (`progress`) or, without one, a plain progress line every few seconds.

    workers: -1 = one process per CPU core (in-process for fewer than 64 files, where
    starting processes costs more than it saves); 0 = in this process; N = N processes.
    """
    fn = partial(read_file, histogram=histogram, cache_size=cache_size, phash=phash)
    n_workers = resolve_workers(workers, len(paths))
    # progress: a bar; else a plain line every few seconds (components.progress).
    bar = Progress(len(paths), desc, "image", bar=progress)
    try:
        if n_workers == 0:
            for path in paths:
                yield fn(path)
                bar.update()
            return
        chunk = max(1, min(64, len(paths) // (n_workers * 8)))
        with ProcessPoolExecutor(max_workers=n_workers) as pool:
            try:
                for facts in pool.map(fn, paths, chunksize=chunk):
                    yield facts
                    bar.update()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        bar.close()


def resolve_workers(workers: int, n_files: int) -> int:
    """Worker processes to use for `n_files` files (0 = in-process); see `read_files`."""
    if workers < -1:
        raise ValueError(f"num_workers={workers} must be -1 (one per CPU core), 0 or more")
    if workers == -1:
        cores = os.cpu_count() or 1
        return 0 if n_files < _AUTO_SERIAL_BELOW or cores == 1 else cores
    return min(workers, max(1, n_files))
