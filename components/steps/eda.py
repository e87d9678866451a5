"""`eda`: what is in an image folder - numbers, tables, figures, plain-word findings.

Every seed project started with the same notebook: count images per class, look for broken
files, odd sizes and colour modes, plot colour histograms, eyeball samples - and one of them
later found val/test images duplicated in train. This module does all of it in one pass over
the files (components.data.images: one read per file, in worker processes) and writes a Markdown
report with PNG figures that reads well on GitHub and as MLflow run artifacts.

Splits: a pre-split folder reports its own train/val/test; a flat folder reports the split
`train` and `preprocess` would make with the same val_ratio / test_ratio / seed (the very same
`load_splits` call), so cross-split duplicates show exactly what would leak.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from PIL import Image

from components import tracking
from components.data import near_duplicates
from components.data.datasets import (
    SPLITS,
    DataError,
    check_ratios,
    list_images,
    load_splits,
    relative_posix,
    resolve_data,
)
from components.data.images import HIST_BINS, read_files, to_rgb
from components.files import replace_dir
from components.humanize import plural
from components.names import DATA_ROOT_TAG, DATASET_DIGEST_TAG, DATASET_TAG, STEP_TAG
from components.steps import label_issues
from components.steps.params import EdaParams

IMBALANCE_WORTH_NOTING = 1.5
SAMPLES_PER_CLASS = 6
MAX_SAMPLE_CLASSES = 20
MAX_TABLE_ROWS = 50
NEAR_DUP_FIGURE_GROUPS = 6  # groups shown in near_duplicates.png, most urgent first
NEAR_DUP_FIGURE_FILES = 5  # thumbnails per group


# --------------------------------------------------------------------------------------------
# Scan
# --------------------------------------------------------------------------------------------


@dataclass
class DatasetScan:
    """Everything one pass over a dataset's files found."""

    name: str
    root: Path
    presplit: bool
    classes: list[str]
    # One row per file with an image extension: path (relative, '/'), label, group (the
    # folder: 'all' or a split folder), split ('' when unreadable), format, mode, width,
    # height (as displayed, EXIF orientation applied), orientation, n_bytes, sha1, phash
    # (256-bit perceptual hash, '' when unreadable or near_dup_distance=0), error.
    table: pd.DataFrame
    other_files: list[tuple[str, str]]  # non-image or misplaced files: (relative path, reason)
    hist_sum: dict[str, np.ndarray]  # class -> summed per-image (3, 256) histograms
    split_note: str = ""
    split_error: str = ""  # why `load_splits` (hence train) would refuse the folder
    digest: str = ""  # the split's manifest digest when load_splits accepted the folder
    notes: list[str] = field(default_factory=list)
    near_dup_distance: int = 0  # bits of 256; 0 = near-duplicates not looked for

    @property
    def readable(self) -> pd.DataFrame:
        return self.table[self.table["error"] == ""]


