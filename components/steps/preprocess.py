"""`preprocess`: a leakage-safe split manifest and an optional uint8 tensor cache, as a run.

The seeds split their data by hand, and one of them found val/test images duplicated in
train. Here the split is `load_splits`' (the one `train` makes: stratified, deterministic for a
seed, or the folder's own train/val/test), then a leakage guard runs over content hashes:

- identical bytes under different classes (label conflicts) are excluded everywhere and listed;
- identical bytes in more than one split are moved so they live in one split only, the
  first of test, val, train that holds a copy (train loses it); each move is listed;
- near-duplicates (perceptual hashes within near_dup_distance bits: a resized or recompressed
  copy, `components.data.near_duplicates`) follow the same rule as a group: each group lives
  in one split. Near-duplicates under different classes are kept (eda reports them: the
  labels need a look, the files may well be two valid pictures), only in one split.

The manifest (CSV: path relative to the dataset root with '/', label, class_index, split,
sha1, width, height) and, with cache=true, one memory-mappable uint8 NxHxWx3 `.npy` per split
(each image decoded once and resized exactly as `build_transform` would) are artifacts of a
run tagged `cnnflow.step=preprocess`. `train --preprocess-run <id>` reads them back
(`load_prepared`) instead of scanning and decoding the folder; the manifest's digest is
`DatasetSplits.digest()` over its sha1, label and split columns, so it becomes the training
run's `cnnflow.dataset_digest`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from components import tracking
from components.data import near_duplicates
from components.data.datasets import (
    BUNDLED_DATASETS,
    SPLITS,
    DataError,
    DatasetSplits,
    list_images,
    load_splits,
    remove_stale_tmp,
    resolve_data,
)
from components.data.images import read_files
from components.errors import one_line
from components.files import read_csv, write_csv
from components.humanize import plural
from components.names import (
    DATA_ROOT_TAG,
    DATASET_DIGEST_TAG,
    DATASET_TAG,
    PRESPLIT_TAG,
    STEP_TAG,
)
from components.settings import data_cache_dir
from components.steps.params import PreprocessParams

MANIFEST_COLUMNS = ("path", "label", "class_index", "split", "sha1", "width", "height")
KEEP_LEAKED_IN = ("test", "val", "train")  # a leaked image stays in the first split listed
MOVED_COLUMNS = ("path", "label", "sha1", "from_split", "to_split", "reason", "distance")
EXACT_COPY, NEAR_DUPLICATE = "exact copy", "near-duplicate"  # leakage_moved.csv's reasons


# --------------------------------------------------------------------------------------------
# The split plan: scan, split, leakage guard
# --------------------------------------------------------------------------------------------


@dataclass
class SplitPlan:
    """The final split and what it took to get there, before anything is written."""

    splits: DatasetSplits  # after the leakage guard; `skipped` includes excluded files
    facts: dict[str, tuple[str, int, int]]  # absolute path -> (sha1, width, height)
    moved: list[dict[str, Any]] = field(default_factory=list)
    excluded: list[dict[str, Any]] = field(default_factory=list)
    near_dup_distance: int = 0  # 0 = near-duplicates not looked for
    image_size: int = 0  # > 0 when `pixels` holds the cache rows
    pixels: Path | None = None  # scratch .npy, one row per scanned file (see row_of)
    row_of: dict[str, int] = field(default_factory=dict)

    def manifest_rows(self) -> list[dict[str, Any]]:
        """`DatasetSplits.manifest_rows()` (sha1 included) plus width and height of every image."""
        rows = []
        for row in self.splits.manifest_rows():
            _, width, height = self.facts[str(self.splits.root / str(row["path"]))]
            rows.append({**row, "width": width, "height": height})
        return rows

    def metrics(self) -> dict[str, float]:
        s = self.splits
        return {"n_images": float(len(s.train) + len(s.val) + len(s.test)),
                "n_classes": float(len(s.classes)), "n_train": float(len(s.train)),
                "n_val": float(len(s.val)), "n_test": float(len(s.test)),
                "n_skipped": float(len(s.skipped)), "n_leakage_moved": float(len(self.moved)),
                "n_label_conflicts_excluded": float(len(self.excluded)),
                **({"n_near_dup_moved": float(sum(m["reason"] == NEAR_DUPLICATE
                                                  for m in self.moved))}
                   if self.near_dup_distance > 0 else {})}


def plan_split(params: PreprocessParams, scratch: Path, *, progress: bool = False,
               log: Callable[[str], None] = lambda s: None) -> SplitPlan:
    """Read every file once (hash, size; pixels too with cache=true), split, guard leakage.

    Raises a one-line DataError for anything that must stop the step before a run exists.
    """
    params.validate()
    name, root = resolve_data(params.data)
    listing = list_images(root)
    paths = listing.images()
    if not paths:
        raise DataError(f"no image files in {listing.root}: the class folders hold no "
                        "jpg/jpeg/png/bmp/gif/webp/tif files")
    cache_size = params.image_size if params.cache else 0
    pixels_path: Path | None = None
    pixels = None
    if cache_size:
        scratch.mkdir(parents=True, exist_ok=True)
        pixels_path = scratch / "all_images.npy"
        pixels = np.lib.format.open_memmap(pixels_path, mode="w+", dtype=np.uint8,
                                           shape=(len(paths), cache_size, cache_size, 3))
    facts: dict[str, tuple[str, int, int]] = {}
    phash_of: dict[str, str] = {}
    bad: dict[str, str] = {}
    row_of: dict[str, int] = {}
    desc = f"preprocess {name}" + (" (decode + resize)" if cache_size else "")
    scanned = read_files(paths, cache_size=cache_size, phash=params.near_dup_distance > 0,
                         workers=params.num_workers, progress=progress, desc=desc)
    for row, f in enumerate(scanned):
        if f.error:
            bad[f.path] = f.error
            continue
        facts[f.path] = (f.sha1, f.width, f.height)
        phash_of[f.path] = f.phash
        row_of[f.path] = row
        if pixels is not None:
            pixels[row] = f.pixels
    if pixels is not None:
        pixels.flush()
        del pixels

    splits = load_splits(root, params.val_ratio, params.test_ratio, params.seed, known_bad=bad,
                         known_hashes={p: v[0] for p, v in facts.items()})
    splits = replace(splits, name=name)
    missing = [p for s in SPLITS for p, _ in splits.split(s) if p not in facts]
    if missing:
        raise DataError(f"{missing[0]} appeared while preprocess was reading the folder: "
                        "run preprocess again once the folder stops changing")
    guarded, moved, excluded = guard_leakage(splits, {p: v[0] for p, v in facts.items()},
                                             phash_of, params.near_dup_distance)
    _check_every_class_present(splits, guarded, params)
    n_near = sum(m["reason"] == NEAR_DUPLICATE for m in moved)
    if moved and len(moved) > n_near:
        n = len(moved) - n_near
        log(f"leakage guard: {plural(n, 'image')} whose content was in more than one split "
            f"{'was' if n == 1 else 'were'} moved so each lives in one split only")
    if n_near:
        log(f"leakage guard: {n_near} near-duplicate image{'s' if n_near > 1 else ''} (within "
            f"{params.near_dup_distance} bits of a picture in another split) "
            f"{'were' if n_near > 1 else 'was'} moved so each group lives in one split")
    if excluded:
        log(f"leakage guard: {plural(len(excluded), 'image')} with identical content under "
            f"different classes {'was' if len(excluded) == 1 else 'were'} excluded")
    return SplitPlan(splits=guarded, facts=facts, moved=moved, excluded=excluded,
                     near_dup_distance=params.near_dup_distance, image_size=cache_size,
                     pixels=pixels_path, row_of=row_of)


def guard_leakage(splits: DatasetSplits, sha1_of: dict[str, str],
                  phash_of: dict[str, str] | None = None, near_dup_distance: int = 0
                  ) -> tuple[DatasetSplits, list[dict[str, Any]], list[dict[str, Any]]]:
    """Keep each content hash, and each near-duplicate group, in one split; drop content
    hashes that carry two labels.

    Returns the new splits (order otherwise unchanged, so a clean folder gives exactly the
    split `load_splits` made), the moves (reason: exact copy, or near-duplicate with its
    distance to the nearest member of the group in the split it moved to) and the exclusions
    (dicts ready for CSV). near_dup_distance=0 (or no hashes): exact copies only.
    """
    labels: dict[str, set[int]] = defaultdict(set)
    for split in SPLITS:
        for path, label in splits.split(split):
            labels[sha1_of[path]].add(label)
    # Each kept file's group: its sha1, merged with its near-duplicates' sha1s.
    kept = [(split, path) for split in SPLITS for path, _ in splits.split(split)
            if len(labels[sha1_of[path]]) == 1]
    group_of = {sha1_of[path]: sha1_of[path] for _, path in kept}
    hashes = [(phash_of or {}).get(path, "") for _, path in kept]
    for g in near_duplicates.groups(hashes, [sha1_of[p] for _, p in kept], near_dup_distance):
        first = sha1_of[kept[g.members[0]][1]]
        group_of.update((sha1_of[kept[k][1]], first) for k in g.members)
    where: dict[str, set[str]] = defaultdict(set)
    members: dict[str, list[int]] = defaultdict(list)  # group -> positions in `kept`
    position: dict[str, int] = {}
    for k, (split, path) in enumerate(kept):
        where[group_of[sha1_of[path]]].add(split)
        members[group_of[sha1_of[path]]].append(k)
        position[path] = k
    out: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    moved: list[dict[str, Any]] = []
    excluded: list[dict[str, Any]] = []
    for split in SPLITS:
        for path, label in splits.split(split):
            sha1 = sha1_of[path]
            rel = splits.relpath(path)
            if len(labels[sha1]) > 1:
                names = ", ".join(sorted(splits.classes[i] for i in labels[sha1]))
                excluded.append({"path": rel, "label": splits.classes[label], "split": split,
                                 "sha1": sha1, "reason": f"identical image under classes "
                                                         f"{names} (label conflict)"})
                continue
            group = group_of[sha1]
            keep = next(s for s in KEEP_LEAKED_IN if s in where[group])
            if keep != split:
                there = [k for k in members[group] if kept[k][0] == keep]
                if any(sha1_of[kept[k][1]] == sha1 for k in there):
                    reason, distance = EXACT_COPY, 0
                else:
                    reason = NEAR_DUPLICATE
                    distance = near_duplicates.nearest(hashes, position[path], there)
                moved.append({"path": rel, "label": splits.classes[label], "sha1": sha1,
                              "from_split": split, "to_split": keep, "reason": reason,
                              "distance": distance})
            out[keep].append((path, label))
    skipped = splits.skipped + [(str(splits.root / e["path"]), e["reason"]) for e in excluded]
    guarded = replace(splits, train=out["train"], val=out["val"], test=out["test"],
                      skipped=skipped)
    return guarded, moved, excluded


def _check_every_class_present(before: DatasetSplits, after: DatasetSplits,
                               params: PreprocessParams) -> None:
    """A split that should exist must hold every class, or per-class metrics are meaningless."""
    ratios = {"train": params.train_ratio, "val": params.val_ratio, "test": params.test_ratio}
    counts = after.counts()
    usable = {c: sum(counts[s][c] for s in SPLITS) for c in after.classes}
    for split in SPLITS:
        if not (before.split(split) or ratios[split] > 0):
            continue
        for cls in after.classes:
            if counts[split][cls] == 0:
                fix = ("add images to that class or set train_ratio higher" if split == "train"
                       else f"add images to that class, or set {split}_ratio=0 (and give its "
                            "share to another split)")
                raise DataError(f"the {split} split gets no images of class '{cls}' "
                                f"({usable[cls]} usable in total): {fix}")


# --------------------------------------------------------------------------------------------
# Writing the outputs
# --------------------------------------------------------------------------------------------


def write_outputs(plan: SplitPlan, out_dir: Path) -> Path:
    """`data/` (manifest.csv, skipped_files.csv, leakage_moved.csv) and `cache/` under out_dir."""
    data_dir = Path(out_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    s = plan.splits
    write_csv(data_dir / "manifest.csv", plan.manifest_rows(), list(MANIFEST_COLUMNS))
    write_csv(data_dir / "skipped_files.csv",
              [{"path": s.relpath(p), "reason": r} for p, r in s.skipped], ["path", "reason"])
    write_csv(data_dir / "leakage_moved.csv", plan.moved, list(MOVED_COLUMNS))
    if plan.pixels is not None:
        write_cache(plan, Path(out_dir) / "cache")
    return Path(out_dir)


def write_cache(plan: SplitPlan, cache_dir: Path, chunk: int = 512) -> None:
    """One uint8 NxSxSx3 `.npy` plus int64 labels per split, rows in manifest order."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    size = plan.image_size
    source = np.load(plan.pixels, mmap_mode="r")
    counts = {}
    for split in SPLITS:
        samples = plan.splits.split(split)
        counts[split] = len(samples)
        rows = [plan.row_of[p] for p, _ in samples]
        np.save(cache_dir / f"{split}_labels.npy", np.asarray([lb for _, lb in samples],
                                                              dtype=np.int64))
        if not rows:
            np.save(cache_dir / f"{split}_images.npy", np.zeros((0, size, size, 3), np.uint8))
            continue
        target = np.lib.format.open_memmap(cache_dir / f"{split}_images.npy", mode="w+",
                                           dtype=np.uint8, shape=(len(rows), size, size, 3))
        for start in range(0, len(rows), chunk):
            target[start:start + chunk] = source[rows[start:start + chunk]]
        target.flush()
        del target
    del source
    info = {"image_size": size, "splits": counts, "dataset_digest": plan.splits.digest(),
            "layout": "uint8 N x image_size x image_size x 3 (RGB), row i = the split's i-th "
                      "manifest row", "resize": "PIL bilinear, as torchvision Resize"}
    (cache_dir / "cache.json").write_text(json.dumps(info, indent=2))


