"""Image folders in, reproducible splits and DataLoaders out.

Everything a training run depends on is decided here, deterministically: which files count as
images, which split each one lands in, how it is turned into a tensor. The same folder and seed
give the same split (and the same `digest()`) on every machine, so runs stay comparable and
val/test images never leak into train. The digest is over file contents (sha1 of the bytes),
labels and splits, not paths: the same files anywhere give the same digest, and two folders
with the same file names but other pixels do not.

Layouts:
- flat: ``root/<class>/**/<image>`` - split per class into train/val/test by the ratios.
- presplit: ``root/train/<class>/...`` plus optional ``val/`` (aliases ``valid/``,
  ``validation/``) and ``test/``, each with the same class folders. A missing ``val/`` or
  ``test/`` is carved, stratified, from ``train/`` with ``val_ratio`` / ``test_ratio``
  (ratio 0 leaves it empty); the choice is recorded in ``DatasetSplits.notes``.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    Sampler,
    WeightedRandomSampler,
)
from torchvision import transforms as T

# These live in images.py: torch-free for worker processes.
from components.data.images import read_file, sha1_file, to_rgb
from components.errors import CnnflowError
from components.params import DataParams, RuntimeParams
from components.registrar import registrar
from components.settings import data_cache_dir

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
SPLITS: tuple[str, str, str] = ("train", "val", "test")
BUNDLED_DATASETS = ("digits",)

_VAL_ALIASES = ("val", "valid", "validation")
_DIGITS_COUNT = 1797
_DIGITS_SIZE = 32
_COMPLETE_MARKER = ".cnnflow-complete"  # hidden: ignored when the folder is read as a dataset
_STALE_TMP_SEC = 3600
_THREADED_MIN_BYTES = 16 * 1024  # below this mean file size, threads cost more than they save


class DataError(CnnflowError, ValueError):
    """Bad input data; the message is one line saying what is wrong and what to do."""


# --------------------------------------------------------------------------------------------
# The bundled dataset
# --------------------------------------------------------------------------------------------


def resolve_data(data: str) -> tuple[str, Path]:
    """Turn a `--data` value into (dataset name, root folder); 'digits' is generated on demand."""
    if data in BUNDLED_DATASETS:
        return data, ensure_digits()
    root = _existing_dir(Path(data))
    return root.name, root


def folder_fingerprint(data: str) -> str:
    """sha256 over every file's relative path, size and modification time under the dataset.

    Cheap (no file is read) and changes when any file is added, removed or rewritten: the
    pipeline's test of "same input" before it reuses an earlier eda or preprocess run.
    """
    _, root = resolve_data(data)
    lines = []
    for folder, dirs, files in os.walk(root, followlinks=True):  # as the scanner reads them
        dirs.sort()
        for name in sorted(files):
            stat = (Path(folder) / name).stat()
            rel = (Path(folder) / name).relative_to(root).as_posix()
            lines.append(f"{rel}\t{stat.st_size}\t{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def _existing_dir(path: Path) -> Path:
    root = path.expanduser()
    if not root.exists():
        raise DataError(
            f"data path {root} does not exist: pass an image folder or one of "
            f"{', '.join(BUNDLED_DATASETS)}"
        )
    if not root.is_dir():
        raise DataError(
            f"data path {root} is not a directory: pass a folder holding one sub-folder per class"
        )
    return root.resolve()


def ensure_digits(cache_dir: Path | None = None) -> Path:
    """Write scikit-learn's handwritten digits as PNG class folders once, atomically.

    A fresh machine without network can still run every command. The folder appears in one
    rename, so an interrupted or concurrent first use never leaves (or sees) a partial dataset.
    """
    cache = Path(cache_dir) if cache_dir is not None else data_cache_dir()
    target = cache / "digits"
    if (target / _COMPLETE_MARKER).is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(cache, ".digits-tmp-*")
    if target.exists() and not (target / _COMPLETE_MARKER).is_file() and any(target.iterdir()):
        raise DataError(
            f"{target} exists but was not written by cnnflow: delete it so digits can be generated"
        )
    tmp = Path(tempfile.mkdtemp(prefix=".digits-tmp-", dir=cache))
    try:
        _write_digits(tmp)
        try:
            os.replace(tmp, target)  # atomic; fails if another process already put it there
        except OSError:
            if not (target / _COMPLETE_MARKER).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _write_digits(folder: Path) -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    for label in range(10):
        (folder / str(label)).mkdir()
    for index, (pixels, label) in enumerate(zip(images, bunch.target, strict=True)):
        img = Image.fromarray(pixels, "L").resize((_DIGITS_SIZE, _DIGITS_SIZE), Image.NEAREST)
        img.save(folder / str(int(label)) / f"{index}.png")
    if len(images) != _DIGITS_COUNT:  # pragma: no cover - guards a changed sklearn dataset
        warnings.warn(f"digits has {len(images)} images, expected {_DIGITS_COUNT}", stacklevel=2)
    (folder / _COMPLETE_MARKER).write_text("generated by cnnflow from sklearn.load_digits\n")


def remove_stale_tmp(folder: Path, pattern: str) -> None:
    """Drop temp folders left by interrupted runs (old enough not to be in progress)."""
    now = time.time()
    for tmp in folder.glob(pattern):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_SEC:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


@dataclass
class DatasetSplits:
    """The classes and the train/val/test file lists of one dataset, plus what was skipped."""

    name: str
    root: Path
    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    presplit: bool = False
    notes: list[str] = field(default_factory=list)
    # absolute path -> sha1 of the file bytes; filled by the scan, missing ones on first use
    hashes: dict[str, str] = field(default_factory=dict, repr=False)

    def split(self, name: str) -> list[tuple[str, int]]:
        """The samples of one split by name ('train', 'val' or 'test')."""
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}: use one of {', '.join(SPLITS)}")
        return getattr(self, name)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per class in each split (every class listed, zeros included)."""
        out: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            per_class = dict.fromkeys(self.classes, 0)
            for _, label in self.split(split):
                per_class[self.classes[label]] += 1
            out[split] = per_class
        return out

    def relpath(self, path: str) -> str:
        """A sample's path relative to the root with '/' separators, identical on every OS."""
        return relative_posix(path, self.root)

    def content_hashes(self) -> dict[str, str]:
        """sha1 of every sample's bytes (path -> hex), hashing only files the scan did not."""
        missing = [p for s in SPLITS for p, _ in self.split(s) if p not in self.hashes]
        if missing:
            self.hashes.update(hash_files(missing))
        return self.hashes

    def manifest_rows(self) -> list[dict[str, object]]:
        """One row per image (relative path, class name, class index, split, sha1) for a CSV."""
        sha1 = self.content_hashes()
        rows = []
        for split in SPLITS:
            for path, label in self.split(split):
                rows.append({"path": self.relpath(path), "label": self.classes[label],
                             "class_index": label, "split": split, "sha1": sha1[path]})
        return rows

    def digest(self) -> str:
        """sha256 of the sorted `sha1,label,split` lines: what the model saw, not where it was.

        Equal digests mean the same bytes under the same labels in the same splits.
        """
        lines = sorted(f"{r['sha1']},{r['label']},{r['split']}" for r in self.manifest_rows())
        return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