def scan_dataset(data: str | Path, val_ratio: float = EdaParams.val_ratio,
                 test_ratio: float = EdaParams.test_ratio, seed: int = EdaParams.seed,
                 workers: int = EdaParams.num_workers, progress: bool = False,
                 near_dup_distance: int = EdaParams.near_dup_distance) -> DatasetScan:
    """Read every file of a dataset once; a one-line DataError if there is nothing to scan.

    With near_dup_distance > 0 the same read also computes each file's perceptual hash."""
    check_ratios(val_ratio, test_ratio)
    name, root = resolve_data(data) if isinstance(data, str) else ("", Path(data))
    listing = list_images(root)
    root = listing.root
    name = name or root.name

    def rel(path: str | Path) -> str:
        return relative_posix(path, root)

    entries = [(group, cls, path) for group, per_class in listing.files.items()
               for cls, paths in per_class.items() for path in paths]
    if not entries:
        raise DataError(f"no image files in {root}: the class folders hold no "
                        "jpg/jpeg/png/bmp/gif/webp/tif files")
    records: list[dict[str, Any]] = []
    hist_sum: dict[str, np.ndarray] = {}
    facts_iter = read_files([p for _, _, p in entries], histogram=True,
                            phash=near_dup_distance > 0, workers=workers, progress=progress,
                            desc=f"eda {name}")
    for (group, cls, path), facts in zip(entries, facts_iter, strict=True):
        records.append({"path": rel(path), "abs": str(path), "label": cls, "group": group,
                        "format": facts.format, "mode": facts.mode, "width": facts.width,
                        "height": facts.height, "orientation": facts.orientation,
                        "n_bytes": facts.n_bytes, "sha1": facts.sha1, "phash": facts.phash,
                        "error": facts.error})
        if facts.hist is not None:
            if cls not in hist_sum:
                hist_sum[cls] = np.zeros((3, HIST_BINS), dtype=np.float64)
            hist_sum[cls] += facts.hist
    table = pd.DataFrame(records)

    # The split train/preprocess would use, computed by the same function, from this scan.
    bad = {r["abs"]: r["error"] for r in records if r["error"]}
    split_of: dict[str, str] = {}
    split_error, digest, notes = "", "", []
    try:
        splits = load_splits(root, val_ratio, test_ratio, seed, known_bad=bad,
                             known_hashes={r["abs"]: r["sha1"] for r in records if r["sha1"]})
    except DataError as exc:
        split_error = str(exc)
    else:
        for split in SPLITS:
            split_of.update((path, split) for path, _ in splits.split(split))
        digest, notes = splits.digest(), splits.notes
    if split_of:
        table["split"] = [split_of.get(p, "") for p in table["abs"]]
    else:  # refused: fall back to the folders themselves
        table["split"] = np.where(table["error"] == "", table["group"], "")
    if listing.presplit:
        split_note = ("pre-split folder: its own train/val/test folders"
                      + (f" ({'; '.join(notes)})" if notes else ""))
    else:
        split_note = (f"flat folder: the split train and preprocess make with "
                      f"val_ratio={val_ratio:g}, test_ratio={test_ratio:g}, seed={seed}")
    if split_error:
        split_note += " - not computed, train would refuse this folder (see findings)"
    classes = sorted({cls for per_class in listing.files.values() for cls in per_class})
    other = [(rel(p), reason) for p, reason in listing.skipped]
    return DatasetScan(name=name, root=root, presplit=listing.presplit, classes=classes,
                       table=table, other_files=other, hist_sum=hist_sum,
                       split_note=split_note, split_error=split_error, digest=digest,
                       notes=list(notes), near_dup_distance=near_dup_distance)


# --------------------------------------------------------------------------------------------
# Numbers and findings
# --------------------------------------------------------------------------------------------


@dataclass
class EdaSummary:
    """The report's numbers: metrics for MLflow, tables for Markdown, findings in plain words."""

    metrics: dict[str, float]
    findings: list[str]
    counts: dict[str, dict[str, int]]  # split -> class -> readable images
    class_totals: dict[str, int]
    sizes: list[tuple[int, int]]
    common_size: tuple[int, int] | None
    modes: dict[str, int]
    formats: dict[str, int]
    within_class: pd.DataFrame  # duplicate groups inside one class
    label_conflicts: pd.DataFrame  # identical content under more than one class
    cross_split: pd.DataFrame  # identical content in more than one split
    # Near-duplicate groups (two or more distinct files within scan.near_dup_distance bits),
    # most urgent first: label conflicts, then cross-split, then within a class. Columns:
    # group (1, 2, ...), labels, splits, max_distance, files (relative), members (rows of
    # `scan.readable` as (abs path, label, split)), conflict, cross_split.
    near_duplicates: pd.DataFrame = field(default_factory=pd.DataFrame)


