"""`cnnflow label-issues`: likely mislabelled images, ranked from a CV parent's out-of-fold
predictions with cleanlab (confident learning). Nothing is relabelled or deleted.

`train --cv K` predicts every train+val image once, with the fold model that never saw it,
and logs those probabilities on the parent (`cv/oof_probabilities.csv`). Here cleanlab's
`find_label_issues` picks the images whose given label disagrees with those predictions more
than the estimated noise explains, ranked by `get_label_quality_scores` (low = suspicious).
The run `label-issues-vN` (in the parent's experiment, tagged with it) logs
`label_issues/label_issues.csv` (path, given label, suggested label, quality score; most
suspicious first), `label_quality.csv` (every image, same columns plus `is_issue`) and a
thumbnail grid; the same folder is written to `<reports_dir>/label-issues/<experiment>/<cv
run>/`. The parent gets the metric `n_label_issues` and the tag LABEL_ISSUES_RUN_TAG. A
reviewed list goes back into training with `cnnflow train --exclude-file label_issues.csv`.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException

from components import tracking
from components.data.datasets import resolve_data
from components.errors import CnnflowError
from components.files import building, read_csv, slug, temp_prefix, write_csv
from components.names import (
    CLASS_NAMES_TAG,
    CV_PARENT_TAG,
    DATA_ROOT_TAG,
    DATASET_DIGEST_TAG,
    DATASET_TAG,
    FOLD_TAG,
    LABEL_ISSUES_RUN_TAG,
    STEP_TAG,
)
from components.steps.params import LabelIssuesParams

STEP = "label-issues"
OOF_ARTIFACT = "cv/oof_probabilities.csv"  # written by components.steps.crossval
PROB_PREFIX = "prob_"
ISSUE_COLUMNS = ["path", "given_label", "suggested_label", "quality_score", "fold"]
ARTIFACT_DIR = "label_issues"  # the run's artifact folder holding FILES
FILES = {"issues": "label_issues.csv", "all": "label_quality.csv", "grid": "label_issues.png"}


class LabelIssuesError(CnnflowError, ValueError):
    """Bad label-issues input (not a CV parent, no out-of-fold predictions); one line."""


@dataclass
class OutOfFold:
    """One row per train+val image: its path (relative to the dataset root), given label
    index, fold and out-of-fold probabilities (N x C, columns in `classes` order)."""

    paths: list[str]
    labels: np.ndarray
    folds: list[str]
    probs: np.ndarray
    classes: list[str]


@dataclass
class LabelIssuesOutcome:
    run_id: str
    run_name: str
    experiment_id: str
    cv_run: str
    n_images: int
    issues: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Path = Path()
    url: str = ""

    @property
    def csv(self) -> Path:
        return self.out_dir / FILES["issues"]


def check_cv_run(client, cv_run: str) -> Any:
    """The CV parent run `cv_run`, or a one-line error saying what it is instead."""
    try:
        run = client.get_run(cv_run)
    except MlflowException:
        raise LabelIssuesError(f"run '{cv_run}' does not exist on this tracking server: pass "
                               "the run id `cnnflow train --cv 5` printed (its run is named "
                               "cv-vN)") from None
    tags = run.data.tags
    if tags.get(STEP_TAG) != "cv":
        what = f"the {tags.get(STEP_TAG) or 'non-cnnflow'} run {run.info.run_name}"
        if FOLD_TAG in tags and tags.get(CV_PARENT_TAG):
            what += (f", fold {tags[FOLD_TAG]} of cross-validation run "
                     f"{tags[CV_PARENT_TAG]} (pass that one)")
        raise LabelIssuesError(f"run '{cv_run}' is {what}, not a cross-validation parent: "
                               "make one with `cnnflow train --cv 5` and pass its run id")
    names = {f.path for f in client.list_artifacts(cv_run, OOF_ARTIFACT.rsplit("/", 1)[0])}
    if OOF_ARTIFACT not in names:
        raise LabelIssuesError(f"cross-validation run {run.info.run_name} ({cv_run}) has no "
                               f"{OOF_ARTIFACT} (it was made before cnnflow kept out-of-fold "
                               "predictions, or it stopped early): run `cnnflow train --cv K` "
                               "again")
    return run


def read_out_of_fold(path: Path) -> OutOfFold:
    """`cv/oof_probabilities.csv` back into arrays; a one-line error when it is malformed."""
    rows = read_csv(path)
    columns = list(rows[0]) if rows else []
    classes = [c[len(PROB_PREFIX):] for c in columns if c.startswith(PROB_PREFIX)]
    if not rows or len(classes) < 2 or not {"path", "label", "fold"} <= set(columns):
        raise LabelIssuesError(f"{path} is not an out-of-fold table (path, label, fold, "
                               "prob_<class>...): run `cnnflow train --cv K` again")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({r["label"] for r in rows} - set(index))
    if unknown:
        raise LabelIssuesError(f"{path}: labels {unknown} have no prob_ column: run "
                               "`cnnflow train --cv K` again")
    probs = np.array([[float(r[PROB_PREFIX + c]) for c in classes] for r in rows])
    probs = probs / probs.sum(axis=1, keepdims=True)  # float rounding in the CSV
    return OutOfFold([r["path"] for r in rows], np.array([index[r["label"]] for r in rows]),
                     [r["fold"] for r in rows], probs, classes)


def rank_issues(oof: OutOfFold, rank_by: str) -> tuple[np.ndarray, np.ndarray]:
    """(indices of likely label issues, most suspicious first; every image's label quality
    score, low = suspicious), by cleanlab's confident learning."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # advice about tiny classes; the ranking still holds
        scores = get_label_quality_scores(oof.labels, oof.probs, method=rank_by)
        ranked = find_label_issues(oof.labels, oof.probs, return_indices_ranked_by=rank_by,
                                   n_jobs=1)
    return np.asarray(ranked, dtype=np.int64), np.asarray(scores, dtype=np.float64)