@dataclass
class FolderListing:
    """Every file under a dataset folder, sorted into (split folder, class) before any decoding.

    `files` maps a group - 'all' for a flat folder, else the split folders present ('train',
    'val', 'test') - to class name -> sorted image paths. Classes may be empty here: `eda`
    reports what `load_splits` would refuse.
    """

    root: Path
    presplit: bool
    dirs: dict[str, Path]
    files: dict[str, dict[str, list[Path]]]
    skipped: list[tuple[str, str]]

    @property
    def classes(self) -> list[str]:
        """Class names, sorted: those of train/ for a pre-split folder (as `load_splits`)."""
        return sorted(self.files["train" if self.presplit else "all"])

    def images(self) -> list[Path]:
        """Every file with an image extension, in a deterministic order."""
        return [p for per_class in self.files.values() for paths in per_class.values()
                for p in paths]


def list_images(root: Path) -> FolderListing:
    """Walk a dataset folder once (no decoding); a one-line DataError if it has no class folder.

    Non-image files, loose files and unexpected folders land in `skipped` with the reason.
    """
    root = _existing_dir(Path(root))
    skipped: list[tuple[str, str]] = []
    subdirs, root_files = _list_dir(root)
    for f in root_files:
        skipped.append((str(f), "not in a class folder"))
    presplit = "train" in {d.name for d in subdirs}
    if presplit:
        dirs = _presplit_dirs(root, subdirs, skipped)
        files = {split: _scan_classes(folder, skipped) for split, folder in dirs.items()}
        classes = files["train"]
    else:
        dirs = {"all": root}
        files = {"all": _scan_classes(root, skipped)}
        classes = files["all"]
    if not classes:
        raise DataError(
            f"no class folders in {root}: put images in one sub-folder per class "
            "(root/<class>/*.png) or in train/ val/ test/ folders holding class sub-folders"
        )
    return FolderListing(root=root, presplit=presplit, dirs=dirs, files=files, skipped=skipped)


