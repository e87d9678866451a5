"""`cnnflow pseudo-label` and `train --extra-train` (real MLflow server, tiny images)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
from click.testing import CliRunner
from helpers import runs_of, write_image

from components.data.datasets import load_splits
from pipelines.cli import cli

FAST = ["--image-size", "16", "--batch-size", "8", "--num-workers", "0", "--weights", "none",
        "--augmentation", "none", "--patience", "0", "--epochs", "1"]
COLOURS = [(220, 30, 30), (30, 200, 40), (30, 60, 220)]



def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))



def test_threshold_splits_images_and_csvs_are_right(tracking, trained_pair, tmp_path):
    run_id = trained_pair.runs["custom_cnn"]
    unlabelled = tmp_path / "web"
    for i in range(12):
        write_image(unlabelled / ("sub" if i % 2 else "") / f"x{i:02d}.png", COLOURS[i % 3],
                    16, seed=500 + i)
    (unlabelled / "notes.txt").write_text("not an image")
    paths = sorted(str(p) for p in unlabelled.rglob("*.png"))
    model = mlflow.pyfunc.load_model(tracking.get_run(run_id).data.tags["cnnflow.model_uri"])
    confidence = dict(zip(paths, model.predict({"image": paths})["confidence"], strict=True))
    threshold = float(np.median(list(confidence.values())))
    out = tmp_path / "labelled"
    result = CliRunner().invoke(cli, ["pseudo-label", "--model", run_id, "--images",
                                      str(unlabelled), "--out", str(out), "--threshold",
                                      str(threshold), "--experiment", "pseudo"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    kept = read_csv(out / ".cnnflow" / "pseudo_labels.csv")
    below = read_csv(out / ".cnnflow" / "below_threshold.csv")
    assert {r["path"] for r in kept} == {p for p, c in confidence.items() if c >= threshold}
    assert {r["path"] for r in below} == {p for p, c in confidence.items() if c < threshold}
    assert kept and below
    for row in kept:  # a class-layout dataset folder: <predicted class>/<file>
        assert row["file"].split("/")[0] == row["predicted"]
        assert (out / row["file"]).read_bytes() == Path(row["path"]).read_bytes()
        assert float(row["confidence"]) == pytest.approx(confidence[row["path"]], abs=1e-5)
    assert sum(1 for _ in out.rglob("*.png")) == len(kept)
    (run,) = runs_of(tracking, "pseudo")
    assert run.info.status == "FINISHED" and run.data.tags["cnnflow.step"] == "pseudo_label"
    m = run.data.metrics
    assert m["n_images"] == 12 and m["n_confident"] == len(kept)
    assert m["n_below_threshold"] == len(below)
    per_class = {k.removeprefix("n_confident_"): v for k, v in m.items()
                 if k.startswith("n_confident_")}
    assert sum(per_class.values()) == len(kept)
    for cls, n in per_class.items():
        assert n == sum(r["predicted"] == cls for r in kept)


def pseudo_label(model: str, images: Path, out: Path, *args: str):
    return CliRunner().invoke(cli, ["pseudo-label", "--model", model, "--images", str(images),
                                    "--out", str(out), *args])


def unlabelled(folder: Path, n: int = 6) -> Path:
    for i in range(n):
        write_image(folder / f"x{i:02d}.png", COLOURS[i % 3], 16, seed=700 + i)
    return folder


def test_class_named_like_a_csv_gets_its_folder_and_the_output_is_a_dataset(tracking,
                                                                              tmp_path):
    """Classes named after the CSVs: no IsADirectoryError; the CSVs live in .cnnflow/."""
    data = tmp_path / "csvnames"
    names = ["below_threshold.csv", "pseudo_labels.csv", "skipped_files.csv"]
    for ci, cls in enumerate(names):
        for i in range(5):
            write_image(data / cls / f"{i}.png", COLOURS[ci], 16, seed=10 * ci + i)
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--experiment", "pl-names",
                                      "--model", "lenet5", *FAST], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (trained,) = runs_of(tracking, "pl-names", "train")
    out = tmp_path / "labelled"
    result = pseudo_label(trained.info.run_id, unlabelled(tmp_path / "web"), out,
                          "--threshold", "0.01", "--experiment", "pl-names")
    assert result.exit_code == 0, result.output
    kept = read_csv(out / ".cnnflow" / "pseudo_labels.csv")
    assert len(kept) == 6 and {r["predicted"] for r in kept} <= set(names)
    for row in kept:
        assert (out / row["file"]).is_file() and row["file"].split("/")[0] == row["predicted"]
    assert {p.name for p in out.iterdir()} == {".cnnflow", *(r["predicted"] for r in kept)}
    assert load_splits(out, 0.0, 0.0).classes == sorted({r["predicted"] for r in kept})
    (run,) = runs_of(tracking, "pl-names", "pseudo_label")
    assert run.info.status == "FINISHED"
    logged = {Path(f.path).name for f in tracking.list_artifacts(run.info.run_id, "pseudo_label")}
    assert logged == {"pseudo_labels.csv", "below_threshold.csv", "skipped_files.csv"}


def test_a_failure_half_way_leaves_nothing_and_a_rerun_works(tracking, trained_pair, tmp_path,
                                                             monkeypatch):
    """Point 7: a half-written --out used to block the re-run."""
    from components.steps import pseudo_label as step

    copied = []

    def copy_then_fail(src: Path, dst: Path) -> None:
        if copied:
            raise OSError(28, "No space left on device")
        shutil.copy2(src, dst)
        copied.append(dst)

    images = unlabelled(tmp_path / "web")
    out = tmp_path / "labelled"
    run_id = trained_pair.runs["custom_cnn"]
    with monkeypatch.context() as patched:
        patched.setitem(step.PLACERS, "copy", copy_then_fail)
        result = pseudo_label(run_id, images, out, "--threshold", "0.01",
                              "--experiment", "pl-fail")
    assert result.exit_code != 0 and copied, result.output
    assert not out.exists() and list(tmp_path.iterdir()) == [images]  # no temp folder either
    (failed,) = runs_of(tracking, "pl-fail", "pseudo_label")
    assert failed.info.status == "FAILED"

    result = pseudo_label(run_id, images, out, "--threshold", "0.01", "--experiment", "pl-fail")
    assert result.exit_code == 0, result.output
    assert len(read_csv(out / ".cnnflow" / "pseudo_labels.csv")) == 6


def test_class_names_that_are_not_folder_names_are_refused():
    from components.steps.pseudo_label import PseudoLabelError, _check_class_names

    _check_class_names(["cat", "pseudo_labels.csv", "_cnnflow"], "models:/m/1")
    for name in (".cnnflow", "..", "a/b", ""):
        with pytest.raises(PseudoLabelError) as excinfo:
            _check_class_names(["cat", name], "models:/m/1")
        assert "\n" not in str(excinfo.value) and "not a plain folder name" in str(excinfo.value)


def test_extra_train_never_leaks_val_or_test_images(tracking, image_folder, tmp_path):
    data = image_folder({"red": 8, "green": 8, "blue": 8})
    splits = load_splits(data)
    extra = tmp_path / "extra"
    val_path, val_label = splits.val[0]
    test_path, test_label = splits.test[0]
    for path, label, name in ((val_path, val_label, "copy_of_val.png"),
                              (test_path, test_label, "copy_of_test.png")):
        (extra / splits.classes[label]).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, extra / splits.classes[label] / name)
    write_image(extra / "red" / "new1.png", COLOURS[0], 16, seed=900)
    write_image(extra / "blue" / "new2.png", COLOURS[2], 16, seed=901)
    for args in ([], ["--extra-train", str(extra)]):
        result = CliRunner().invoke(cli, ["train", "--data", str(data), "--experiment",
                                          "extra", *FAST, *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    plain, with_extra = runs_of(tracking, "extra")
    # val and test (manifest and digest) are exactly the dataset's own.
    assert with_extra.data.tags["cnnflow.dataset_digest"] == \
        plain.data.tags["cnnflow.dataset_digest"]
    assert with_extra.data.metrics["n_extra_train"] == 2
    assert with_extra.data.metrics["n_extra_excluded"] == 2
    local = tracking.download_artifacts(with_extra.info.run_id, "data/extra_train.csv",
                                        str(tmp_path / "dl"))
    rows = {Path(r["path"]).name: r for r in read_csv(Path(local))}
    assert rows["new1.png"]["used"] == "True" and rows["new2.png"]["used"] == "True"
    for name in ("copy_of_val.png", "copy_of_test.png"):
        assert rows[name]["used"] == "False" and "leakage" in rows[name]["reason"]
    assert with_extra.data.params["extra_train"] == str(extra)


@pytest.mark.parametrize("args, message", [
    (["--threshold", "0"], "threshold must be in (0, 1]"),
    (["--threshold", "1.5"], "threshold must be in (0, 1]"),
    (["--images", "/no/such/folder"], "does not exist"),
    (["--mode", "move"], "unknown mode 'move'"),
])
def test_bad_pseudo_label_input_is_one_line(tracking, tmp_path, args, message):
    (tmp_path / "imgs").mkdir()
    result = CliRunner().invoke(cli, ["pseudo-label", "--model", "0123abcd", "--images",
                                      str(tmp_path / "imgs"), "--experiment", "pl-bad", *args])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert runs_of(tracking, "pl-bad") == []


@pytest.mark.parametrize("layout, message", [
    ("missing", "does not exist"),
    ("unknown-class", "classes purple are not classes of the dataset"),
])
def test_bad_extra_train_is_one_line_and_creates_no_run(tracking, image_folder, tmp_path,
                                                        layout, message):
    data = image_folder({"red": 4, "green": 4})
    extra = tmp_path / "extra"
    if layout == "unknown-class":
        write_image(extra / "purple" / "p.png", (200, 40, 200), 16, seed=1)
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--experiment",
                                      "extra-bad", "--extra-train", str(extra), *FAST])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert runs_of(tracking, "extra-bad") == []
