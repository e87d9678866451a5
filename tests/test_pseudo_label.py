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
    kept = read_csv(out / "pseudo_labels.csv")
    below = read_csv(out / "below_threshold.csv")
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
