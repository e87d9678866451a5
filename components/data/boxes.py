"""Boxes drawn elsewhere: YOLO txt folders and COCO JSON files, read into one shape.

The cup/glass seed ran a YOLOv5 detector before its classifier; `cnnflow cascade --boxes`
reads such a detector's output, and `--ground-truth` reads the true boxes, without cnnflow
importing any detector. Two formats, one registry (`@register_box_format`):

- `yolo`: a folder of `.txt` files, one per image at the image's relative path (a `labels/`
  folder mirroring `images/`), one box per line: `class cx cy w h [score]`, class an index,
  the rest normalised to the image's width and height; the class names come from
  `classes.txt` (one name per line, line i = class i) or `data.yaml` (`names:` list or map)
  in that folder;
- `coco`: a COCO-style JSON file (`images` with `file_name`, `annotations` with `image_id`,
  `category_id`, `bbox` = [x, y, w, h] in pixels and an optional `score`, `categories`).

Every problem is one line naming the file (and line, for txt; the entry, for JSON) and what
to do: a malformed line, an unknown class, a box for an image that does not exist. A box
without a score has score 1. Boxes are kept in pixels, as corners (x1, y1, x2, y2).

No MLflow, no torch: reading boxes is plain file work.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from components.errors import CnnflowError
from components.registrar import registrar


class BoxesError(CnnflowError, ValueError):
    """A boxes file or folder that cannot be read as it is; one line saying what to do."""


@dataclass(frozen=True)
class Box:
    """One box in pixels (corners), its class name and score (1 when the source had none)."""

    x1: float
    y1: float
    x2: float
    y2: float
    label: str
    score: float = 1.0

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)


@dataclass
class BoxSet:
    """Boxes per image (key: the image's path relative to the images folder, POSIX) and the
    class names the source declares, in its order."""

    boxes: dict[str, list[Box]]
    classes: list[str]
    source: str

    def of(self, key: str) -> list[Box]:
        return self.boxes.get(key, [])


# `@register_box_format(name)` adds a reader: (path, images root, image keys) -> BoxSet.
BoxReader = Callable[[Path, Path, dict[str, Path]], BoxSet]
BOX_FORMATS: dict[str, BoxReader] = {}
register_box_format = registrar(BOX_FORMATS, "box format")

CLASS_FILES = ("classes.txt", "data.yaml")
_SLACK = 1e-3  # normalised coordinates a rounding step past 0 or 1 are clamped, not refused


def box_format(path: Path) -> str:
    """`coco` for a `.json` file, `yolo` for a folder; anything else is one line."""
    if path.is_file() and path.suffix.lower() == ".json":
        return "coco"
    if path.is_dir():
        return "yolo"
    if not path.exists():
        raise BoxesError(f"boxes {path} do not exist: pass a folder of YOLO txt files or a "
                         "COCO JSON file")
    raise BoxesError(f"boxes {path} are neither a folder of YOLO txt files nor a .json file: "
                     "pass one of those")


def read_boxes(path: str | Path, images_root: Path, images: Sequence[Path]) -> BoxSet:
    """The boxes of `path` (format by `box_format`) for `images` under `images_root`.

    Raises `BoxesError` (one line) on anything malformed, and on a box for an image that is
    not among `images`: detections of another folder must not pass silently.
    """
    path = Path(path).expanduser()
    root = Path(images_root)
    keys = {image_key(p, root): p for p in images}
    return BOX_FORMATS[box_format(path)](path, root, keys)


def image_key(path: Path, root: Path) -> str:
    """An image's key in a BoxSet: its path relative to the images folder, POSIX."""
    return Path(path).relative_to(root).as_posix()


def _size(path: Path) -> tuple[int, int]:
    """(width, height) as the pixels are shown: EXIF rotation by 90 degrees swaps them."""
    with Image.open(path) as img:
        width, height = img.size
        orientation = img.getexif().get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


# --------------------------------------------------------------------------------------------
# YOLO txt
# --------------------------------------------------------------------------------------------


def yolo_classes(folder: Path) -> list[str]:
    """The class names of a YOLO folder: classes.txt, else data.yaml's `names`."""
    txt, yaml_file = (folder / name for name in CLASS_FILES)
    if txt.is_file():
        names = [line.strip() for line in txt.read_text().splitlines()]
        while names and not names[-1]:
            names.pop()
        if not names or any(not n for n in names):
            raise BoxesError(f"{txt} has an empty line: write one class name per line "
                             "(line 1 = class 0)")
        return names
    if yaml_file.is_file():
        import yaml

        try:
            names = (yaml.safe_load(yaml_file.read_text()) or {}).get("names")
        except (yaml.YAMLError, AttributeError) as exc:
            raise BoxesError(f"{yaml_file} is not a YAML mapping with `names` "
                             f"({type(exc).__name__}): list the class names under names:"
                             ) from None
        if isinstance(names, dict) and sorted(names) == list(range(len(names))):
            names = [names[i] for i in range(len(names))]
        if not isinstance(names, list) or not names:
            raise BoxesError(f"{yaml_file} has no `names` list (or 0..N-1 map): list the "
                             "class names under names:")
        return [str(n) for n in names]
    raise BoxesError(f"YOLO boxes folder {folder} has no classes.txt or data.yaml: write "
                     "classes.txt with one class name per line (line 1 = class 0)")


def _yolo_box(fields: list[str], classes: list[str], size: tuple[int, int],
              where: str) -> Box:
    if len(fields) not in (5, 6):
        raise BoxesError(f"{where}: expected `class cx cy w h [score]`, got {len(fields)} "
                         "fields: write one box per line")
    try:
        index = int(fields[0])
        values = [float(v) for v in fields[1:]]
    except ValueError:
        raise BoxesError(f"{where}: expected `class cx cy w h [score]` with an integer class "
                         f"and numbers, got '{' '.join(fields)}'") from None
    if not all(math.isfinite(v) for v in values):
        raise BoxesError(f"{where}: a value is not a finite number: fix the line")
    if not 0 <= index < len(classes):
        raise BoxesError(f"{where}: class {index} is not in the class list (0-"
                         f"{len(classes) - 1}): fix the line or add the class")
    cx, cy, w, h = values[:4]
    score = values[4] if len(values) == 5 else 1.0
    if w <= 0 or h <= 0:
        raise BoxesError(f"{where}: width and height must be > 0 (got {w:g} x {h:g})")
    corners = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
    if any(c < -_SLACK or c > 1 + _SLACK for c in corners):
        raise BoxesError(f"{where}: the box reaches outside 0..1: YOLO coordinates are "
                         "normalised to the image's width and height")
    if not 0 <= score <= 1:
        raise BoxesError(f"{where}: score {score:g} is not in [0, 1]")
    width, height = size
    x1, y1, x2, y2 = (min(max(c, 0.0), 1.0) for c in corners)
    return Box(x1 * width, y1 * height, x2 * width, y2 * height, classes[index], score)


@register_box_format("yolo")
def read_yolo(folder: Path, root: Path, images: dict[str, Path]) -> BoxSet:
    classes = yolo_classes(folder)
    stems: dict[str, list[str]] = {}
    for key in images:
        stems.setdefault(Path(key).with_suffix("").as_posix(), []).append(key)
    boxes: dict[str, list[Box]] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(folder)
            if path.suffix != ".txt" or name.startswith(".") or rel.as_posix() in CLASS_FILES:
                continue
            keys = stems.get(rel.with_suffix("").as_posix(), [])
            if not keys:
                raise BoxesError(f"{path} has no image {rel.with_suffix('.*')} in {root}: "
                                 "remove the file or pass the images folder it belongs to")
            if len(keys) > 1:
                raise BoxesError(f"{path} fits {len(keys)} images ({', '.join(keys)}): YOLO "
                                 "boxes name an image by its stem, so keep one of them")
            key = keys[0]
            size = _size(images[key])
            found = []
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                fields = line.split()
                if fields:
                    found.append(_yolo_box(fields, classes, size, f"{path} line {number}"))
            boxes[key] = found
    return BoxSet(boxes, classes, str(folder))


# --------------------------------------------------------------------------------------------
# COCO JSON
# --------------------------------------------------------------------------------------------


def _entries(data: Any, key: str, path: Path) -> list[dict[str, Any]]:
    entries = data.get(key) if isinstance(data, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise BoxesError(f"{path} has no `{key}` list of objects: a COCO file holds images, "
                         "annotations and categories")
    return entries


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and \
        math.isfinite(value)


@register_box_format("coco")
def read_coco(path: Path, root: Path, images: dict[str, Path]) -> BoxSet:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BoxesError(f"{path} line {exc.lineno} column {exc.colno}: not valid JSON "
                         f"({exc.msg})") from None
    categories: dict[Any, str] = {}
    for i, cat in enumerate(_entries(data, "categories", path)):
        if "id" not in cat or not str(cat.get("name", "")).strip():
            raise BoxesError(f"{path} categories[{i}]: needs an `id` and a `name`")
        categories[cat["id"]] = str(cat["name"])
    files: dict[Any, str] = {}
    for i, image in enumerate(_entries(data, "images", path)):
        name = str(image.get("file_name", ""))
        if "id" not in image or not name:
            raise BoxesError(f"{path} images[{i}]: needs an `id` and a `file_name`")
        key = Path(name).as_posix()
        if key not in images:
            raise BoxesError(f"{path} images[{i}]: image '{name}' (id {image['id']}) does not "
                             f"exist in {root}: remove it or pass the images folder it "
                             "belongs to")
        files[image["id"]] = key
    boxes: dict[str, list[Box]] = {key: [] for key in files.values()}
    sizes: dict[str, tuple[int, int]] = {}
    for i, ann in enumerate(_entries(data, "annotations", path)):
        where = f"{path} annotations[{i}]" + (f" (id {ann['id']})" if "id" in ann else "")
        if ann.get("image_id") not in files:
            raise BoxesError(f"{where}: image_id {ann.get('image_id')!r} is not in `images`")
        if ann.get("category_id") not in categories:
            raise BoxesError(f"{where}: category_id {ann.get('category_id')!r} is not in "
                             "`categories`")
        bbox = ann.get("bbox")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(map(_number, bbox)):
            raise BoxesError(f"{where}: bbox must be [x, y, width, height] in pixels")
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            raise BoxesError(f"{where}: bbox width and height must be > 0")
        score = ann.get("score", 1.0)
        if not _number(score) or not 0 <= score <= 1:
            raise BoxesError(f"{where}: score must be a number in [0, 1]")
        key = files[ann["image_id"]]
        if key not in sizes:
            sizes[key] = _size(images[key])
        width, height = sizes[key]
        if x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
            raise BoxesError(f"{where}: bbox {bbox} reaches outside the {width}x{height} "
                             f"image {key}")
        boxes[key].append(Box(max(x, 0.0), max(y, 0.0), min(x + w, width),
                              min(y + h, height), categories[ann["category_id"]],
                              float(score)))
    return BoxSet(boxes, list(dict.fromkeys(categories.values())), str(path))