def load_splits(data: str | Path, val_ratio: float = DataParams.val_ratio,
                test_ratio: float = DataParams.test_ratio, seed: int = DataParams.seed,
                verify: bool = True, known_bad: Mapping[str, str] | None = None,
                known_hashes: Mapping[str, str] | None = None) -> DatasetSplits:
    """Read an image folder into reproducible, stratified train/val/test splits.

    A `str` goes through `resolve_data` (so 'digits' works); a `Path` is always a folder.
    Within a class, files are ordered by a seeded hash of their relative path before the
    split is cut, so the split is the same on every machine and adding images moves few
    existing ones between splits. verify=True reads every file once (sha1 of its bytes for
    `digest()`, plus a decode) and skips bad ones; `known_bad` and `known_hashes` (path ->
    reason / sha1, from a scan that already read every file) replace that read, so `eda` and
    `preprocess` get exactly the split `train` makes without a second read.
    """
    check_ratios(val_ratio, test_ratio)
    if isinstance(data, str):
        name, root = resolve_data(data)
    else:
        root = _existing_dir(Path(data))
        name = root.name
    listing = list_images(root)
    presplit, split_dirs = listing.presplit, listing.dirs
    skipped = list(listing.skipped)
    files = {group: {cls: list(paths) for cls, paths in per_class.items()}
             for group, per_class in listing.files.items()}
    notes: list[str] = []
    classes = listing.classes
    if presplit:
        _check_class_sets(files, split_dirs)

    hashes: dict[str, str] = dict(known_hashes or {})
    if known_bad is not None or verify:
        every = listing.images()
        if known_bad is not None:
            bad = [(str(p), known_bad[str(p)]) for p in every if str(p) in known_bad]
        else:
            found, bad = scan_images(every)
            hashes.update(found)
        if bad:
            skipped.extend(bad)
            bad_paths = {p for p, _ in bad}
            for per_split in files.values():
                for cls in per_split:
                    per_split[cls] = [p for p in per_split[cls] if str(p) not in bad_paths]

    for split, per_split in files.items():
        for cls in classes:
            if not per_split.get(cls):
                where = split_dirs[split]
                fix = "add images or remove the class from every split" if presplit else (
                    "add images or remove the folder")
                raise DataError(
                    f"class folder {cls!r} in {where} is empty (no readable images): {fix}"
                )
    if len(classes) < 2:
        raise DataError(
            f"only one class ({classes[0]!r}) in {root}: a classifier needs at least two "
            "class folders"
        )

    index = {c: i for i, c in enumerate(classes)}
    out: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    if presplit:
        for split in files:
            for cls in classes:
                out[split].extend((str(p), index[cls]) for p in files[split][cls])
        carve_val = "val" not in files and val_ratio > 0
        carve_test = "test" not in files and test_ratio > 0
        if carve_val or carve_test:
            train_only: list[tuple[str, int]] = []
            for cls in classes:
                tr, va, te = _cut(_seeded_order(files["train"][cls], root, seed),
                                  val_ratio if carve_val else 0.0,
                                  test_ratio if carve_test else 0.0)
                train_only.extend((str(p), index[cls]) for p in tr)
                out["val"].extend((str(p), index[cls]) for p in va)
                out["test"].extend((str(p), index[cls]) for p in te)
            out["train"] = train_only
        for split, ratio, carve in (("val", val_ratio, carve_val),
                                    ("test", test_ratio, carve_test)):
            if split in files:
                continue
            notes.append(f"no {split}/ folder: {ratio:.0%} of train/ held out as {split} "
                         f"(seed {seed})" if carve else f"no {split}/ folder: {split} split empty")
    else:
        for cls in classes:
            tr, va, te = _cut(_seeded_order(files["all"][cls], root, seed), val_ratio, test_ratio)
            out["train"].extend((str(p), index[cls]) for p in tr)
            out["val"].extend((str(p), index[cls]) for p in va)
            out["test"].extend((str(p), index[cls]) for p in te)
    if not out["train"]:  # defensive: _cut always keeps one image per class in train
        raise DataError(f"the train split of {root} is empty: add images or lower the ratios")

    return DatasetSplits(name=name, root=root, classes=classes, train=out["train"],
                         val=out["val"], test=out["test"], skipped=skipped,
                         presplit=presplit, notes=notes, hashes=hashes)