def issue_rows(oof: OutOfFold, ranked: np.ndarray, scores: np.ndarray) -> tuple[
        list[dict[str, Any]], list[dict[str, Any]]]:
    """(label_issues.csv rows in rank order, label_quality.csv rows: every image by score)."""
    flagged = set(ranked.tolist())

    def row(i: int) -> dict[str, Any]:
        return {"path": oof.paths[i], "given_label": oof.classes[oof.labels[i]],
                "suggested_label": oof.classes[int(oof.probs[i].argmax())],
                "quality_score": round(float(scores[i]), 6), "fold": oof.folds[i],
                "is_issue": str(i in flagged).lower()}

    every = sorted(range(len(oof.paths)), key=lambda i: (scores[i], oof.paths[i]))
    return [row(int(i)) for i in ranked], [row(i) for i in every]


def run_label_issues(params: LabelIssuesParams, tracking_uri: str, *,
                     log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
                     job_run_id: str | None = None) -> LabelIssuesOutcome:
    """Rank a CV parent's out-of-fold predictions; log a `label-issues-vN` run, write the
    local folder, and mark the parent. `job_run_id`: the run opened for this job."""
    params.validate()
    client = tracking.connect(tracking_uri)
    parent = check_cv_run(client, params.cv_run)  # every check before a run exists
    with tempfile.TemporaryDirectory(prefix=temp_prefix("label-issues")) as tmp:
        oof = read_out_of_fold(Path(client.download_artifacts(params.cv_run, OOF_ARTIFACT,
                                                              tmp)))
    exp_id = parent.info.experiment_id
    experiment = client.get_experiment(exp_id).name
    root = _data_root(parent)
    tags = {CV_PARENT_TAG: params.cv_run, CLASS_NAMES_TAG: ",".join(oof.classes),
            **{k: parent.data.tags[k] for k in (DATASET_TAG, DATASET_DIGEST_TAG)
               if k in parent.data.tags}}
    run_id, exp_id, run_name = tracking.open_run(client, step=STEP, exp_id=exp_id,
                                                 adopt=job_run_id, tags=tags)
    out_dir = (Path(params.reports_dir) / "label-issues" / slug(experiment)
               / slug(parent.info.run_name))
    with tracking.ending_run(client, run_id):
        present = client.get_run(run_id).data.params  # `mlflow run` logged its -P values
        tracking.log_params_and_tags(client, run_id, {
            k: v for k, v in {"cv_run": params.cv_run, "rank_by": params.rank_by}.items()
            if k not in present}, {})
        ranked, scores = rank_issues(oof, params.rank_by)
        issues, every = issue_rows(oof, ranked, scores)
        _write_folder(out_dir, issues, every, root, params.top)
        client.log_artifacts(run_id, str(out_dir), artifact_path=ARTIFACT_DIR)
        metrics = {"n_images": len(oof.paths), "n_label_issues": len(issues),
                   "label_issue_fraction": len(issues) / max(1, len(oof.paths))}
        tracking.log_metrics(client, run_id, metrics)
        tracking.log_metrics(client, params.cv_run, {"n_label_issues": len(issues)})
        client.set_tag(params.cv_run, LABEL_ISSUES_RUN_TAG, run_id)
    log(f"label-issues: {len(issues)} likely label issues among {len(oof.paths)} "
        f"out-of-fold images of {parent.info.run_name}")
    return LabelIssuesOutcome(run_id, run_name, exp_id, params.cv_run, len(oof.paths), issues,
                              out_dir, tracking.run_url(tracking_uri, exp_id, run_id))


def summary(outcome: LabelIssuesOutcome, shown: int = 5) -> list[str]:
    """What the command line prints: the count, the top few, where the list is, and that
    nothing was changed."""
    lines = [f"{outcome.run_name}  run {outcome.run_id}  {len(outcome.issues)} likely label "
             f"issues among {outcome.n_images} images (cv run {outcome.cv_run})  {outcome.url}"]
    lines += [f"  {row['path']}: {row['given_label']} -> {row['suggested_label']} "
              f"(quality {row['quality_score']:.3f})" for row in outcome.issues[:shown]]
    if len(outcome.issues) > shown:
        lines.append(f"  ... {len(outcome.issues) - shown} more")
    lines.append(f"list: {outcome.csv}; nothing was relabelled or removed. Review it, keep the "
                 "rows you agree with, then: cnnflow train --exclude-file <that file>")
    return lines


def _data_root(parent: Any) -> Path | None:
    """Where the parent's images are on this machine (for the thumbnails), if anywhere."""
    root = parent.data.tags.get(DATA_ROOT_TAG)
    if root:
        return Path(root)
    try:
        return resolve_data(parent.data.params.get("data", ""))[1]
    except CnnflowError:
        return None


def _write_folder(out_dir: Path, issues: list[dict[str, Any]], every: list[dict[str, Any]],
                  root: Path | None, top: int) -> None:
    """The CSVs and the grid, built beside `out_dir` and swapped into place when complete."""
    from components import plots

    with building(out_dir) as tmp:
        write_csv(tmp / FILES["issues"], issues, ISSUE_COLUMNS)
        write_csv(tmp / FILES["all"], every, [*ISSUE_COLUMNS, "is_issue"])
        plots.plot_label_issues(
            [(root / r["path"] if root else Path(r["path"]), r["given_label"],
              r["suggested_label"], r["quality_score"]) for r in issues[:top]],
            tmp / FILES["grid"])
