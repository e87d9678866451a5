"""`cnnflow label-issues` and `train --cv K --find-label-issues`: out-of-fold predictions
ranked with cleanlab, on a separable folder with known flipped labels (real MLflow server)."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from helpers import _PALETTE, runs_of, write_image

from pipelines.cli import cli

CLASSES = ("red", "green", "blue")
PER_CLASS = 40
FLIPPED_PER_CLASS = 2  # 6 of 120 images (5 %) sit in the next class's folder
LEFT_OUT = "red/red039.png"  # --exclude-file during the CV: no out-of-fold row for it
FAST = ["--image-size", "16", "--batch-size", "8", "--num-workers", "0", "--weights", "none",
        "--augmentation", "none", "--patience", "0", "--epochs", "2"]


def noisy_folder(root: Path) -> list[str]:
    """Three colour classes with 5 % of the images filed under the wrong class; returns the
    flipped images' dataset-relative paths."""
    flipped, seed = [], 0
    for ci, name in enumerate(CLASSES):
        for i in range(PER_CLASS):
            seed += 1
            folder = CLASSES[(ci + 1) % 3] if i < FLIPPED_PER_CLASS else name
            write_image(root / folder / f"{name}{i:03d}.png", _PALETTE[ci], 16, seed)
            if folder != name:
                flipped.append(f"{folder}/{name}{i:03d}.png")
    return flipped


def colour(path: str) -> str:
    """The class an image really is: its file name starts with it (red007.png)."""
    return re.match(r"[a-z]+", path.split("/")[-1]).group()


