"""One training run end to end: data -> model -> engine -> MLflow run.

Its parameters are `TrainParams` (components/steps/params.py): the click command, the
MLproject entry point and resumed runs all go through it.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

from components import tracking
from components.data.datasets import DatasetSplits, class_weights, load_splits, make_loaders
from components.data.extra_train import extra_train_samples
from components.errors import CnnflowError
from components.files import remove_stale_temp, temp_prefix, write_csv
from components.names import (
    CLASS_NAMES_TAG,
    DATASET_DIGEST_TAG,
    DATASET_TAG,
    DEVICE_TAG,
    EXCLUDE_FILE_TAG,
    FOLD_TAG,
    LR_CHOSEN_PARAM,
    MODEL_URI_TAG,
    PREPROCESS_RUN_TAG,
    STEP_TAG,
    TRIAL_TAG,
    WEIGHTS_SOURCE_TAG,
)
from components.nn import distributed
from components.nn.engine import (
    Callback,
    ConsoleCallback,
    FitResult,
    fit,
    load_checkpoint,
    seed_everything,
)
from components.nn.engine import resolve_device as _resolve_device
from components.nn.models import create_model, model_normalization
from components.settings import mask_uri, state_dir
from components.steps.params import TrainParams
from components.steps.preprocess import load_prepared
from components.tracking.callback import MLflowCallback, epoch_span
from components.tracking.heartbeat import (
    Heartbeat,
    leads_other_node,
    start_system_metrics,
    stop_system_metrics,
    this_node,
)
from components.tracking.models import log_pyfunc_model


class TrainingError(CnnflowError, RuntimeError):
    """A run-level problem (bad resume target, bad parameter) with a one-line message."""


class LoggingTimeout(TrainingError):
    """MLflow did not take the backlog in time: the run is left as it is, to be resumed."""


# MLflow's own HTTP retries, while training: one quick retry, then the callback's policy
# (retry every few seconds, bounded by log_timeout) takes over. 30 s still lets a large
# checkpoint upload get its answer. Only where the user has not set them.
SHORT_HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


@dataclass
class TrainOutcome:
    run_id: str
    run_name: str
    experiment_id: str
    result: FitResult
    model_uri: str
    url: str


def train(params: TrainParams, tracking_uri: str, *, progress: bool | None = None,
          log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
          train_sample: Callable[[DatasetSplits], DatasetSplits] | None = None,
          parent_run_id: str | None = None, callbacks: Sequence[Callback] = (),
          run_tags: dict[str, str] | None = None, job_run_id: str | None = None
          ) -> TrainOutcome:
    """Train one model as one MLflow run (or continue `params.resume`); returns where it went.

    Hooks for bagging (components.steps.ensemble): `train_sample` swaps the train list the loaders
    read (a bootstrap sample) while the logged manifest and digest stay the dataset's own, so
    members stay comparable; `parent_run_id` nests the run under the ensemble's run.
    `job_run_id`: the run opened for this job (by `mlflow run`, or the `main` pipeline's
    child), filled in instead of a new run; a resumed run reopens `params.resume` instead.
    Hooks for tuning / cross-validation: `callbacks` run after MLflow's each epoch (a pruning
    callback raises there; an exception with `run_status` / `run_tags` attributes ends the
    run with that status and those tags instead of FAILED); `run_tags` go on the new run.
    Under torchrun (WORLD_SIZE > 1) every rank trains its shard with DistributedDataParallel;
    only rank 0 touches MLflow, and the other ranks return an outcome with empty run ids.
    """
    remove_stale_temp()  # what killed runs left behind
    with _short_http_retries():
        return _train_checked(params, tracking_uri, progress, log, train_sample, parent_run_id,
                              callbacks, run_tags, job_run_id)


@contextlib.contextmanager
def _short_http_retries() -> Iterator[None]:
    """Set `SHORT_HTTP_RETRIES` the user has not set, for the duration of the training."""
    added = {k: v for k, v in SHORT_HTTP_RETRIES.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _train_checked(params: TrainParams, tracking_uri: str, progress: bool | None,
                   log: Callable[[str], None],
                   train_sample: Callable[[DatasetSplits], DatasetSplits] | None,
                   parent_run_id: str | None, callbacks: Sequence[Callback],
                   run_tags: dict[str, str] | None, job_run_id: str | None) -> TrainOutcome:
    """`train` in one process or as one rank of a process group."""
    world_size = distributed.env_world_size()
    if world_size > 1:  # under torchrun: cnnflow's launch, the user's or a scheduler's
        local, nodes = distributed.env_local_world_size(), distributed.env_nodes()
        if params.nproc not in (1, local, world_size):
            raise TrainingError(f"nproc={params.nproc} but torchrun started {local} "
                                "processes per node: pass the same number to both")
        if params.nnodes not in (1, nodes):
            raise TrainingError(f"nnodes={params.nnodes} but torchrun joined {nodes} nodes: "
                                "pass the same number to both")
        if train_sample or parent_run_id or callbacks:
            raise TrainingError("bagging, tuning and cross-validation train one process per "
                                "run: drop torchrun / --nproc")
        params = dataclasses.replace(params, nproc=local, nnodes=nodes)
    client = tracking.connect(tracking_uri)
    progress = sys.stderr.isatty() if progress is None else progress
    resumed = _load_resume(client, params) if params.resume else None
    if resumed is not None:
        params = resumed
    params.validate()
    if world_size == 1:
        if params.nproc > 1:  # the processes come from the launcher, not from this call
            raise TrainingError(f"nproc={params.nproc} needs worker processes: use "
                                "`cnnflow train --nproc N` or torchrun")
        return _train(client, params, tracking_uri, progress, log, train_sample,
                      parent_run_id, callbacks, run_tags, resumed, job_run_id)
    device = _resolve_device(distributed.device_for_rank(params.device))
    distributed.init_process_group(device.type)
    try:
        # Machines started separately must agree (the paths may be each one's own copy).
        distributed.same_options({k: v for k, v in params.logged().items()
                                  if k not in (*TrainParams.RUNTIME, "data", "extra_train",
                                               "exclude_file")})
        quiet = log if distributed.is_main() else lambda s: None
        outcome = _train(client, params, tracking_uri, progress, quiet, train_sample,
                         parent_run_id, callbacks, run_tags, resumed, job_run_id)
    except BaseException:
        distributed.destroy_process_group()
        raise
    distributed.destroy_process_group(wait_for_all=True)
    return outcome


def _train(client, params: TrainParams, tracking_uri: str, progress: bool,
           log: Callable[[str], None],
           train_sample: Callable[[DatasetSplits], DatasetSplits] | None,
           parent_run_id: str | None, callbacks: Sequence[Callback],
           run_tags: dict[str, str] | None, resumed: TrainParams | None,
           job_run_id: str | None) -> TrainOutcome:
    """`train` after validation, in one process or as one rank of a process group."""

    # Everything that can fail on bad input happens before a run exists.
    ready = prepare(client, params, log, train_sample, job_run_id)
    params, splits, excluded, extra = ready.params, ready.splits, ready.excluded, ready.extra
    source, device, weights, model = ready.source, ready.device, ready.weights, ready.model
    weights_source, loaders = ready.weights_source, ready.loaders
    config = params.engine_config()
    # On a process group `device` is this rank's GPU (cuda:LOCAL_RANK), not plain `cuda`.
    run_on = {"device": str(device), "seed": params.seed, "progress": progress,
              "num_classes": len(splits.classes)}

    multi_node = this_node() is not None  # every rank agrees: other machines get the run id
    if not distributed.is_main():  # a worker rank: train its shard, leave MLflow to rank 0
        # ... but for the system metrics of its machine, when it is that machine's first.
        shared_id = str(distributed.broadcast_object(None)) if multi_node else ""
        monitor = (start_system_metrics(shared_id, tracking_uri, params.system_metrics,
                                        node=this_node())
                   if leads_other_node() and params.system_metrics > 0 else None)
        try:
            with tempfile.TemporaryDirectory(prefix=temp_prefix("train")) as tmp:
                result = fit(model, loaders["train"], loaders["val"], config, Path(tmp),
                             **run_on, class_weights=weights)
        finally:
            stop_system_metrics(monitor)
        return TrainOutcome("", "", "", result, "", "")
    if resumed is not None:
        _check_same_data(client, params.resume, splits.digest())
    if params.resume:  # the run keeps its name and version
        run_id, exp_id, run_name = tracking.reopen_run(client, params.resume)
    else:
        run_id, exp_id, run_name = tracking.open_run(
            client, step="train", model=params.model,
            experiment=params.experiment or splits.name, adopt=job_run_id,
            parent=parent_run_id)
    if multi_node:
        distributed.broadcast_object(run_id)
    if run_tags:
        tracking.log_params_and_tags(client, run_id, {}, run_tags)
    callback = MLflowCallback(client, run_id, log=log)
    # Signs of life until the run ends: progress inside epochs, and system metrics.
    try:
        beat = Heartbeat(client, run_id, params.heartbeat, system_metrics=params.system_metrics,
                         world_size=distributed.world()[1], resumed=resumed is not None,
                         node=this_node(), log=log)
    except BaseException as exc:  # the run exists: never leave it RUNNING
        tracking.finish_run(client, run_id, "FAILED", f"{type(exc).__name__}: {exc}")
        raise
    with tempfile.TemporaryDirectory(prefix=temp_prefix("train")) as tmp:
        work = Path(tmp)
        try:
            resume_from = _resume_point(client, run_id, work / "ckpt") if resumed else None
            if resume_from is not None:
                done = tracking.backfill_epochs(client, run_id, load_checkpoint(resume_from))
                log(f"resuming {run_name} ({run_id}) after epoch {done}")
            else:
                if resumed is not None:
                    log(f"restarting {run_name} ({run_id}) from epoch 1: it stopped before "
                        "its first checkpoint")
                _log_run_start(client, run_id, params, splits, device.type, weights_source,
                               run_name, work, source,
                               client.get_run(run_id).data.params if resumed else None)
                if extra is not None:
                    _log_extra_train(client, run_id, extra, work)
                if params.exclude_file:
                    log_excluded(client, run_id, params.exclude_file, excluded, work)
            if params.lr_value() is None:  # --lr auto: the range test picks it, once a run
                config = params.engine_config(_auto_lr(client, run_id, ready, config, work,
                                                       log))
            result = fit(model, loaders["train"], loaders["val"], config,
                         work / "ckpt", **run_on, class_weights=weights,
                         callbacks=[ConsoleCallback(f"{run_name} "), callback, beat,
                                    *callbacks],
                         resume_from=resume_from)
            missing = callback.flush(params.log_timeout)
            if missing:
                kept = _keep_checkpoints(run_id, work / "ckpt")
                raise LoggingTimeout(
                    f"MLflow at {mask_uri(tracking_uri)} did not answer for "
                    f"{params.log_timeout:g} s after the last epoch: epochs "
                    f"{epoch_span(missing)} of {run_name} are not logged (training finished; "
                    f"checkpoint kept in {kept}); when the server is back, complete the run "
                    f"with: cnnflow train --resume {run_id}")
            _forget_kept_checkpoints(run_id)
            tracking.log_metrics(client, run_id, result.final_metrics())
            tracking.log_history(client, run_id, result.history, work / "history")
            model_uri = log_pyfunc_model(run_id, result.best_path,
                                         model_config(params, splits.classes),
                                         splits.train[0][0] if splits.train else None)
            client.set_tag(run_id, MODEL_URI_TAG, model_uri)
            beat.stop()
            tracking.finish_run(client, run_id, "FINISHED")
        except LoggingTimeout:
            beat.stop(timeout=1.0)
            raise  # no server to tell; the run stays unfinished, and --resume completes it
        except KeyboardInterrupt:
            _abort(client, callback, beat, run_id, "KILLED", "interrupted by the user (Ctrl-C)",
                   params.log_timeout)
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure must end the run
            for key, value in getattr(exc, "run_tags", {}).items():
                client.set_tag(run_id, key, value)
            _abort(client, callback, beat, run_id, getattr(exc, "run_status", "FAILED"),
                   f"{type(exc).__name__}: {exc}", params.log_timeout)
            tracking.announce_end(client, tracking_uri, run_id, exc=exc)  # standalone runs
            raise
    tracking.announce_end(client, tracking_uri, run_id)  # alerts: standalone runs only
    return TrainOutcome(run_id, run_name, exp_id, result, model_uri,
                        tracking.run_url(tracking_uri, exp_id, run_id))


@dataclass
class Prepared:
    """What a training run is built from before it exists: the data, the seeded model and its
    loaders (`cnnflow lr-find` sweeps the same ones)."""

    params: TrainParams  # data/val_ratio/test_ratio of a preprocess run filled in
    splits: DatasetSplits  # the split, less --exclude-file's images
    excluded: list[dict[str, str]]
    extra: Any  # what --extra-train added (None without it)
    source: str  # "folder", or where a preprocess run's data came from
    device: Any  # torch.device: this rank's
    weights: Any  # class weights for the loss (None: unweighted)
    model: Any
    weights_source: str
    loaders: dict[str, Any]


def prepare(client, params: TrainParams, log: Callable[[str], None],
            train_sample: Callable[[DatasetSplits], DatasetSplits] | None = None,
            job_run_id: str | None = None) -> Prepared:
    """The data, the model (seeded, so its initial weights follow `seed`) and the loaders of
    a run, with every check that can fail on bad input; nothing is written to MLflow."""
    params, read, arrays, source = _load_data(client, params, log, job_run_id)
    splits, excluded = exclude_listed(read, params.exclude_file)
    if not splits.val:
        raise TrainingError(f"dataset '{splits.name}' has no validation images: use "
                            "--val-ratio > 0 or add a val/ folder")
    device = _resolve_device(distributed.device_for_rank(params.device))
    weights = class_weights(splits, params.class_weights)
    seed_everything(params.seed)  # before the model exists: its initial weights are seeded too
    model, weights_source = create_model(
        params.model, len(splits.classes), weights=params.weights, freeze=params.freeze,
        dropout=params.dropout, head_hidden=params.head_hidden or None,
        image_size=params.image_size)
    mean, std = model_normalization(params.model)
    fit_splits = train_sample(splits) if train_sample else splits
    extra = None
    if params.extra_train:  # train split only; val/test look-alikes are dropped (no leakage)
        extra = extra_train_samples(params.extra_train, splits)
        fit_splits = dataclasses.replace(fit_splits, train=fit_splits.train + extra.samples)
    loaders = make_loaders(fit_splits, params.image_size, params.batch_size,
                           augmentation=params.augmentation, mean=mean, std=std,
                           num_workers=params.num_workers, seed=params.seed,
                           device_type=device.type, arrays=arrays,
                           array_rows=_cache_rows(read, fit_splits) if arrays else None,
                           rank=distributed.world()[0], world_size=distributed.world()[1],
                           sampling=params.sampling)
    log(f"data: {splits.name} ({len(splits.classes)} classes; train {len(splits.train)}, "
        f"val {len(splits.val)}, test {len(splits.test)}; skipped {len(splits.skipped)} files; "
        f"read from the {source})")
    return Prepared(params, splits, excluded, extra, source, device, weights, model,
                    weights_source, loaders)


LR_FIND_DIR = "lr_find"  # the artifact folder of a range test: lr_find.csv, lr_find.png


def log_range_test(client, run_id: str, test: Any, folder: Path) -> None:
    """A range test (components.nn.lr_find.RangeTest) as run artifacts: the curve
    (`lr_find.csv`: step, lr, loss, smoothed_loss) and the figure (`lr_find.png`, the
    suggestion marked), under LR_FIND_DIR."""
    from components import plots

    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / "lr_find.csv", test.rows(), ["step", "lr", "loss", "smoothed_loss"])
    plots.plot_lr_find(test.lrs, test.losses, test.smoothed, test.suggestion,
                       folder / "lr_find.png")
    client.log_artifacts(run_id, str(folder), artifact_path=LR_FIND_DIR)


def _auto_lr(client, run_id: str, ready: Prepared, config: Any, work: Path,
             log: Callable[[str], None]) -> float:
    """`--lr auto`: the LR this run chose when it started (a resume reuses it, never sweeps
    again), else the range test's suggestion on the run's own model and train loader with
    `cnnflow lr-find`'s default sweep, logged into the run: param `lr_chosen` and the curve
    and figure under lr_find/. The model is left at its initial weights."""
    from components.nn.lr_find import range_test
    from components.steps.params import LrFindParams

    chosen = client.get_run(run_id).data.params.get(LR_CHOSEN_PARAM)
    if chosen:
        log(f"lr auto: {float(chosen):.3g} (chosen by the range test when the run started)")
        return float(chosen)
    log(f"lr auto: range test over {LrFindParams.num_batches} batches, lr "
        f"{LrFindParams.start_lr:g} to {LrFindParams.end_lr:g}")
    test = range_test(ready.model, ready.loaders["train"], config, device=ready.device,
                      start_lr=LrFindParams.start_lr, end_lr=LrFindParams.end_lr,
                      num_batches=LrFindParams.num_batches, class_weights=ready.weights)
    log_range_test(client, run_id, test, work / LR_FIND_DIR)
    tracking.log_params_and_tags(client, run_id, {LR_CHOSEN_PARAM: repr(test.suggestion)}, {})
    log(f"lr auto: {test.suggestion:.3g} (steepest descent of the smoothed loss"
        f"{'; the loss diverged, sweep stopped early' if test.diverged else ''})")
    return test.suggestion


def _abort(client, callback: MLflowCallback, beat: Heartbeat, run_id: str, status: str,
           reason: str, timeout: float) -> None:
    """Record why the run ended; never let a second failure hide the first."""
    try:
        callback.flush(timeout)
    except Exception:  # noqa: BLE001
        pass
    beat.stop()
    try:
        tracking.finish_run(client, run_id, status, reason)
    except Exception:  # noqa: BLE001
        pass


def _load_data(client, params: TrainParams, log: Callable[[str], None],
               job_run_id: str | None = None
               ) -> tuple[TrainParams, DatasetSplits, dict[str, Path] | None, str]:
    """The split to train on: scanned from the folder, or read from a preprocess run.

    With `preprocess_run`, that run's manifest (and tensor cache, when it was built at this
    image_size) replaces the scan, and its data/val_ratio/test_ratio become this run's params,
    so the logged params say what the model really saw.
    """
    if not params.preprocess_run:  # under torchrun: rank 0 scans, the others get its split
        splits = distributed.shared_splits(
            lambda: load_splits(params.data, val_ratio=params.val_ratio,
                                test_ratio=params.test_ratio, seed=params.seed), params.data)
        return params, splits, None, "folder"
    asked = None if params.data == TrainParams.data else params.data  # default: no opinion
    prepared = load_prepared(client, params.preprocess_run, params.image_size, log, data=asked)
    params = dataclasses.replace(
        params, data=prepared.params.get("data", params.data),
        val_ratio=float(prepared.params.get("val_ratio", params.val_ratio)),
        test_ratio=float(prepared.params.get("test_ratio", params.test_ratio)))
    if job_run_id and not params.resume:  # `mlflow run` logged its -P values already
        logged = client.get_run(job_run_id).data.params
        clash = {k: getattr(params, k) for k in ("data", "val_ratio", "test_ratio")
                 if k in logged and logged[k] != str(getattr(params, k))}
        if clash:
            raise TrainingError(
                f"preprocess run {params.preprocess_run} split with "
                f"{', '.join(f'{k}={v}' for k, v in clash.items())}, but mlflow run logged other "
                f"values: add {' '.join(f'-P {k}={v}' for k, v in clash.items())}")
    return params, prepared.splits, prepared.arrays, prepared.source


def _cache_rows(cached: DatasetSplits, fit_splits: DatasetSplits) -> dict[str, list[int]]:
    """Cache rows of a resampled train list (bagging) or of train/val lists with images left
    out (--exclude-file), so cached pixels follow the samples. `cached`: the split as the
    cache holds it."""
    rows = {}
    for split in ("train", "val"):
        if fit_splits.split(split) is cached.split(split):
            continue
        row = {path: i for i, (path, _) in enumerate(cached.split(split))}
        rows[split] = [row[path] for path, _ in fit_splits.split(split)]
    return rows


def model_config(params: TrainParams, classes: list[str]) -> dict[str, Any]:
    """What a logged model (and a fold's in-memory model in components.steps.crossval) is
    rebuilt from: the architecture, the classes and the preprocessing."""
    mean, std = model_normalization(params.model)
    return {"model": params.model, "class_names": list(classes),
            "image_size": params.image_size, "mean": list(mean), "std": list(std),
            "dropout": params.dropout, "head_hidden": params.head_hidden or None}


# --------------------------------------------------------------------------------------------
# --exclude-file: images left out of train and val (e.g. after reviewing label_issues.csv)
# --------------------------------------------------------------------------------------------


def read_exclude_file(path: str | Path) -> list[str]:
    """The dataset-relative paths an exclude file lists: a CSV with a `path` column (what
    `cnnflow label-issues` writes) or plain text, one path per line (blank lines and lines
    starting with # ignored). Each path is normalised to '/' separators without a leading ./"""
    file = Path(path).expanduser()
    try:
        lines = file.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:  # a missing file: TrainParams.validate says so
        raise TrainingError(f"cannot read exclude file {path} ({type(exc).__name__}): pass a "
                            "CSV with a `path` column or a text file, one path per line") from None
    header = [h.strip() for h in next(csv.reader(lines[:1]), [])]
    if "path" in header:
        column = header.index("path")
        raw = [row[column] if len(row) > column else "" for row in csv.reader(lines[1:])]
    elif file.suffix.lower() == ".csv":
        raise TrainingError(f"exclude file {path} has no `path` column: name the column of "
                            "dataset-relative paths `path`, as label_issues.csv does")
    else:
        raw = [line for line in lines if not line.lstrip().startswith("#")]
    paths = []
    for item in raw:
        item = item.strip().replace("\\", "/")
        while item.startswith("./"):
            item = item[2:]
        if item:
            paths.append(item)
    return list(dict.fromkeys(paths))


def exclude_listed(splits: DatasetSplits, exclude_file: str
                   ) -> tuple[DatasetSplits, list[dict[str, str]]]:
    """`splits` without the train/val images `exclude_file` lists, and those images (path,
    label, split). Every listed path must be an image of the dataset (or one the scan skipped
    as unreadable), and none may be in the test split: the test split is the yardstick every
    model is judged on, so it stays as it is. The split is cut before the images are left
    out, so the test split is the same with or without the file."""
    if not exclude_file:
        return splits, []
    listed = read_exclude_file(exclude_file)
    where = {splits.relpath(path): (split, label)
             for split in ("train", "val", "test") for path, label in splits.split(split)}
    skipped = {splits.relpath(path) for path, _ in splits.skipped}
    unknown = [p for p in listed if p not in where and p not in skipped]
    if unknown:
        raise TrainingError(
            f"{len(unknown)} of the {len(listed)} paths in {exclude_file} are not images of "
            f"dataset '{splits.name}' (first: '{unknown[0]}'): list paths relative to "
            f"{splits.root}, as label_issues.csv does")
    in_test = [p for p in listed if where.get(p, ("",))[0] == "test"]
    if in_test:
        raise TrainingError(
            f"{len(in_test)} of the {len(listed)} paths in {exclude_file} are in the test split "
            f"(first: '{in_test[0]}'): the test split is the yardstick every model is judged on "
            "and is never edited by a run; remove them from the file (or fix the images in the "
            "folder itself)")
    drop = {p for p in listed if p in where}
    rows = [{"path": p, "label": splits.classes[where[p][1]], "split": where[p][0]}
            for p in sorted(drop)]
    kept = dataclasses.replace(
        splits, **{split: [item for item in splits.split(split)
                           if splits.relpath(item[0]) not in drop]
                   for split in ("train", "val")})
    return kept, rows


def log_excluded(client, run_id: str, exclude_file: str, rows: list[dict[str, str]],
                 work: Path) -> None:
    """Tag the run with the file, count the images left out and log them as
    data/excluded.csv."""
    client.set_tag(run_id, EXCLUDE_FILE_TAG, str(Path(exclude_file).expanduser().resolve()))
    tracking.log_metrics(client, run_id, {"n_excluded": len(rows)})
    folder = work / "excluded"
    folder.mkdir(exist_ok=True)
    write_csv(folder / "excluded.csv", rows, ["path", "label", "split"])
    client.log_artifact(run_id, str(folder / "excluded.csv"), artifact_path="data")


def _load_resume(client, params: TrainParams) -> TrainParams:
    try:
        run = client.get_run(params.resume)
    except MlflowException:
        raise TrainingError(f"cannot resume: run '{params.resume}' does not exist on this "
                            "tracking server") from None
    if run.data.tags.get(STEP_TAG) != "train":
        raise TrainingError(f"cannot resume: run '{params.resume}' is not a cnnflow train run")
    if run.info.status == "FINISHED":
        raise TrainingError(f"cannot resume: run '{params.resume}' already finished; "
                            "start a new run instead")
    if FOLD_TAG in run.data.tags or TRIAL_TAG in run.data.tags:
        raise TrainingError(f"cannot resume: run '{params.resume}' is a cross-validation fold "
                            "or a tuning trial; run train --cv / tune again instead")
    if "model" not in run.data.params:
        raise TrainingError(f"cannot resume: run '{params.resume}' stopped before its "
                            "parameters were logged; start a new run instead")
    runtime = {k: getattr(params, k) for k in TrainParams.RUNTIME}
    return TrainParams.from_logged(run.data.params, **runtime)


def _resume_point(client, run_id: str, ckpt_dir: Path) -> Path | None:
    """The run's newest last.pt, into `ckpt_dir` (with its best.pt): the server's, or the one
    this machine kept when the server was gone at the end (then it is uploaded now). None when
    the run stopped before its first checkpoint: it restarts from epoch 1."""
    try:
        last, _ = tracking.download_checkpoint(client, run_id, ckpt_dir)
    except FileNotFoundError:
        last = None
    kept = _kept_dir(run_id) / "last.pt"
    if kept.exists() and (last is None or
                          load_checkpoint(kept)["epoch"] > load_checkpoint(last)["epoch"]):
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(kept.parent.glob("*.pt")):
            shutil.copy2(path, ckpt_dir / path.name)
            client.log_artifact(run_id, str(ckpt_dir / path.name), artifact_path="checkpoints")
        last = ckpt_dir / "last.pt"
    return last


def _kept_dir(run_id: str) -> Path:
    return state_dir() / "checkpoints" / run_id


def _keep_checkpoints(run_id: str, ckpt_dir: Path) -> Path:
    """Copy last.pt / best.pt where `--resume` looks first, out of the temp folder that goes."""
    kept = _kept_dir(run_id)
    kept.mkdir(parents=True, exist_ok=True)
    for path in ckpt_dir.glob("*.pt"):
        shutil.copy2(path, kept / path.name)
    return kept


def _forget_kept_checkpoints(run_id: str) -> None:
    """The server has every epoch now: a kept copy is no longer needed."""
    shutil.rmtree(_kept_dir(run_id), ignore_errors=True)


def _check_same_data(client, run_id: str, digest: str) -> None:
    logged = client.get_run(run_id).data.tags.get(DATASET_DIGEST_TAG)
    if logged and logged != digest:
        raise TrainingError(f"cannot resume run {run_id}: its dataset changed since it started "
                            "(different split manifest); start a new run instead")


def _log_run_start(client, run_id: str, params: TrainParams, splits, device: str,
                   weights_source: str, run_name: str, work: Path, source: str,
                   logged_before: dict[str, str] | None = None) -> None:
    """Params, tags, the split manifest (artifact and dataset input) and the skipped files.

    `logged_before`: the params of a run restarted from epoch 1, which stay as they are
    (MLflow refuses a changed value, and a resume may change the runtime ones).
    """
    logged = params.logged()
    logged.update(num_classes=len(splits.classes), n_train=len(splits.train),
                  n_val=len(splits.val), n_test=len(splits.test))
    logged = {k: v for k, v in logged.items() if k not in (logged_before or {})}
    digest = splits.digest()
    tags = {DATASET_TAG: splits.name, DATASET_DIGEST_TAG: digest,
            WEIGHTS_SOURCE_TAG: weights_source, DEVICE_TAG: device,
            CLASS_NAMES_TAG: ",".join(splits.classes), MLFLOW_RUN_NAME: run_name,
            "cnnflow.data_source": source}
    input_tags = {PREPROCESS_RUN_TAG: params.preprocess_run} if params.preprocess_run else {}
    tracking.log_params_and_tags(client, run_id, logged, {**tags, **input_tags})
    tracking.log_dataset_input(client, run_id, splits.manifest_rows(), name=splits.name,
                               digest=digest, source=str(splits.root), tags=input_tags)
    tracking.log_metrics(client, run_id, {"skipped_files": len(splits.skipped)})
    data_dir = work / "data"
    data_dir.mkdir()
    write_csv(data_dir / "manifest.csv", splits.manifest_rows())
    write_csv(data_dir / "skipped_files.csv",
              [{"path": p, "reason": r} for p, r in splits.skipped], ["path", "reason"])
    client.log_artifacts(run_id, str(data_dir), artifact_path="data")


def _log_extra_train(client, run_id: str, extra: Any, work: Path) -> None:
    """What --extra-train added (and excluded, with the reason) as data/extra_train.csv."""
    tracking.log_metrics(client, run_id, {"n_extra_train": len(extra.samples),
                                          "n_extra_excluded": extra.n_excluded})
    (work / "extra").mkdir()
    write_csv(work / "extra" / "extra_train.csv", extra.rows,
              ["path", "label", "sha1", "used", "reason"])
    client.log_artifact(run_id, str(work / "extra" / "extra_train.csv"), artifact_path="data")

