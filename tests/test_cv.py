"""`train --cv K`: stratified K-fold cross-validation as nested runs (real MLflow server)."""

from __future__ import annotations

import csv
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import runs_of

from components.data.datasets import load_splits
from components.steps.crossval import make_folds
from pipelines.cli import cli

FAST = ["--image-size", "16", "--batch-size", "8", "--num-workers", "0", "--weights", "none",
        "--augmentation", "none", "--patience", "0", "--epochs", "1"]




def test_folds_are_stratified_disjoint_and_reproducible(image_folder):
    splits = load_splits(image_folder({"a": 13, "b": 9, "c": 7}), seed=3)
    folds = make_folds(splits, 3, seed=3)
    pool = splits.train + splits.val
    flat = [item for fold in folds for item in fold]
    assert sorted(flat) == sorted(pool)  # a partition of train+val ...
    assert not {p for p, _ in flat} & {p for p, _ in splits.test}  # ... test untouched
    totals = Counter(label for _, label in pool)
    for fold in folds:
        per_class = Counter(label for _, label in fold)
        for label, total in totals.items():  # each class spread evenly over the folds
            assert abs(per_class[label] - total / 3) < 1, (label, per_class)
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    assert make_folds(splits, 3, seed=3) == folds
    assert make_folds(splits, 3, seed=4) != folds


def test_cv_logs_nested_fold_runs_and_their_mean_and_std(tracking, image_folder, tmp_path):
    data = image_folder({"red": 8, "green": 8, "blue": 8})
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--experiment", "cv",
                                      "--cv", "3", "--cv-ensemble", "true", *FAST],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    runs = runs_of(tracking, "cv")
    (parent,) = [r for r in runs if r.data.tags.get("cnnflow.step") == "cv"]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "cv-v1"
    folds = sorted((r for r in runs if r.data.tags.get("cnnflow.fold")),
                   key=lambda r: int(r.data.tags["cnnflow.fold"]))
    assert [r.data.tags["cnnflow.fold"] for r in folds] == ["0", "1", "2"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in folds)
    assert all(r.info.status == "FINISHED" for r in folds)
    for source, name in (("best_val_acc", "val_acc"), ("best_val_loss", "val_loss")):
        values = np.array([r.data.metrics[source] for r in folds])
        assert parent.data.metrics[f"cv_{name}_mean"] == pytest.approx(values.mean())
        assert parent.data.metrics[f"cv_{name}_std"] == pytest.approx(values.std())
    # 24 images: 6 in test, each fold validates on a third of the other 18.
    assert sorted(int(r.data.tags["cnnflow.fold_n_val"]) for r in folds) == [6, 6, 6]
    files = {f.path for f in tracking.list_artifacts(parent.info.run_id, "cv")}
    assert {"cv/folds.csv", "cv/folds.png", "cv/fold_assignment.csv"} <= files
    local = tracking.download_artifacts(parent.info.run_id, "cv/fold_assignment.csv",
                                        str(tmp_path))
    with open(local, newline="") as fh:
        assigned = list(csv.DictReader(fh))
    assert len(assigned) == 18 and {row["fold"] for row in assigned} == {"0", "1", "2"}
    # Each train+val image predicted once, by the fold model that never saw it.
    assert "cv/oof_probabilities.csv" in files
    local = tracking.download_artifacts(parent.info.run_id, "cv/oof_probabilities.csv",
                                        str(tmp_path))
    with open(local, newline="") as fh:
        oof = list(csv.DictReader(fh))
    assert ({(r["path"], r["label"], r["fold"]) for r in oof}
            == {(r["path"], r["label"], r["fold"]) for r in assigned}) and len(oof) == 18
    for row in oof:
        assert sum(float(row[f"prob_{c}"]) for c in ("blue", "green", "red")) == \
            pytest.approx(1.0, abs=1e-6)
    # --cv-ensemble: the fold models as one ensemble run, nested under the parent.
    ensemble = tracking.get_run(parent.data.tags["cnnflow.ensemble_run_id"])
    assert ensemble.data.tags["cnnflow.step"] == "ensemble"
    assert ensemble.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert set(ensemble.data.params["members"].split(",")) == {r.info.run_id for r in folds}


@pytest.mark.parametrize("args, message", [
    (["--cv", "1"], "cv must be 0 (off) or >= 2 folds"),
    (["--cv", "-2"], "cv must be 0 (off) or >= 2 folds"),
    (["--cv", "9"], "cv=9 needs at least 9 train+val images per class"),
    (["--cv-ensemble", "true"], "cv_ensemble needs --cv"),
])
def test_bad_cv_input_is_one_line_and_creates_no_run(tracking, image_folder, args, message):
    data = image_folder({"a": 6, "b": 6})
    result = CliRunner().invoke(cli, ["train", "--data", str(data), "--experiment", "cv-bad",
                                      *FAST, *args])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert runs_of(tracking, "cv-bad") == []