def read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def noisy_cv(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory):
    """One `train --cv 3 --find-label-issues true` on the noisy folder (test split empty, so
    every image has an out-of-fold prediction), run in a temp folder (reports/ lands there)."""
    from mlflow import MlflowClient

    work = tmp_path_factory.mktemp("noisy-cv")
    data = work / "noisy"
    flipped = noisy_folder(data)
    (work / "exclude.txt").write_text(f"# reviewed\n{LEFT_OUT}\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        mp.chdir(work)
        result = CliRunner().invoke(cli, [
            "train", "--data", str(data), "--experiment", "noisy", "--cv", "3",
            "--test-ratio", "0", "--find-label-issues", "true",
            "--exclude-file", "exclude.txt", *FAST], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    client = MlflowClient(mlflow_server)
    (parent,) = runs_of(client, "noisy", step="cv")
    return SimpleNamespace(work=work, data=data, flipped=flipped, output=result.output,
                           parent=parent, uri=mlflow_server)


def test_out_of_fold_probabilities_cover_train_and_val_once(noisy_cv, tracking, tmp_path):
    parent = noisy_cv.parent
    oof = read(Path(tracking.download_artifacts(parent.info.run_id,
                                                "cv/oof_probabilities.csv", str(tmp_path))))
    assigned = read(Path(tracking.download_artifacts(parent.info.run_id,
                                                     "cv/fold_assignment.csv", str(tmp_path))))
    images = sorted(p.relative_to(noisy_cv.data).as_posix() for p in noisy_cv.data.rglob("*.png"))
    assert sorted(row["path"] for row in oof) == [p for p in images if p != LEFT_OUT]
    assert {r["path"]: r["fold"] for r in oof} == {r["path"]: r["fold"] for r in assigned}
    for row in oof:
        assert row["label"] == row["path"].split("/")[0]
        assert sum(float(row[f"prob_{c}"]) for c in CLASSES) == pytest.approx(1.0, abs=1e-6)
    # --exclude-file on the parent too
    assert parent.data.metrics["n_excluded"] == 1
    assert parent.data.tags["cnnflow.exclude_file"] == str(noisy_cv.work / "exclude.txt")


def test_label_issues_ranks_the_flipped_images_first(noisy_cv, tracking, tmp_path):
    parent_id = noisy_cv.parent.info.run_id
    result = CliRunner().invoke(cli, ["label-issues", "--cv-run", parent_id,
                                      "--reports-dir", str(tmp_path / "reports")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "nothing was relabelled or removed" in result.output
    folder = tmp_path / "reports" / "label-issues" / "noisy" / "cv-v1"
    assert str(folder / "label_issues.csv") in result.output
    issues = read(folder / "label_issues.csv")
    n_images = PER_CLASS * len(CLASSES) - 1
    top = [row["path"] for row in issues[:math.ceil(0.1 * n_images)]]
    found = [p for p in noisy_cv.flipped if p in top]
    assert len(found) >= 0.7 * len(noisy_cv.flipped), (found, issues)
    for row in issues:
        if row["path"] in noisy_cv.flipped:  # given: the folder; suggested: the colour
            assert row["given_label"] == row["path"].split("/")[0]
            assert row["suggested_label"] == colour(row["path"])
    scores = [float(row["quality_score"]) for row in read(folder / "label_quality.csv")]
    assert len(scores) == n_images and scores == sorted(scores)
    assert (folder / "label_issues.png").stat().st_size > 0
    # The run, and what it left on the parent.
    run = runs_of(tracking, "noisy", step="label-issues")[-1]
    assert run.info.run_name == "label-issues-v2"  # v1: the in-line one
    assert run.data.tags["cnnflow.cv_parent"] == parent_id
    assert run.data.metrics["n_label_issues"] == len(issues)
    logged = {f.path for f in tracking.list_artifacts(run.info.run_id, "label_issues")}
    assert {"label_issues/label_issues.csv", "label_issues/label_quality.csv",
            "label_issues/label_issues.png"} <= logged
    parent = tracking.get_run(parent_id)
    assert parent.data.tags["cnnflow.label_issues_run"] == run.info.run_id
    assert parent.data.metrics["n_label_issues"] == len(issues)
    for path in noisy_cv.flipped:  # nothing was moved, relabelled or deleted
        assert (noisy_cv.data / path).is_file()
    assert len(list(noisy_cv.data.rglob("*.png"))) == PER_CLASS * len(CLASSES)


def test_find_label_issues_runs_the_same_step_after_the_cv(noisy_cv, tracking):
    (first, *_) = runs_of(tracking, "noisy", step="label-issues")
    assert first.info.run_name == "label-issues-v1"
    assert first.data.tags["cnnflow.cv_parent"] == noisy_cv.parent.info.run_id
    local = noisy_cv.work / "reports" / "label-issues" / "noisy" / "cv-v1" / "label_issues.csv"
    assert len(read(local)) == first.data.metrics["n_label_issues"] >= 1
    assert "likely label issues" in noisy_cv.output and "nothing was relabelled" in noisy_cv.output


def test_bad_label_issues_input_is_one_line_and_creates_no_run(noisy_cv, tracking):
    fold = next(r for r in runs_of(tracking, "noisy") if r.data.tags.get("cnnflow.fold"))
    old_exp = tracking.create_experiment("old-cv")
    old_cv = tracking.create_run(old_exp, tags={"cnnflow.step": "cv"}).info.run_id
    before = len(runs_of(tracking, "noisy", step="label-issues"))
    for run_id, message in ((fold.info.run_id, "not a cross-validation parent: make one with "
                                               "`cnnflow train --cv 5`"),
                            (old_cv, "has no cv/oof_probabilities.csv"),
                            ("0123456789abcdef", "does not exist on this tracking server")):
        result = CliRunner().invoke(cli, ["label-issues", "--cv-run", run_id])
        assert result.exit_code == 1, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and message in errors[0], result.output
    assert len(runs_of(tracking, "noisy", step="label-issues")) == before
    assert runs_of(tracking, "old-cv", step="label-issues") == []


def test_the_mirror_carries_the_count_and_link_to_the_list(noisy_cv, tracking, mongo_server):
    """The dashboard's model detail reads the CV parent's label-issue count from the mirror."""
    from pymongo import MongoClient

    from components.mirror.sync import TRAININGS

    db_uri = f"{mongo_server}/labels_{noisy_cv.parent.info.run_id[:8]}"
    result = CliRunner(env={"MLFLOW_TRACKING_URI": noisy_cv.uri, "MONGO_URI": db_uri}).invoke(
        cli, ["sync", "--experiments", "noisy"])
    assert result.exit_code == 0, result.output
    parent = tracking.get_run(noisy_cv.parent.info.run_id)
    client = MongoClient(db_uri, serverSelectionTimeoutMS=5000)
    try:
        db = client[db_uri.rsplit("/", 1)[1]]
        doc = db[TRAININGS].find_one({"_id": parent.info.run_id})
        steps = {d.get("step") for d in db[TRAININGS].find({}, {"step": 1})}
    finally:
        client.drop_database(db_uri.rsplit("/", 1)[1])
        client.close()
    assert doc["label_issues"] == parent.data.metrics["n_label_issues"]
    assert f"/runs/{parent.data.tags['cnnflow.label_issues_run']}?" in doc["label_issues_url"]
    assert "label-issues" not in steps  # its own run is not a training


def test_the_report_lists_the_latest_label_issues(noisy_cv, tracking, tmp_path, monkeypatch):
    monkeypatch.chdir(noisy_cv.work)
    result = CliRunner().invoke(cli, ["train", "--data", str(noisy_cv.data), "--experiment",
                                      "noisy", "--test-ratio", "0", *FAST],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["report", "--experiment", "noisy", "--pdf", "false",
                                      "--reports-dir", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    latest = runs_of(tracking, "noisy", step="label-issues")[-1]
    count = int(latest.data.metrics["n_label_issues"])
    text = (tmp_path / "noisy" / "report.md").read_text()
    section = text.split("### Label issues", 1)[1].split("\n## ", 1)[0]
    assert f"[{latest.info.run_name}](" in section and f"flags {count} likely" in section
    listed = read(Path(tracking.download_artifacts(
        latest.info.run_id, "label_issues/label_issues.csv", str(tmp_path / "dl"))))
    assert listed and all(row["path"] in section for row in listed[:10])
    assert (tmp_path / "noisy" / "figures" / "label-issues.png").is_file()


def test_eda_links_the_latest_label_issues_of_its_dataset(noisy_cv, tracking, tmp_path):
    result = CliRunner().invoke(cli, ["eda", "--data", str(noisy_cv.data), "--experiment",
                                      "noisy", "--reports-dir", str(tmp_path)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    latest = runs_of(tracking, "noisy", step="label-issues")[-1]
    count = int(latest.data.metrics["n_label_issues"])
    text = (tmp_path / "eda" / "noisy" / "report.md").read_text()
    section = text.split("## Label issues", 1)[1].split("\n## ", 1)[0]
    assert f"[{latest.info.run_name}](" in section and latest.info.run_id in section
    assert f"flags {count} likely mislabelled" in section