# --------------------------------------------------------------------------------------------
# The tracked step
# --------------------------------------------------------------------------------------------


@dataclass
class PreprocessOutcome:
    run_id: str
    run_name: str
    experiment_id: str
    digest: str
    metrics: dict[str, float]


def prepared_dir() -> Path:
    """Local copies of preprocess outputs, one folder per run id (safe to delete any time)."""
    return data_cache_dir() / "preprocess"


def run_preprocess(params: PreprocessParams, tracking_uri: str, *, progress: bool | None = None,
                   log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
                   job_run_id: str | None = None) -> PreprocessOutcome:
    """Plan the split (no run yet), then write and log the outputs as a `preprocess` run
    (`job_run_id`: the run opened for this job, filled in instead of a new one)."""
    params.validate()
    client = tracking.connect(tracking_uri)
    progress = sys.stderr.isatty() if progress is None else progress
    base = prepared_dir()
    base.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(base, ".tmp-*")
    work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=base))
    try:
        plan = plan_split(params, work / "scratch", progress=progress, log=log)
        s = plan.splits
        tags = {DATASET_TAG: s.name, DATASET_DIGEST_TAG: s.digest(),
                DATA_ROOT_TAG: str(s.root), PRESPLIT_TAG: str(s.presplit).lower()}
        run_id, exp_id, run_name = tracking.open_run(
            client, step="preprocess", experiment=params.experiment or s.name,
            adopt=job_run_id, tags=tags)
        with tracking.ending_run(client, run_id):
            tracking.log_params_and_tags(client, run_id, params.logged(), {})
            out = write_outputs(plan, work / "out")
            tracking.log_metrics(client, run_id, plan.metrics())
            client.log_artifacts(run_id, str(out / "data"), artifact_path="data")
            if (out / "cache").is_dir():
                client.log_artifacts(run_id, str(out / "cache"), artifact_path="cache")
        # Keep the outputs locally, so the next `train --preprocess-run` needs no download.
        local = base / run_id
        if not local.exists():
            os.replace(out, local)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    m = plan.metrics()
    log(f"preprocess: {s.name}: train {len(s.train)}, val {len(s.val)}, test {len(s.test)}; "
        f"skipped {len(s.skipped)}; moved {plural(len(plan.moved), 'leaked image')}"
        + (f"; cache {plan.image_size} px" if plan.image_size else ""))
    return PreprocessOutcome(run_id, run_name, exp_id, s.digest(), m)