def check_ratios(val_ratio: float, test_ratio: float) -> None:
    """One-line DataError unless both are in [0, 1) and leave something to train on."""
    for label, ratio in (("val_ratio", val_ratio), ("test_ratio", test_ratio)):
        if not (isinstance(ratio, (int, float)) and 0.0 <= ratio < 1.0):
            raise DataError(f"{label}={ratio} is outside [0, 1): pass a fraction such as 0.2")
    if val_ratio + test_ratio >= 1.0:
        raise DataError(
            f"val_ratio + test_ratio = {val_ratio + test_ratio:g} leaves nothing to train on: "
            "keep their sum below 1 (e.g. 0.2 and 0.2)"
        )


def _hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _list_dir(folder: Path) -> tuple[list[Path], list[Path]]:
    """Sorted visible sub-folders and files of one folder."""
    dirs, files = [], []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if _hidden(entry):
            continue
        (dirs if entry.is_dir() else files).append(entry)
    return dirs, files


def _presplit_dirs(root: Path, subdirs: list[Path],
                   skipped: list[tuple[str, str]]) -> dict[str, Path]:
    by_name = {d.name: d for d in subdirs}
    found = {"train": by_name["train"]}
    vals = [a for a in _VAL_ALIASES if a in by_name]
    if len(vals) > 1:
        raise DataError(
            f"{root} has both {' and '.join(v + '/' for v in vals)}: keep one validation folder"
        )
    if vals:
        found["val"] = by_name[vals[0]]
    if "test" in by_name:
        found["test"] = by_name["test"]
    used = set(found.values())
    for d in subdirs:
        if d not in used:
            skipped.append((str(d), "not a split folder (expected train/, val/, test/)"))
    return found


