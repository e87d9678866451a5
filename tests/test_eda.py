"""`cnnflow eda` against a real MLflow server, on real messy image folders."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import MESSY_EXPECTED, runs_of, write_image

from components.data.datasets import SPLITS, load_splits, relative_posix
from components.data.images import read_file, read_files
from components.steps import eda
from pipelines.cli import cli

FIGURES = {"class_counts.png", "image_sizes.png", "rgb_histograms.png", "samples.png"}




def run_eda(*args: str):
    return CliRunner().invoke(cli, ["eda", *args], catch_exceptions=False)


def test_eda_numbers_report_and_run_are_exact(tracking, messy_folder, tmp_path):
    reports = tmp_path / "reports"
    result = run_eda("--data", str(messy_folder), "--experiment", "eda-messy",
                     "--reports-dir", str(reports), "--num-workers", "0")
    assert result.exit_code == 0, result.output
    (run,) = runs_of(tracking, "eda-messy")
    assert run.info.status == "FINISHED" and run.info.run_name == "eda-v1"
    assert run.data.tags["cnnflow.step"] == "eda" and run.data.tags["cnnflow.dataset"] == "messy"
    for name, expected in MESSY_EXPECTED.items():
        assert run.data.metrics[name] == pytest.approx(expected), name
    assert run.data.metrics["n_near_duplicate_groups"] == 0  # exact copies are not "near"

    out = reports / "eda" / "messy"
    assert {p.name for p in out.iterdir()} == FIGURES | {"report.md"}
    logged = {Path(f.path).name for f in tracking.list_artifacts(run.info.run_id, "report")}
    assert logged == FIGURES | {"report.md"}
    report = (out / "report.md").read_text()
    for figure in FIGURES:
        assert f"]({figure})" in report
    # The problems are named where a reader looks for them.
    assert "`train/blue/truncated.png`" in report and "`train/blue/notes.txt`" in report
    assert "`train/red/img003.png`" in report and "`train/green/conflict.png`" in report
    assert "`test/red/leak.png`" in report and "`val/green/leak.png`" in report
    assert "class `blue` has 1.5x fewer images than `green` (12 vs 18)" in report
    assert "class_weights=balanced" in result.output
    assert "| `red` | 10 | 3 | 4 | 17 |" in report  # per-class counts per split
    assert "| 24x24 | 1 |" in report and "| RGBA | 1 |" in report and "| P | 1 |" in report


def test_flat_folder_leakage_is_counted_on_the_split_train_makes(tmp_path):
    root = tmp_path / "flat"
    for i in range(8):
        for cls, rgb in (("cat", (200, 40, 40)), ("dog", (40, 40, 200))):
            write_image(root / cls / f"{i}.png", rgb, seed=i + (100 if cls == "dog" else 0))
    for i in range(4):  # exact copies under new names: the seeded split scatters them
        shutil.copy(root / "cat" / f"{i}.png", root / "cat" / f"copy{i}.png")
    scan = eda.scan_dataset(root, val_ratio=0.25, test_ratio=0.25, seed=3, workers=0)
    summary = eda.summarize(scan)
    splits = load_splits(root, 0.25, 0.25, seed=3)
    split_of = {p: s for s in SPLITS for p, _ in splits.split(s)}
    leaked = sum(split_of[str(root / "cat" / f"{i}.png")] !=
                 split_of[str(root / "cat" / f"copy{i}.png")] for i in range(4))
    assert leaked > 0  # this seed scatters at least one pair (the assertion below is exact)
    assert summary.metrics["n_cross_split_duplicates"] == leaked
    assert summary.metrics["n_duplicates"] == 4
    assert summary.counts["train"] == splits.counts()["train"]
    assert scan.digest == splits.digest()


def test_images_stored_rotated_are_counted_and_measured_upright(tmp_path):
    """A phone photo stored sideways (EXIF Orientation 6) is a finding, sized as shown."""
    from PIL import Image

    root = tmp_path / "phones"
    for i in range(4):
        for cls, rgb in (("cat", (200, 40, 40)), ("dog", (40, 40, 200))):
            write_image(root / cls / f"{i}.png", rgb, seed=i + (100 if cls == "dog" else 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (24, 12), (200, 40, 40)).save(root / "cat" / "phone.jpg", exif=exif)
    scan = eda.scan_dataset(root, val_ratio=0.25, test_ratio=0.25, seed=3, workers=0)
    summary = eda.summarize(scan)
    assert summary.metrics["n_rotated"] == 1
    row = scan.table.set_index("path").loc["cat/phone.jpg"]
    assert (row["width"], row["height"], row["orientation"]) == (12, 24, 6)
    assert any("1 image is stored rotated" in f for f in summary.findings)


@pytest.mark.parametrize("path, root", [
    ("/d/cat/1.png", "/d"), ("/d/cat/1.png", "/d/"), ("d/cat/1.png", "d"), ("./cat/1.png", "."),
    ("/d/x/../cat/1.png", "/d"), ("/dd/cat/1.png", "/d"), ("/d//cat/1.png", "/d"),
])
def test_relative_paths_are_exactly_os_relpaths(path, root):
    """The fast path eda and the split take for every file never changes a path."""
    assert relative_posix(path, root) == Path(os.path.relpath(path, root)).as_posix()


def test_parallel_scan_reads_the_same_as_in_process(messy_folder):
    paths = sorted(str(p) for p in messy_folder.rglob("*.png"))
    serial = list(read_files(paths, histogram=True, phash=True, workers=0))
    parallel = list(read_files(paths, histogram=True, phash=True, workers=2))
    for a, b in zip(serial, parallel, strict=True):
        assert (a.path, a.sha1, a.width, a.height, a.mode, a.format, a.error, a.phash) == \
            (b.path, b.sha1, b.width, b.height, b.mode, b.format, b.error, b.phash)
        assert len(a.phash) == (0 if a.error else 64)
        assert (a.hist is None and b.hist is None) or np.array_equal(a.hist, b.hist)


def test_histograms_come_from_a_reduced_decode_that_keeps_colours(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = np.clip(rng.normal(120, 40, (480, 640, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "big.jpg", quality=90)
    facts = read_file(tmp_path / "big.jpg", histogram=True)
    assert (facts.width, facts.height, facts.mode, facts.format) == (640, 480, "RGB", "JPEG")
    full = np.asarray(Image.open(tmp_path / "big.jpg").convert("RGB"))
    full_mean = full.reshape(-1, 3).mean(0)
    small_mean = (facts.hist * np.arange(256)).sum(1)
    assert np.abs(small_mean - full_mean).max() < 2.0  # mean per channel within 2 of 255
    assert facts.hist.sum(1) == pytest.approx([1, 1, 1])


def _no_images(tmp: Path) -> Path:
    (tmp / "empty" / "a").mkdir(parents=True)
    (tmp / "empty" / "a" / "x.txt").write_text("x")
    return tmp / "empty"


def _no_class_folders(tmp: Path) -> Path:
    (tmp / "bare").mkdir()
    return tmp / "bare"


@pytest.mark.parametrize("make, args, message", [
    (lambda tmp: tmp / "nope", [], "does not exist"),
    (_no_images, [], "no image files"),
    (_no_class_folders, [], "no class folders"),
    (_no_images, ["--val-ratio", "0.6", "--test-ratio", "0.5"], "val_ratio + test_ratio"),
    (_no_images, ["--num-workers", "-3"], "num_workers=-3"),
    (_no_images, ["--near-dup-distance", "33"], "near_dup_distance=33 is above 32"),
])
def test_bad_input_is_one_line_and_creates_no_run(tracking, tmp_path, make, args, message):
    result = CliRunner().invoke(cli, ["eda", "--data", str(make(tmp_path)), "--experiment",
                                      "eda-bad", "--reports-dir", str(tmp_path / "r"), *args])
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert runs_of(tracking, "eda-bad") == []
    assert not (tmp_path / "r").exists()


def test_a_failing_report_ends_the_run_failed_and_keeps_the_old_report(
        tracking, image_folder, tmp_path, monkeypatch):
    data = image_folder({"a": 4, "b": 4})
    reports = tmp_path / "reports"
    assert run_eda("--data", str(data), "--experiment", "eda-fail", "--reports-dir",
                   str(reports)).exit_code == 0
    before = (reports / "eda" / data.name / "report.md").read_text()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("components.plots.plot_sample_grid", broken)
    result = CliRunner().invoke(cli, ["eda", "--data", str(data), "--experiment", "eda-fail",
                                      "--reports-dir", str(reports)])
    assert result.exit_code != 0
    last = runs_of(tracking, "eda-fail")[-1]
    assert last.info.status == "FAILED" and "disk full" in last.data.tags["cnnflow.error"]
    assert (reports / "eda" / data.name / "report.md").read_text() == before
    assert [p.name for p in (reports / "eda").iterdir()] == [data.name]  # no temp leftovers