# --------------------------------------------------------------------------------------------
# Reading a preprocess run back (train --preprocess-run)
# --------------------------------------------------------------------------------------------


@dataclass
class PreparedData:
    """What `train` needs from a preprocess run: the split, and the cache when it fits."""

    run_id: str
    splits: DatasetSplits
    params: dict[str, str]  # the preprocess run's params (data, ratios, seed, cache, ...)
    arrays: dict[str, Path] | None  # split -> cache .npy, None = decode the files
    source: str  # "cache" or "manifest"


def read_manifest(path: Path, root: Path, name: str,
                  skipped: list[tuple[str, str]] | None = None,
                  presplit: bool = False) -> DatasetSplits:
    """A manifest CSV back into DatasetSplits (same rows, same order, same digest)."""
    try:
        rows = read_csv(path)
    except OSError as exc:
        raise DataError(f"cannot read manifest {path}: {exc}") from None
    if not rows or not set(MANIFEST_COLUMNS[:4]) <= set(rows[0]):
        raise DataError(f"{path} is not a cnnflow manifest (needs columns "
                        f"{', '.join(MANIFEST_COLUMNS)}): run preprocess to make one")
    classes: dict[int, str] = {}
    out: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    hashes: dict[str, str] = {}
    for n, row in enumerate(rows, start=2):
        try:
            index = int(row["class_index"])
        except ValueError:
            raise DataError(f"{path} line {n}: class_index {row['class_index']!r} is not a "
                            "number: run preprocess again") from None
        if classes.setdefault(index, row["label"]) != row["label"] or row["split"] not in out:
            raise DataError(f"{path} line {n}: inconsistent label/class_index or unknown split "
                            f"{row['split']!r}: run preprocess again")
        out[row["split"]].append((str(root / row["path"]), index))
        if row.get("sha1"):  # the digest is over these: no file is read again
            hashes[str(root / row["path"])] = row["sha1"]
    if sorted(classes) != list(range(len(classes))):
        raise DataError(f"{path}: class indices are not 0..{len(classes) - 1}: "
                        "run preprocess again")
    return DatasetSplits(name=name, root=root, classes=[classes[i] for i in range(len(classes))],
                         train=out["train"], val=out["val"], test=out["test"],
                         skipped=list(skipped or []), presplit=presplit, hashes=hashes)