def _scan_classes(folder: Path, skipped: list[tuple[str, str]]) -> dict[str, list[Path]]:
    """class name -> sorted image files under that class folder (recursively)."""
    class_dirs, loose = _list_dir(folder)
    for f in loose:
        skipped.append((str(f), "not in a class folder"))
    out: dict[str, list[Path]] = {}
    for cdir in class_dirs:
        images: list[Path] = []
        for dirpath, dirnames, filenames in os.walk(cdir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fname in sorted(filenames):
                if fname.startswith("."):
                    continue
                path = Path(dirpath) / fname
                if path.suffix.lower() in IMAGE_EXTENSIONS:
                    images.append(path)
                else:
                    skipped.append((str(path), "not an image extension"))
        out[cdir.name] = sorted(images, key=lambda p: p.as_posix())
    return out


def _check_class_sets(files: dict[str, dict[str, list[Path]]], dirs: dict[str, Path]) -> None:
    train = set(files["train"])
    for split in ("val", "test"):
        if split not in files:
            continue
        other = set(files[split])
        if other != train:
            parts = []
            if train - other:
                parts.append(f"missing {', '.join(sorted(train - other))}")
            if other - train:
                parts.append(f"extra {', '.join(sorted(other - train))}")
            raise DataError(
                f"class folders in {dirs[split]} differ from train/ ({'; '.join(parts)}): "
                "use the same class sub-folders in every split"
            )


def relative_posix(path: str | Path, root: str | Path) -> str:
    """`Path(os.path.relpath(path, root)).as_posix()`, without its cost for the usual case -
    a path listed under root - which eda and preprocess meet once per file (a plain prefix
    cut when no '.', '..' or empty part needs normalising)."""
    text, base = os.fspath(path), os.fspath(root)
    prefix = base if base.endswith(os.sep) else base + os.sep
    if text.startswith(prefix):
        parts = text[len(prefix):].split(os.sep)
        if all(part not in ("", ".", "..") for part in parts):
            return "/".join(parts)
    return Path(os.path.relpath(text, base)).as_posix()


def _seeded_order(paths: list[Path], root: Path, seed: int) -> list[Path]:
    """A seed-dependent shuffle that only depends on relative paths (stable across machines)."""
    def key(p: Path) -> str:
        rel = relative_posix(p, root)
        return hashlib.sha256(f"{seed}\0{rel}".encode()).hexdigest()
    return sorted(paths, key=key)


def _cut(paths: list[Path], val_ratio: float, test_ratio: float
         ) -> tuple[list[Path], list[Path], list[Path]]:
    """Split one class: classes of >= 3 images get >= 1 val and test image; train keeps >= 1."""
    n = len(paths)
    n_test = math.floor(n * test_ratio + 0.5)
    n_val = math.floor(n * val_ratio + 0.5)
    if n >= 3:
        n_test = max(n_test, 1) if test_ratio > 0 else 0
        n_val = max(n_val, 1) if val_ratio > 0 else 0
    while n_test + n_val > n - 1:
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return paths[n_test + n_val:], paths[n_test:n_test + n_val], paths[:n_test]


def verify_images(paths: Sequence[Path | str], workers: int | None = None
                  ) -> list[tuple[str, str]]:
    """Decode every file once (pixels discarded); return (path, reason) for those that fail."""
    return scan_images(paths, workers)[1]


def scan_images(paths: Sequence[Path | str], workers: int | None = None
                ) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Read every file once: (path -> sha1 of its bytes, [(path, reason) that fail to decode]).

    `images.read_file` does the work (the same hash and decode check as eda and preprocess).
    Reading, hashing and decoding release the GIL, so a thread pool uses every core without
    process start-up cost (measured on 2 cores: ~1.9x on 640x480 JPEGs and 224 px PNGs); for
    tiny files thread overhead dominates (2-5x slower), so those are read serially. JPEGs are
    decoded at 1/8 scale, which still reads the whole stream and so still catches truncation.
    """
    facts = _in_threads(read_file, paths, workers)
    hashes = {f.path: f.sha1 for f in facts if f.sha1}
    return hashes, [(f.path, f.error) for f in facts if f.error]


def hash_files(paths: Sequence[Path | str], workers: int | None = None) -> dict[str, str]:
    """path -> sha1 of the file bytes, without decoding; a one-line DataError for a lost file."""
    def one(path: Path | str) -> str | OSError:
        try:
            return sha1_file(path)
        except OSError as exc:
            return exc

    out: dict[str, str] = {}
    for path, result in zip(paths, _in_threads(one, paths, workers), strict=True):
        if isinstance(result, OSError):
            raise DataError(f"cannot read {path} to hash it ({type(result).__name__}): restore "
                            "the file, or scan the folder again for a new split")
        out[str(path)] = result
    return out


def _in_threads(fn: Callable, paths: Sequence[Path | str], workers: int | None) -> list:
    """`fn` over paths in order: in a thread pool for large files, serially for tiny ones."""
    if not paths:
        return []
    workers = workers or min(8, 2 * (os.cpu_count() or 1))
    if workers <= 1 or len(paths) < 16 or _mean_file_size(paths) < _THREADED_MIN_BYTES:
        return [fn(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, paths, chunksize=32))


def _mean_file_size(paths: Sequence[Path | str], sample: int = 32) -> float:
    step = max(1, len(paths) // sample)
    sizes = []
    for p in paths[::step][:sample]:
        try:
            sizes.append(os.path.getsize(p))
        except OSError:
            sizes.append(0)
    return sum(sizes) / max(1, len(sizes))


# --------------------------------------------------------------------------------------------
# Pixels: any image mode to RGB (`to_rgb` lives in components.data.images, torch-free for workers)
# --------------------------------------------------------------------------------------------


def load_rgb(path: str | Path) -> Image.Image:
    """Open an image file fully into memory as upright RGB (EXIF orientation applied by
    `to_rgb`); the file handle is closed on return."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


class ToRGB:
    """Transform step: a PIL image of any mode to upright RGB (picklable for DataLoader workers)."""

    def __call__(self, img: Image.Image) -> Image.Image:
        return to_rgb(img)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class AddGaussianNoise:
    """Tensor step: add N(0, std) noise and clamp to [0, 1] (before Normalize)."""

    def __init__(self, std: float = 0.05) -> None:
        self.std = std

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        return (tensor + torch.randn_like(tensor) * self.std).clamp_(0.0, 1.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(std={self.std})"


# --------------------------------------------------------------------------------------------
# Augmentation presets
# --------------------------------------------------------------------------------------------


@dataclass
class Augmentation:
    """What a preset adds to the train transform: steps on the PIL image, then on the tensor."""

    pil: list[Callable] = field(default_factory=list)
    tensor: list[Callable] = field(default_factory=list)


AUGMENTATIONS: dict[str, Callable[[int], Augmentation]] = {}


# `@register_augmentation(name)` adds a preset `fn(image_size) -> Augmentation`.
register_augmentation = registrar(AUGMENTATIONS, "augmentation")


def list_augmentations() -> list[str]:
    """Names of the registered presets, for help texts and validation."""
    return sorted(AUGMENTATIONS)


def get_augmentation(name: str) -> Callable[[int], Augmentation]:
    """The preset builder for `name`; a DataError naming the valid presets otherwise."""
    try:
        return AUGMENTATIONS[name]
    except KeyError:
        raise DataError(
            f"unknown augmentation {name!r}: use one of {', '.join(list_augmentations())}"
        ) from None


@register_augmentation("none")
def _aug_none(image_size: int) -> Augmentation:
    """Resize only."""
    return Augmentation()


@register_augmentation("light")
def _aug_light(image_size: int) -> Augmentation:
    """Mirror and a small tilt: safe for almost any photo dataset."""
    return Augmentation(pil=[T.RandomHorizontalFlip(), T.RandomRotation(10)])


@register_augmentation("strong")
def _aug_strong(image_size: int) -> Augmentation:
    """The rice-leaf / MNIST seeds' recipe: flips, rotation 20, colour jitter, affine, noise."""
    return Augmentation(
        pil=[
            T.RandomHorizontalFlip(),
            T.RandomVerticalFlip(),
            T.RandomRotation(20),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
            T.RandomAffine(degrees=0, translate=(0.1, 0.1), scale=(0.9, 1.1)),
        ],
        tensor=[AddGaussianNoise(0.05)],
    )


def build_transform(augmentation: str, image_size: int, train: bool,
                    mean: Sequence[float] = IMAGENET_MEAN,
                    std: Sequence[float] = IMAGENET_STD) -> T.Compose:
    """PIL image (any mode) -> normalised CxHxW float tensor; only train transforms augment."""
    preset = get_augmentation(augmentation)  # validate the name even for eval transforms
    if image_size < 1:
        raise DataError(f"image_size={image_size} must be a positive number of pixels")
    steps: list[Callable] = [ToRGB(), T.Resize((image_size, image_size))]
    extra = preset(image_size) if train else Augmentation()
    steps += extra.pil
    steps.append(T.ToTensor())
    steps += extra.tensor
    steps.append(T.Normalize(list(mean), list(std)))
    return T.Compose(steps)


# --------------------------------------------------------------------------------------------
# Datasets and loaders
# --------------------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """(path, label) samples -> (CxHxW float tensor, label), decoded on access."""

    def __init__(self, samples: Sequence[tuple[str, int]],
                 transform: Callable | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform if transform is not None else T.Compose([ToRGB(), T.ToTensor()])

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            img = load_rgb(path)
        except Exception as exc:
            raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from exc
        return self.transform(img), label


class ArrayImageDataset(Dataset):
    """Rows of a uint8 NxHxWx3 `.npy` file (the preprocess tensor cache) -> (tensor, label).

    Nothing is decoded: row i is wrapped as a PIL image and goes through the same transform
    as a decoded file, so every augmentation preset works unchanged and, because the cache was
    resized with the transform's own resize (a no-op on an image already at size), tensors
    equal those of `ImageDataset` bit for bit. The file is memory-mapped lazily in each process:
    a pickled memmap would be copied whole into every DataLoader worker.
    """

    def __init__(self, images: Path | str, labels: Sequence[int],
                 transform: Callable | None = None, rows: Sequence[int] | None = None) -> None:
        self.images = Path(images)
        self.labels = [int(label) for label in labels]
        self.transform = transform if transform is not None else T.ToTensor()
        self._array: np.ndarray | None = None
        n_rows = len(self._pixels())
        self.rows = list(range(n_rows)) if rows is None else [int(r) for r in rows]
        if len(self.rows) != len(self.labels) or any(not 0 <= r < n_rows for r in self.rows):
            raise DataError(f"{self.images} holds {n_rows} images, which does not match the "
                            f"{len(self.labels)} samples asked for: run preprocess again")

    def _pixels(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.images, mmap_mode="r")
        return self._array

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_array"] = None  # each worker maps the file itself
        return state

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        img = Image.fromarray(np.array(self._pixels()[self.rows[index]], dtype=np.uint8), "RGB")
        return self.transform(img), self.labels[index]


def seed_worker(worker_id: int) -> None:
    """Seed numpy and `random` in a DataLoader worker from torch's per-worker seed."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


class ShardSampler(Sampler[int]):
    """Every rank-th index from `rank`, without the padding DistributedSampler adds.

    Evaluation needs each sample counted exactly once across ranks, or reduced val metrics
    would differ from a single-process pass over the same split.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


# How the train split is drawn each epoch: `fn(labels, generator) -> Sampler | None` (None:
# a plain shuffle). The sampler draws with the loader's generator, so the engine's per-epoch
# re-seeding of that generator makes a resumed run draw the same batches.
SAMPLINGS: dict[str, Callable[[Sequence[int], torch.Generator], Sampler[int] | None]] = {}
register_sampling = registrar(SAMPLINGS, "sampling")


def check_sampling(name: str, world_size: int = 1) -> None:
    """A known sampling, and none but `none` under DistributedDataParallel (each rank draws
    its own shard there)."""
    if name not in SAMPLINGS:
        raise DataError(f"unknown sampling {name!r}: use one of {', '.join(sorted(SAMPLINGS))}")
    if name != "none" and world_size > 1:
        raise DataError(f"sampling {name} draws from the whole train split and does not "
                        "combine with --nproc > 1: use --sampling none or --nproc 1")


@register_sampling("none")
def _plain_shuffle(labels: Sequence[int], generator: torch.Generator) -> None:
    """Each image once per epoch, in a new order."""
    return None


@register_sampling("balanced")
def _balanced(labels: Sequence[int], generator: torch.Generator) -> Sampler[int]:
    """With replacement, each image weighted 1 / its class's count: every class is drawn about
    equally often, so a 9:1 folder trains as if it were 1:1 (the rare images repeat)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    weights = 1.0 / counts[np.asarray(labels, dtype=np.int64)]
    return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), len(labels),
                                 replacement=True, generator=generator)


def make_loaders(splits: DatasetSplits, image_size: int, batch_size: int,
                 augmentation: str = "none", mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD,
                 num_workers: int = RuntimeParams.num_workers, seed: int = DataParams.seed,
                 device_type: str = "cpu", arrays: Mapping[str, Path] | None = None,
                 array_rows: Mapping[str, Sequence[int]] | None = None,
                 rank: int = 0, world_size: int = 1,
                 sampling: str = "none") -> dict[str, DataLoader | None]:
    """DataLoaders for train/val/test; a split with no images maps to None (key always present).

    Train order depends only on `seed`; drop_last avoids a 1-sample batch breaking BatchNorm.
    `arrays` (split -> .npy of the preprocess tensor cache, rows in the split's sample order)
    replaces decoding files for those splits; batches are identical either way.
    `array_rows` maps a split to the cache row of each sample when the samples are a
    resampled list (bagging) rather than the cached split itself.
    With `world_size` > 1 (DistributedDataParallel) each rank reads its own shard: train
    through a DistributedSampler (reshuffled per epoch by the engine's `set_epoch`), val/test
    through an unpadded ShardSampler so reduced metrics count every sample exactly once.
    `sampling` (a `SAMPLINGS` name) draws the train split, e.g. `balanced` classes.
    """
    check_sampling(sampling, world_size)
    if batch_size < 1:
        raise DataError(f"batch_size={batch_size} must be at least 1")
    if num_workers < 0:
        raise DataError(f"num_workers={num_workers} must be 0 or more")
    loaders: dict[str, DataLoader | None] = {}
    for split in SPLITS:
        samples = splits.split(split)
        if not samples:
            loaders[split] = None
            continue
        train = split == "train"
        transform = build_transform(augmentation, image_size, train, mean, std)
        if arrays is not None and split in arrays:
            dataset: Dataset = ArrayImageDataset(arrays[split], [lb for _, lb in samples],
                                                 transform, (array_rows or {}).get(split))
        else:
            dataset = ImageDataset(samples, transform)
        generator = torch.Generator().manual_seed(seed + SPLITS.index(split))
        sampler: Sampler[int] | None = (
            SAMPLINGS[sampling]([lb for _, lb in samples], generator) if train else None)
        per_rank = len(samples)
        if world_size > 1:
            sampler = (DistributedSampler(dataset, world_size, rank, shuffle=True, seed=seed)
                       if train else ShardSampler(len(samples), rank, world_size))
            per_rank = len(sampler)
        workers = min(num_workers, math.ceil(max(per_rank, 1) / batch_size))
        loaders[split] = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            generator=generator,
            drop_last=train and per_rank > batch_size,
            num_workers=workers,
            worker_init_fn=seed_worker if workers > 0 else None,
            persistent_workers=workers > 0,
            pin_memory=device_type == "cuda",
        )
    return loaders


def class_weights(splits: DatasetSplits, mode: str) -> torch.Tensor | None:
    """Loss weights per class: None, or 'balanced' = n / (n_classes * count_c) over train.

    'balanced' is scikit-learn's; a class absent from train weighs 0, and n_classes still
    counts it (sklearn counts only the classes it is given, hence the rescaling).
    """
    if mode == "none":
        return None
    if mode != "balanced":
        raise DataError(f"unknown class weights mode {mode!r}: use one of none, balanced")
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([label for _, label in splits.train])
    present = np.unique(labels)
    weights = np.zeros(len(splits.classes))
    weights[present] = (compute_class_weight("balanced", classes=present, y=labels)
                        * (len(present) / len(splits.classes)))
    return torch.tensor(weights, dtype=torch.float32)
