"""How fast `eda` reads a dataset, against the naive notebook loop, on the same files.

Both produce the same per-file outputs - sha1 of the bytes, width, height, colour mode,
format, decode errors, and a per-channel 256-bin RGB histogram - for every file of one
generated folder (benchmarks/synth_images.py: photo-like JPEGs, optionally some PNGs):

* naive: one process, each file opened with PIL and fully decoded (`to_rgb`), hashed, and
  its histogram counted at full resolution - what the seeds' EDA notebooks did;
* cnnflow: `components.steps.eda.scan_dataset` (which `cnnflow eda` runs): each file read once
  in worker processes (one per core), size/mode/format from the header, JPEGs decoded at
  reduced scale (`draft`) and other formats shrunk with `Image.reduce` before the histogram
  and the perceptual hash of near-duplicate detection (which the naive loop does not do;
  `--near-dup-distance 0` turns it off to see what it costs). It also lists the folder and
  computes the train split (included in its time); grouping near-duplicates is part of
  `summarize`, timed on its own.

Histograms therefore differ slightly (downscaled vs. full resolution); the script prints how
much (largest difference of a channel's mean value, and the largest L1 distance between two
normalised histograms). Everything else must match exactly, and the script says so.
Both read from the OS file cache (the folder was just written): this measures decoding and
hashing, not the disk. Benchmarks print; they never assert.

    .venv/bin/python benchmarks/eda_scan.py               # 5,000 JPEGs x 3 sizes, ~5 min
    .venv/bin/python benchmarks/eda_scan.py --size web    # one size preset only
    .venv/bin/python benchmarks/eda_scan.py --png-share 0.5  # half PNGs (no reduced decode)
    .venv/bin/python benchmarks/eda_scan.py --near-dup-distance 0  # without perceptual hashes
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from synth_images import SIZE_PRESETS, make_photo_folder  # noqa: E402

from components.data.images import to_rgb  # noqa: E402
from components.steps.eda import scan_dataset, summarize  # noqa: E402
from components.steps.params import EdaParams  # noqa: E402

TARGET = 5.0


def cpu_seconds() -> float:
    """CPU time of this process plus its finished child processes (the scan's workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def naive_scan(root: Path) -> dict[str, dict]:
    """The notebook way: walk, open, fully decode, hash, histogram - one file after another."""
    out = {}
    for dirpath, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                sha1 = hashlib.sha1(fh.read()).hexdigest()
            facts = {"sha1": sha1, "error": ""}
            try:
                with Image.open(path) as img:
                    img.load()
                    facts.update(width=img.width, height=img.height, mode=img.mode,
                                 format=img.format)
                    rgb = to_rgb(img)
                    counts = np.asarray(rgb.histogram(), dtype=np.float64).reshape(3, 256)
                    facts["hist"] = counts / (rgb.width * rgb.height)
            except Exception as exc:  # noqa: BLE001
                facts["error"] = f"{type(exc).__name__}: {exc}"
            out[path] = facts
    return out


def compare(root: Path, repeats: int, workers: int, near_dup_distance: int) -> dict[str, float]:
    """Time both on one folder, check the outputs agree, print one block; returns the figures."""
    naive_times, flow_times, naive_cpu, flow_cpu = [], [], [], []
    naive = scan = None
    for i in range(repeats):
        print(f"  pass {i + 1}/{repeats}: naive ...", file=sys.stderr, flush=True)
        t, c = time.perf_counter(), cpu_seconds()
        naive = naive_scan(root)
        naive_times.append(time.perf_counter() - t)
        naive_cpu.append(cpu_seconds() - c)
        print(f"  pass {i + 1}/{repeats}: cnnflow ...", file=sys.stderr, flush=True)
        t, c = time.perf_counter(), cpu_seconds()
        scan = scan_dataset(root, workers=workers, near_dup_distance=near_dup_distance)
        flow_times.append(time.perf_counter() - t)
        flow_cpu.append(cpu_seconds() - c)
    t = time.perf_counter()
    summarize(scan)
    summarize_time = time.perf_counter() - t

    table = scan.table.set_index("abs")
    mismatches, mean_diff, l1 = 0, 0.0, 0.0
    for path, facts in naive.items():
        row = table.loc[path]
        same = (row["sha1"] == facts["sha1"] and bool(row["error"]) == bool(facts["error"])
                and (facts["error"] or (row["width"], row["height"], row["mode"],
                                        row["format"]) == (facts["width"], facts["height"],
                                                           facts["mode"], facts["format"])))
        mismatches += not same
    values = np.arange(256)
    for cls, hist_sum in scan.hist_sum.items():
        files = [p for p in naive if Path(p).parent.name == cls and "hist" in naive[p]]
        full = sum(naive[p]["hist"] for p in files) / len(files)
        small = hist_sum / len(files)
        mean_diff = max(mean_diff, float(np.abs((full * values).sum(1)
                                                - (small * values).sum(1)).max()))
        l1 = max(l1, float(np.abs(full - small).sum(1).max()))

    n = len(naive)
    print(f"{'pass':>6} {'naive s':>9} {'cnnflow s':>10} {'naive img/s':>12} "
          f"{'cnnflow img/s':>14} {'ratio':>7}")
    for i, (a, b) in enumerate(zip(naive_times, flow_times, strict=True), 1):
        print(f"{i:>6} {a:>9.2f} {b:>10.2f} {n / a:>12.0f} {n / b:>14.0f} {a / b:>7.2f}")
    best_naive, best_flow = min(naive_times), min(flow_times)
    ratio = best_naive / best_flow
    print(f"{'best':>6} {best_naive:>9.2f} {best_flow:>10.2f} {n / best_naive:>12.0f} "
          f"{n / best_flow:>14.0f} {ratio:>7.2f}")
    cpu_ratio = min(naive_cpu) / min(flow_cpu)
    print(f"CPU seconds per pass (this process + worker processes): naive {min(naive_cpu):.2f}, "
          f"cnnflow {min(flow_cpu):.2f}: {cpu_ratio:.2f}x less work per image")
    print(f"same sha1/size/mode/format/errors for all {n} files: "
          f"{'yes' if mismatches == 0 else f'NO ({mismatches} differ)'}")
    print(f"per-class mean histograms, reduced vs. full decode: largest channel-mean "
          f"difference {mean_diff:.2f} (of 255), largest L1 distance {l1:.3f} (of 2)")
    print(f"summarize afterwards (counts, duplicates, near-duplicate groups, findings): "
          f"{summarize_time:.2f} s")
    return {"n": n, "naive": n / best_naive, "flow": n / best_flow, "ratio": ratio,
            "cpu_ratio": cpu_ratio}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--size", choices=[*SIZE_PRESETS, "all"], default="all",
                        help="image size preset (see benchmarks/synth_images.py)")
    parser.add_argument("--png-share", type=float, default=0.0,
                        help="share of PNG files (the rest JPEG)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes of each (best kept)")
    parser.add_argument("--workers", type=int, default=-1, help="cnnflow worker processes")
    parser.add_argument("--near-dup-distance", type=int, default=EdaParams.near_dup_distance,
                        help="eda's near_dup_distance (0 = no perceptual hashes)")
    args = parser.parse_args(argv)

    sizes = list(SIZE_PRESETS) if args.size == "all" else [args.size]
    print(f"{args.images} images per folder, {args.png_share:.0%} PNG (rest JPEG q90); "
          f"CPU cores: {os.cpu_count()}; cnnflow workers: {args.workers} (-1 = one per core), "
          f"near_dup_distance {args.near_dup_distance}; "
          f"1-min load average before start: {os.getloadavg()[0]:.2f}")
    results = {}
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="cnnflow-eda-bench-") as tmp:
            root = Path(tmp) / "photos"
            started = time.perf_counter()
            make_photo_folder(root, args.images, png_share=args.png_share, size=size)
            n_bytes = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
            dims = ", ".join(sorted({f"{w}x{h}" for w, h in SIZE_PRESETS[size]}))
            print(f"\n== {size}: {dims}; {n_bytes / 2**20:.0f} MiB (generated in "
                  f"{time.perf_counter() - started:.0f} s)")
            results[size] = compare(root, args.repeats, args.workers, args.near_dup_distance)
    print()
    print(f"{'size':>8} {'naive img/s':>12} {'cnnflow img/s':>14} {'speed-up':>9} "
          f"{'CPU-work ratio':>15}")
    for size, r in results.items():
        verdict = "OK" if r["ratio"] >= TARGET else "below target"
        print(f"{size:>8} {r['naive']:>12.0f} {r['flow']:>14.0f} {r['ratio']:>8.2f}x "
              f"{r['cpu_ratio']:>14.2f}x  (wall-time target >= {TARGET:g}x: {verdict})")
    print(f"1-min load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores "
          "(well above 0 means other processes took CPU: the wall-time speed-up from worker "
          "processes shrinks; the CPU-work ratio does not)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