def load_prepared(client: MlflowClient, run_id: str, image_size: int,
                  log: Callable[[str], None] = lambda s: None,
                  data: str | None = None) -> PreparedData:
    """The split (and cache, when it was built at `image_size`) of a finished preprocess run.

    Outputs are fetched once into `prepared_dir()/<run_id>`. Without a usable cache, every
    file the manifest lists must still exist; a one-line DataError says which are missing.
    `data`, when given, must name the dataset the run read (its name or the same folder).
    """
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise DataError(f"preprocess run '{run_id}' does not exist on this tracking server: "
                        "pass the run id `cnnflow preprocess` printed") from None
    if run.data.tags.get(STEP_TAG) != "preprocess":
        raise DataError(f"run '{run_id}' is not a cnnflow preprocess run: pass the run id "
                        "`cnnflow preprocess` printed")
    if run.info.status != "FINISHED":
        raise DataError(f"preprocess run '{run_id}' is {run.info.status}, not FINISHED: "
                        "run `cnnflow preprocess` again and use the new run")
    params, tags = run.data.params, run.data.tags
    asked, data = data, params.get("data", "")
    root = resolve_data(data)[1] if data in BUNDLED_DATASETS else Path(tags[DATA_ROOT_TAG])
    if asked is not None and asked != data and not _same_folder(asked, root):
        raise DataError(f"data={asked} is not the dataset of preprocess run {run_id} ({data}): "
                        "leave --data out or pass the same folder")
    local = prepared_dir() / run_id
    data_dir = _fetch(client, run_id, "data", local)
    skipped = [(str(root / r["path"]), r["reason"])
               for r in read_csv(data_dir / "skipped_files.csv")]
    splits = read_manifest(data_dir / "manifest.csv", root, tags.get(DATASET_TAG, data),
                           skipped, tags.get(PRESPLIT_TAG) == "true")
    if tags.get(DATASET_DIGEST_TAG) not in (splits.digest(), _path_digest(splits)):
        raise DataError(f"the manifest in {data_dir} does not match run {run_id}'s digest: "
                        f"delete {local} and train again")

    arrays, source = None, "manifest"
    cached = params.get("cache", "false").lower() == "true"
    cache_size = int(float(params.get("image_size", 0)))
    if cached and cache_size == image_size:
        cache_dir = _fetch(client, run_id, "cache", local)
        info = json.loads((cache_dir / "cache.json").read_text())
        expected = {s: len(splits.split(s)) for s in SPLITS}
        if info.get("splits") != expected or info.get("image_size") != image_size:
            raise DataError(f"the tensor cache in {cache_dir} does not match run {run_id}'s "
                            f"manifest: delete {local} and train again")
        arrays = {s: cache_dir / f"{s}_images.npy" for s in SPLITS if expected[s]}
        source = "cache"
    else:
        if cached:
            log(f"preprocess run {run_id} cached {cache_size} px images but image_size is "
                f"{image_size}: decoding the manifest's files instead")
        _check_files_exist(splits, run_id)
    return PreparedData(run_id=run_id, splits=splits, params=dict(params), arrays=arrays,
                        source=source)