def _groups(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Duplicate groups as rows: sha1, the distinct labels/splits and the files involved."""
    rows = []
    for sha1, group in frame.groupby("sha1", sort=True):
        rows.append({"sha1": sha1, "labels": sorted(set(group["label"])),
                     "splits": sorted(set(group["split"]), key=_split_order),
                     "files": sorted(group["path"]), **{k: group[k].iloc[0] for k in keys}})
    return pd.DataFrame(rows, columns=["sha1", "labels", "splits", "files", *keys])


NEAR_COLUMNS = ["group", "labels", "splits", "max_distance", "files", "members", "conflict",
                "cross_split"]


def _near_groups(ok: pd.DataFrame, max_distance: int) -> pd.DataFrame:
    """Near-duplicate groups of the readable files, as rows in the order the report uses."""
    found = near_duplicates.groups(list(ok["phash"]), list(ok["sha1"]), max_distance)
    rows = []
    for g in found:
        part = ok.iloc[list(g.members)].sort_values("path")
        splits = set(part["split"])
        rows.append({"labels": sorted(set(part["label"])),
                     "splits": sorted(splits, key=_split_order),
                     "max_distance": g.max_distance, "files": list(part["path"]),
                     "members": list(zip(part["abs"], part["label"], part["split"],
                                         strict=True)),
                     "conflict": part["label"].nunique() > 1,
                     "cross_split": len(splits & set(SPLITS)) > 1})
    rows.sort(key=lambda r: (not r["conflict"], not r["cross_split"], r["files"][0]))
    for n, row in enumerate(rows, start=1):
        row["group"] = n
    return pd.DataFrame(rows, columns=NEAR_COLUMNS)


def _split_order(split: str) -> int:
    order = [*SPLITS, "all"]
    return order.index(split) if split in order else len(order)


def summarize(scan: DatasetScan) -> EdaSummary:
    """Exact counts from the scan (definitions in the README's `eda` section)."""
    ok = scan.readable
    splits_present = [s for s in [*SPLITS, "all"] if s in set(ok["split"])]
    counts = {s: {c: int(((ok["split"] == s) & (ok["label"] == c)).sum()) for c in scan.classes}
              for s in splits_present}
    totals = {c: int((ok["label"] == c).sum()) for c in scan.classes}
    nonzero = {c: n for c, n in totals.items() if n > 0}
    imbalance = (max(nonzero.values()) / min(nonzero.values())) if nonzero else 0.0
    sizes = list(zip(ok["width"].astype(int), ok["height"].astype(int), strict=True))
    size_counts = Counter(sizes)
    common = size_counts.most_common(1)[0][0] if sizes else None
    off_size = sum(n for s, n in size_counts.items() if s != common)

    by_hash = ok.groupby("sha1")
    n_duplicates = int(len(ok) - by_hash.ngroups)
    dup_hashes = by_hash.filter(lambda g: len(g) > 1)
    within = dup_hashes.groupby(["sha1", "label"]).filter(lambda g: len(g) > 1)
    n_within = int(len(within) - within.groupby(["sha1", "label"]).ngroups) if len(within) else 0
    conflicts = dup_hashes.groupby("sha1").filter(lambda g: g["label"].nunique() > 1)
    assigned = dup_hashes[dup_hashes["split"].isin(SPLITS)]
    cross = assigned.groupby("sha1").filter(lambda g: g["split"].nunique() > 1)

    n_corrupt = int((scan.table["error"] != "").sum())
    metrics = {
        "n_images": float(len(ok)), "n_classes": float(len(scan.classes)),
        "imbalance_ratio": float(imbalance), "n_corrupt": float(n_corrupt),
        "n_duplicates": float(n_duplicates),
        "n_cross_split_duplicates": float(cross["sha1"].nunique() if len(cross) else 0),
        "n_distinct_sizes": float(len(size_counts)),
        "n_within_class_duplicates": float(n_within),
        "n_label_conflicts": float(conflicts["sha1"].nunique() if len(conflicts) else 0),
        "n_off_size": float(off_size), "n_other_files": float(len(scan.other_files)),
        "n_rotated": float((ok["orientation"] != 1).sum()),
    }
    near = _near_groups(ok, scan.near_dup_distance)
    if scan.near_dup_distance > 0:  # 0 = not looked for: no metrics rather than zeros
        metrics.update({
            "n_near_duplicate_groups": float(len(near)),
            "n_near_dup_within_class": float((~near["conflict"]).sum()),
            "n_near_dup_label_conflicts": float(near["conflict"].sum()),
            "n_near_dup_cross_split": float(near["cross_split"].sum()),
        })
    summary = EdaSummary(
        metrics=metrics, findings=[], counts=counts, class_totals=totals, sizes=sizes,
        common_size=common, modes=dict(Counter(ok["mode"]).most_common()),
        formats=dict(Counter(ok["format"]).most_common()),
        within_class=_groups(within, []), label_conflicts=_groups(conflicts, []),
        cross_split=_groups(cross, ["label"]), near_duplicates=near)
    summary.findings = _findings(scan, summary)
    return summary


NO_FINDINGS = "no problems found"  # the one finding of a clean dataset


def _findings(scan: DatasetScan, s: EdaSummary) -> list[str]:
    """What a careful reader of the tables would say, one sentence each, most urgent first."""
    m, out = s.metrics, []
    if scan.split_error:
        out.append(f"train would refuse this folder: {scan.split_error}")
    if m["n_label_conflicts"]:
        n = m["n_label_conflicts"]
        out.append(f"{plural(n, 'image')} {_verb(n, 'appears', 'appear')} under more than one "
                   "class (label conflicts): fix the labels; preprocess excludes them")
    n = m.get("n_near_dup_label_conflicts", 0)
    if n:
        out.append(f"{plural(n, 'group')} of near-identical pictures "
                   f"{_verb(n, 'appears', 'appear')} under more than one class (e.g. "
                   f"{_example(s.near_duplicates, 'conflict')}): check their labels; "
                   "preprocess keeps each group in one split and does not delete them")
    if m["n_cross_split_duplicates"]:
        n = m["n_cross_split_duplicates"]
        out.append(f"{plural(n, 'image')} {_verb(n, 'appears', 'appear')} in more than one split "
                   "(leakage: val/test scores would be inflated): train from a `preprocess` "
                   "run, which keeps each image in one split only")
    n = m.get("n_near_dup_cross_split", 0)
    if n:
        out.append(f"{plural(n, 'group')} of near-identical pictures (resized, recompressed "
                   f"or edited copies) {_verb(n, 'spans', 'span')} more than one split "
                   f"(e.g. {_example(s.near_duplicates, 'cross_split')}; leakage: val/test "
                   "scores would be inflated): train from a `preprocess` run, which keeps "
                   "each group in one split")
    if m["n_corrupt"]:
        out.append(f"{plural(m['n_corrupt'], 'file')} with an image extension cannot be decoded: "
                   "they are skipped (listed under Unreadable files); re-export or delete them")
    if m["n_other_files"]:
        n = m["n_other_files"]
        out.append(f"{plural(n, 'other file')} {_verb(n, 'is', 'are')} not an image or not in "
                   "a class folder: ignored")
    empty = [c for c, n in s.class_totals.items() if n == 0]
    if empty:
        out.append(f"{'class' if len(empty) == 1 else 'classes'} "
                   f"{', '.join(f'`{c}`' for c in empty)} {_verb(len(empty), 'has', 'have')} "
                   "no readable images")
    nonzero = {c: n for c, n in s.class_totals.items() if n > 0}
    if len(nonzero) >= 2 and m["imbalance_ratio"] >= IMBALANCE_WORTH_NOTING:
        small = min(nonzero, key=lambda c: (nonzero[c], c))
        big = max(nonzero, key=lambda c: (nonzero[c], c))
        out.append(f"class `{small}` has {m['imbalance_ratio']:.1f}x fewer images than `{big}` "
                   f"({nonzero[small]} vs {nonzero[big]}): consider class_weights=balanced")
    if m["n_within_class_duplicates"]:
        n = m["n_within_class_duplicates"]
        out.append(f"{plural(n, 'extra exact copy', 'extra exact copies')} of images within "
                   f"their class: {_verb(n, 'it over-weights', 'they over-weight')} those "
                   "images; delete them if unintended")
    n = m.get("n_near_dup_within_class", 0)
    if n:
        out.append(f"{plural(n, 'group')} of near-identical pictures within one class "
                   f"over-{_verb(n, 'weights', 'weight')} those pictures: keep one "
                   "version of each if the others are unintended")
    if m["n_off_size"] and s.common_size:
        w, h = s.common_size
        out.append(f"images come in {m['n_distinct_sizes']:.0f} sizes; {m['n_off_size']:.0f} "
                   f"differ from the most common {w}x{h}: all are resized to image_size "
                   "(square, aspect ratio not kept)")
    if s.sizes:
        smallest = min(s.sizes, key=lambda wh: (min(wh), wh))
        if min(smallest) < 32:
            out.append(f"the smallest image is {smallest[0]}x{smallest[1]}: upscaling it to a "
                       "large image_size adds no detail")
    if m["n_rotated"]:
        out.append(f"{plural(m['n_rotated'], 'image')} {_verb(m['n_rotated'], 'is', 'are')} "
                   "stored rotated or flipped (EXIF "
                   "Orientation): they are turned upright when decoded, as a viewer shows them")
    not_rgb = {mode: n for mode, n in s.modes.items() if mode != "RGB"}
    if not_rgb:
        parts = ", ".join(f"{mode}: {n}" for mode, n in not_rgb.items())
        n = sum(not_rgb.values())
        out.append(f"{plural(n, 'image')} {_verb(n, 'is', 'are')} not RGB ({parts}): converted "
                   "to RGB (transparency composited on white)")
    return out or [NO_FINDINGS]


def _verb(n: float, one: str, many: str) -> str:
    """The verb that agrees with a count: 'appears' / 'appear'."""
    return one if n == 1 else many


def _example(groups: pd.DataFrame, kind: str) -> str:
    """The files of the first group of a kind, for a finding: `a` and `b`, or `a`, `b` and
    2 more."""
    files = groups[groups[kind]].iloc[0]["files"]
    if len(files) == 2:
        return f"`{files[0]}` and `{files[1]}`"
    return f"`{files[0]}`, `{files[1]}` and {len(files) - 2} more"


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

FIGURES = {"class_counts": "class_counts.png", "image_sizes": "image_sizes.png",
           "rgb_histograms": "rgb_histograms.png", "samples": "samples.png",
           "near_duplicates": "near_duplicates.png"}


def write_report(scan: DatasetScan, summary: EdaSummary, out_dir: Path,
                 run_note: str = "", label_issues: str = "") -> list[Path]:
    """report.md plus PNG figures in `out_dir`, replacing an older report in one step.

    Files are written to a sibling temp folder that is then renamed into place, so an
    interrupted run never leaves a half-written report behind.
    """
    from components import plots

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-tmp-", dir=out_dir.parent))
    try:
        if summary.counts:
            plots.plot_class_counts(summary.counts, tmp / FIGURES["class_counts"])
        if summary.sizes:
            plots.plot_image_sizes(summary.sizes, tmp / FIGURES["image_sizes"])
        means = {c: scan.hist_sum[c] / max(1, summary.class_totals.get(c, 0))
                 for c in scan.classes if c in scan.hist_sum}
        if means:
            plots.plot_rgb_histograms(means, tmp / FIGURES["rgb_histograms"])
        samples = _samples(scan)
        if samples:
            plots.plot_sample_grid(samples, tmp / FIGURES["samples"])
        near = _near_thumbnails(summary.near_duplicates)
        if near:
            plots.plot_near_duplicates(near, tmp / FIGURES["near_duplicates"])
        (tmp / "report.md").write_text(_markdown(scan, summary, run_note,
                                                 {p.name for p in tmp.iterdir()},
                                                 label_issues))
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return sorted(out_dir.iterdir())


def _samples(scan: DatasetScan) -> dict[str, list[np.ndarray]]:
    """A few readable images per class, evenly spread over its sorted files (deterministic)."""
    ok = scan.readable
    out: dict[str, list[np.ndarray]] = {}
    for cls in scan.classes[:MAX_SAMPLE_CLASSES]:
        paths = sorted(ok.loc[ok["label"] == cls, "abs"])
        if not paths:
            continue
        step = max(1, len(paths) // SAMPLES_PER_CLASS)
        thumbs = (_thumbnail(path) for path in paths[::step][:SAMPLES_PER_CLASS])
        out[cls] = [t for t in thumbs if t is not None]
    return out


def _near_thumbnails(groups: pd.DataFrame) -> list[tuple[str, list[tuple[np.ndarray, str]]]]:
    """The first groups (most urgent first): a title and (thumbnail, 'class / split') each."""
    out = []
    for g in groups.head(NEAR_DUP_FIGURE_GROUPS).itertuples():
        kind = ("across classes" if g.conflict else "across splits" if g.cross_split
                else "within a class")
        seen: set[tuple[str, str]] = set()
        first, rest = [], []  # one file per class and split first: the mix is the point
        for member in g.members:
            (rest if member[1:] in seen else first).append(member)
            seen.add(member[1:])
        thumbs = [(t, f"{label} / {split or '-'}")
                  for path, label, split in (first + rest)[:NEAR_DUP_FIGURE_FILES]
                  if (t := _thumbnail(path)) is not None]
        more = len(g.members) - NEAR_DUP_FIGURE_FILES
        title = (f"group {g.group}: {kind}, up to {g.max_distance} bits apart"
                 + (f" ({more} more not shown)" if more > 0 else ""))
        if thumbs:
            out.append((title, thumbs))
    return out


def _thumbnail(path: str) -> np.ndarray | None:
    """An upright RGB thumbnail of at most 96 px; None when the file does not load."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (128, 128))
            img.load()
            thumb = to_rgb(img)
            thumb.thumbnail((96, 96))
            return np.asarray(thumb)
    except Exception:  # noqa: BLE001 - a thumbnail that fails to load is just left out
        return None


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[object]], total: int | None = None) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows[:MAX_TABLE_ROWS]]
    total = len(rows) if total is None else total
    if total > MAX_TABLE_ROWS:
        lines.append(f"\n({total - MAX_TABLE_ROWS} more not shown)")
    return "\n".join(lines)


def _dup_table(groups: pd.DataFrame, with_split: bool) -> str:
    if groups.empty:
        return "None."
    rows = [[f"`{g.sha1[:12]}`", ", ".join(g.labels), *([", ".join(g.splits)] if with_split
                                                        else []),
             "<br>".join(f"`{f}`" for f in g.files)] for g in groups.itertuples()]
    header = ["sha1", "class", *(["splits"] if with_split else []), "files"]
    return _table(header, rows)


def _near_table(groups: pd.DataFrame) -> str:
    if groups.empty:
        return "None."
    rows = [[g.group, ", ".join(g.labels), ", ".join(g.splits), g.max_distance,
             "<br>".join(f"`{f}`" for f in g.files)] for g in groups.itertuples()]
    return _table(["group", "classes", "splits", "max distance (bits)", "files"], rows)


def _near_section(scan: DatasetScan, s: EdaSummary, files: set[str]) -> list[str]:
    out = ["## Near-duplicates (perceptual hash)", ""]
    if scan.near_dup_distance <= 0:
        return out + ["Not looked for (near_dup_distance=0).", ""]
    near = s.near_duplicates
    out += [f"Pictures whose 256-bit perceptual hashes (pHash) differ in at most "
            f"{scan.near_dup_distance} bits: resized, recompressed or lightly edited versions "
            "of one picture. A group holds at least two different files (copies of one file "
            "are the exact duplicates above); its max distance is the largest between two "
            "of its files. A group may appear in more than one table.", "",
            "### Across classes (label conflicts)", "", _near_table(near[near["conflict"]]), "",
            "### Across splits (leakage)", "", _near_table(near[near["cross_split"]]), "",
            "### Within a class", "", _near_table(near[~near["conflict"]]), ""]
    if FIGURES["near_duplicates"] in files:
        shown = min(len(near), NEAR_DUP_FIGURE_GROUPS)
        out += [f"The first {shown} of {len(near)} groups, most urgent first (class / split "
                "under each picture):" if len(near) > shown else
                "Every group (class / split under each picture):", "",
                f"![near-duplicate groups]({FIGURES['near_duplicates']})", ""]
    return out


def _markdown(scan: DatasetScan, s: EdaSummary, run_note: str, files: set[str],
              label_issues: str = "") -> str:
    m = s.metrics
    layout = ("pre-split (train/ val/ test/ folders)" if scan.presplit
              else "flat (one sub-folder per class)")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out = [f"# EDA: {scan.name}", "",
           f"Folder `{scan.root}`, layout {layout}. Generated {when} by `cnnflow eda`"
           f"{run_note}.", "", "## Findings", ""]
    out += [f"- {f}" for f in s.findings]
    common = f"{s.common_size[0]}x{s.common_size[1]}" if s.common_size else "-"
    out += ["", "## Overview", "", _table(["", ""], [
        ["images (readable)", int(m["n_images"])],
        ["classes", int(m["n_classes"])],
        ["imbalance ratio (largest / smallest class)", f"{m['imbalance_ratio']:.2f}"],
        ["unreadable files (image extension, cannot be decoded)", int(m["n_corrupt"])],
        ["other files (not images / not in a class folder)", int(m["n_other_files"])],
        ["distinct image sizes", int(m["n_distinct_sizes"])],
        [f"images not of the most common size ({common})", int(m["n_off_size"])],
        ["images stored rotated or flipped (EXIF Orientation, turned upright)",
         int(m["n_rotated"])],
        ["exact duplicates (extra copies of identical files)", int(m["n_duplicates"])],
        ["... of which within one class", int(m["n_within_class_duplicates"])],
        ["identical images under different classes (label conflicts)",
         int(m["n_label_conflicts"])],
        ["identical images in more than one split (leakage)",
         int(m["n_cross_split_duplicates"])],
        *([["near-duplicate groups (two or more distinct files within "
            f"{scan.near_dup_distance} bits of 256)", int(m["n_near_duplicate_groups"])],
           ["... under more than one class (label conflicts)",
            int(m["n_near_dup_label_conflicts"])],
           ["... in more than one split (leakage)", int(m["n_near_dup_cross_split"])],
           ["... within one class", int(m["n_near_dup_within_class"])]]
          if "n_near_duplicate_groups" in m else []),
    ]), "", "## Classes and splits", "", f"Split: {scan.split_note}.", ""]
    splits = list(s.counts)
    rows = [[f"`{c}`", *[s.counts[sp][c] for sp in splits], s.class_totals[c]]
            for c in scan.classes]
    out += [_table(["class", *splits, "total"], rows), ""]
    if FIGURES["class_counts"] in files:
        out += [f"![images per class and split]({FIGURES['class_counts']})", ""]
    out += ["## Image sizes", ""]
    size_rows = [[f"{w}x{h}", n] for (w, h), n in Counter(s.sizes).most_common()]
    out += [_table(["width x height", "images"], size_rows), ""]
    if FIGURES["image_sizes"] in files:
        out += [f"![image sizes]({FIGURES['image_sizes']})", ""]
    out += ["## Colour modes and file formats", "",
            _table(["mode", "images"], [[k, v] for k, v in s.modes.items()]), "",
            _table(["format", "images"], [[k, v] for k, v in s.formats.items()]), "",
            "## Unreadable files", ""]
    bad = scan.table[scan.table["error"] != ""]
    out += [_table(["file", "reason"], [[f"`{r.path}`", r.error] for r in bad.itertuples()])
            if len(bad) else "None.", "", "## Other files (ignored)", ""]
    out += [_table(["file", "reason"], [[f"`{p}`", r] for p, r in scan.other_files])
            if scan.other_files else "None.", ""]
    out += ["## Exact duplicates (identical bytes, sha1)", "", "### Within a class", "",
            _dup_table(s.within_class, with_split=True), "",
            "### Across classes (label conflicts)", "",
            _dup_table(s.label_conflicts, with_split=True), "",
            "### Across splits (leakage)", "", _dup_table(s.cross_split, with_split=True), ""]
    out += _near_section(scan, s, files)
    out += ["## Label issues", "", label_issues or (
        "Not looked for yet: `cnnflow train --cv 5 --find-label-issues true` ranks the "
        "images whose label disagrees with what models trained without them predict "
        "(cleanlab), for a person to review."), ""]
    if FIGURES["rgb_histograms"] in files:
        out += ["## Colour", "",
                "Mean per-class histogram of R, G and B values (each image counted equally; "
                "computed on images shrunk to about 64 px, which keeps colour distributions).",
                "", f"![mean RGB histograms]({FIGURES['rgb_histograms']})", ""]
    if FIGURES["samples"] in files:
        shown = "" if len(scan.classes) <= MAX_SAMPLE_CLASSES else (
            f" (first {MAX_SAMPLE_CLASSES} of {len(scan.classes)} classes)")
        out += ["## Samples", "", f"Up to {SAMPLES_PER_CLASS} images per class{shown}.", "",
                f"![sample images per class]({FIGURES['samples']})", ""]
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# The tracked step
# --------------------------------------------------------------------------------------------


@dataclass
class EdaOutcome:
    run_id: str
    run_name: str
    experiment_id: str
    report_dir: Path
    metrics: dict[str, float]
    findings: list[str]


def latest_label_issues(client: MlflowClient, tracking_uri: str, exp_id: str,
                        dataset: str) -> str:
    """One line on the experiment's latest label-issues run of this dataset ("" if none)."""
    found = client.search_runs(
        [exp_id], f"tags.`{STEP_TAG}` = '{label_issues.STEP}' and tags.`{DATASET_TAG}` = "
        f"'{dataset}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1)
    if not found:
        return ""
    run = found[0]
    count = int(run.data.metrics.get("n_label_issues", 0))
    url = tracking.run_url(tracking_uri, exp_id, run.info.run_id)
    return (f"The latest label-issues run, [{run.info.run_name}]({url}), flags {count} likely "
            f"mislabelled image{'s' * (count != 1)} (its `label_issues/label_issues.csv`); "
            "nothing was changed: review the list, then `cnnflow train --exclude-file` it.")


def run_eda(params: EdaParams, tracking_uri: str, *, progress: bool | None = None,
            log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
            job_run_id: str | None = None) -> EdaOutcome:
    """Scan, summarise, write `<reports_dir>/eda/<dataset>/` and log it as an `eda` run
    (`job_run_id`: the run opened for this job, filled in instead of a new one)."""
    params.validate()
    client = tracking.connect(tracking_uri)
    progress = sys.stderr.isatty() if progress is None else progress
    scan = scan_dataset(params.data, params.val_ratio, params.test_ratio, params.seed,
                        workers=params.num_workers, progress=progress,
                        near_dup_distance=params.near_dup_distance)
    summary = summarize(scan)
    out_dir = Path(params.reports_dir) / "eda" / scan.name
    tags = {DATASET_TAG: scan.name, DATA_ROOT_TAG: str(scan.root)}
    if scan.digest:
        tags[DATASET_DIGEST_TAG] = scan.digest
    run_id, exp_id, run_name = tracking.open_run(
        client, step="eda", experiment=params.experiment or scan.name, adopt=job_run_id,
        tags=tags)
    with tracking.ending_run(client, run_id):
        tracking.log_params_and_tags(client, run_id, params.logged(), {})
        tracking.log_metrics(client, run_id, summary.metrics)
        log(f"eda: writing the report and its figures to {out_dir}")
        files = write_report(scan, summary, out_dir, f" (MLflow run `{run_id}`)",
                             latest_label_issues(client, tracking_uri, exp_id, scan.name))
        client.log_artifacts(run_id, str(out_dir), artifact_path="report")
    log(f"eda: {plural(summary.metrics['n_images'], 'image')}, "
        f"{plural(len(scan.classes), 'class', 'classes')}; report {out_dir / 'report.md'} "
        f"({plural(len(files), 'file')})")
    return EdaOutcome(run_id, run_name, exp_id, out_dir, summary.metrics, summary.findings)