def _path_digest(splits: DatasetSplits) -> str:
    """The digest preprocess runs logged before it covered file contents (relpath, label,
    split), so their manifests still pass the integrity check; training from one is tagged
    with the content digest."""
    lines = sorted(f"{splits.relpath(p)},{splits.classes[label]},{s}"
                   for s in SPLITS for p, label in splits.split(s))
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def _same_folder(data: str, root: Path) -> bool:
    try:
        return Path(data).expanduser().resolve() == Path(root).resolve()
    except OSError:
        return False


def _fetch(client: MlflowClient, run_id: str, artifact: str, local: Path) -> Path:
    """`local/<artifact>`, downloaded from the run once and moved into place in one rename."""
    target = local / artifact
    if target.is_dir():
        return target
    local.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=local))
    try:
        try:
            client.download_artifacts(run_id, artifact, str(tmp))
        except (MlflowException, OSError) as exc:
            raise DataError(f"cannot fetch '{artifact}' of preprocess run {run_id}: "
                            f"{one_line(exc)[:200]}") from None
        try:
            os.replace(tmp / artifact, target)
        except OSError:
            if not target.is_dir():  # another process won the race: use its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_files_exist(splits: DatasetSplits, run_id: str) -> None:
    every = [p for s in SPLITS for p, _ in splits.split(s)]
    missing = [p for p in every if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"{len(missing)} of the {len(every)} images in the manifest of preprocess run "
            f"{run_id} no longer exist under {splits.root} (e.g. {splits.relpath(missing[0])}): "
            "restore them, or run `cnnflow preprocess` again and train from the new run")
