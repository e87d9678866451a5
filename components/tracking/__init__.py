"""The run level of MLflow: opening and naming runs (`open_run`, the one place a step's run
is created or adopted), params, tags and metrics, ending runs, checkpoints and history.

Beside it in this package: `callback` (the engine's callbacks as MLflow calls, off the
training loop's thread), `models` (logging the pyfunc models), `registry` (versions, aliases,
promotion) and `comparison` (the experiment's models side by side).
"""

from __future__ import annotations

import contextlib
import io
import json
import time
import urllib.parse
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from components import notify
from components.errors import one_line
from components.names import ERROR_TAG, MODEL_TAG, STEP_TAG, VERSION_TAG
from components.settings import mask_text, mask_uri

MAX_PARAM_LENGTH = 6000
# What the MLflow UI reads to show an experiment as model training rather than GenAI.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"


def connect(tracking_uri: str) -> MlflowClient:
    """Point both the fluent API and a client at one server."""
    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri)


def has_ui(tracking_uri: str) -> bool:
    """A tracking server (http/https) has a UI; a local folder or database has none."""
    return tracking_uri.startswith(("http://", "https://"))


def experiment_url(tracking_uri: str, exp_id: str) -> str:
    """The experiment's runs table in the MLflow UI (password masked), or the masked URI of a
    store that has no UI (a local folder or database)."""
    return _ui_page(tracking_uri, f"experiments/{exp_id}/runs")


def run_url(tracking_uri: str, exp_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI, or the masked URI of a store that has no UI."""
    return _ui_page(tracking_uri, f"experiments/{exp_id}/runs/{run_id}")


def version_url(tracking_uri: str, name: str, version: str | int) -> str:
    """A registered model version's page in the MLflow UI, or the masked URI of a store
    that has no UI."""
    return _ui_page(tracking_uri, f"models/{urllib.parse.quote(name)}/versions/{version}")


def artifact_url(tracking_uri: str, run_id: str, path: str) -> str | None:
    """A run artifact as the server hands it to a browser (the route the MLflow UI's own
    image previews use), or None for a store without a server: a dashboard shows it without
    calling MLflow itself."""
    if not has_ui(tracking_uri):
        return None
    query = urllib.parse.urlencode({"path": path, "run_uuid": run_id})
    return f"{mask_uri(tracking_uri).rstrip('/')}/get-artifact?{query}"


def _ui_page(tracking_uri: str, route: str) -> str:
    """A page of the UI in its model-training mode (`workflowType`): MLflow 3 opens on its
    GenAI pages otherwise, which hide runs, metrics and the model registry."""
    if not has_ui(tracking_uri):
        return mask_uri(tracking_uri)
    return f"{mask_uri(tracking_uri).rstrip('/')}/#/{route}?workflowType=machine_learning"


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id, created on first use (restoring it if it was deleted); a
    process creating it at the same moment wins, and its experiment is used."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
        except MlflowException as exc:
            exp = client.get_experiment_by_name(name)
            if exp is None or exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    mark_training(client, exp.experiment_id, exp.tags)
    return exp.experiment_id


def mark_training(client: MlflowClient, exp_id: str, tags: dict[str, str] | None = None) -> None:
    """Tag the experiment as model training (`mlflow.experimentKind`), so the MLflow UI opens
    it on its runs table, not on the GenAI overview; also an experiment cnnflow only writes to
    (the one `mlflow run` chose). `tags`: the experiment's, when the caller has them."""
    if tags is None:
        tags = client.get_experiment(exp_id).tags
    if tags.get(EXPERIMENT_KIND_TAG) != TRAINING_KIND:
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)


def clean_params(params: dict[str, Any]) -> list[Param]:
    """Params as MLflow stores them: strings, URIs masked, long values cut."""
    return [Param(k, mask_uri(str(v))[:MAX_PARAM_LENGTH]) for k, v in params.items()]


def log_params_and_tags(client: MlflowClient, run_id: str, params: dict[str, Any],
                        tags: dict[str, Any]) -> None:
    """One request for everything static about a run."""
    run_tags = [RunTag(k, mask_uri(str(v))) for k, v in tags.items()]
    client.log_batch(run_id, params=clean_params(params), tags=run_tags)


def finish_run(client: MlflowClient, run_id: str, status: str, error: str | None = None) -> None:
    """End a run as FINISHED / FAILED / KILLED, keeping the one-line reason as a tag."""
    if error:
        client.set_tag(run_id, ERROR_TAG, mask_text(one_line(error))[:5000])
    with contextlib.redirect_stdout(io.StringIO()):  # MLflow prints the run URL; we print ours
        client.set_terminated(run_id, status=status)


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float],
                step: int | None = None, model_id: str | None = None) -> None:
    """Metrics in one request; `model_id` links them to a logged model (MLflow 3), so the
    model's page shows them (evaluate's test metrics)."""
    now = int(time.time() * 1000)
    client.log_batch(run_id, [Metric(k, float(v), now, step or 0, model_id=model_id)
                              for k, v in metrics.items()])


def backfill_epochs(client: MlflowClient, run_id: str, checkpoint: dict[str, Any]) -> int:
    """Log epochs the checkpoint has but MLflow missed (a crash between the two writes).

    Returns the checkpoint's epoch, where the resumed run continues from.
    """
    logged = {m.step for m in client.get_metric_history(run_id, "val_loss")}
    for row in checkpoint["history"]:
        if row["epoch"] not in logged:
            metrics = {k: v for k, v in row.items() if k != "epoch"}
            log_metrics(client, run_id, metrics, step=int(row["epoch"]))
    return int(checkpoint["epoch"])


def download_checkpoint(client: MlflowClient, run_id: str, dest: Path) -> tuple[Path, Path | None]:
    """Fetch `checkpoints/last.pt` (and best.pt when present) of a run, for resuming."""
    names = {f.path for f in client.list_artifacts(run_id, "checkpoints")}
    if "checkpoints/last.pt" not in names:
        raise FileNotFoundError(f"run {run_id} has no checkpoints/last.pt to resume from")
    dest.mkdir(parents=True, exist_ok=True)
    last = Path(client.download_artifacts(run_id, "checkpoints/last.pt", str(dest)))
    best = None
    if "checkpoints/best.pt" in names:
        best = Path(client.download_artifacts(run_id, "checkpoints/best.pt", str(dest)))
    return last, best


def log_history(client: MlflowClient, run_id: str, history: list[dict[str, float]],
                out_dir: Path) -> None:
    """history.json and the loss/accuracy curves, so a run's story is readable without a UI."""
    from components.plots import plot_curves

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "history.json").write_text(json.dumps(history, indent=2))
    plot_curves(history, out_dir / "curves.png")
    client.log_artifact(run_id, str(out_dir / "history.json"))
    client.log_artifact(run_id, str(out_dir / "curves.png"), artifact_path="figures")


# --------------------------------------------------------------------------------------------
# Opening and ending a step's run, and the dataset input of training runs
# --------------------------------------------------------------------------------------------


class OpenedRun(NamedTuple):
    """A step's run as `open_run` / `reopen_run` hand it back."""

    run_id: str
    experiment_id: str
    name: str


def open_run(client: MlflowClient, *, step: str, model: str | None = None,
             experiment: str = "", exp_id: str = "", adopt: str | None = None,
             parent: str | None = None, tags: dict[str, Any] | None = None) -> OpenedRun:
    """Open the run of one step: the one place cnnflow creates, names and tags step runs.

    The run is named `<model>-vN` when it holds a model (train, ensemble), N counting that
    model's runs (`cnnflow.model`), else `<step>-vN`, N counting that step's runs
    (`cnnflow.step`), so `preprocess-v3` is a stable way to talk about a split.
    - `adopt`: fill in a run opened for this step by someone else (the job's run that
      `mlflow run` started, or the child the `main` pipeline created): rename it and tag it;
    - else a new run, nested under `parent` (`mlflow.parentRunId`) when given.
    The experiment is the adopted or parent run's, else `exp_id`, else the one named
    `experiment` (created on first use). `tags` are added to the run (URIs masked).
    The run exists (tagged with its label and a claim) before its version is chosen, so
    runs opened at the same moment get distinct versions (`claim_version`).
    """
    if adopt and parent:
        raise ValueError("open_run: adopt a run or create a child of a parent, not both")
    source = adopt or parent
    if source:
        exp_id = client.get_run(source).info.experiment_id
        mark_training(client, exp_id)
    elif not exp_id:
        exp_id = experiment_id(client, experiment)
    label, label_tag = (model, MODEL_TAG) if model else (step, STEP_TAG)
    all_tags: dict[str, Any] = {STEP_TAG: step, CLAIM_TAG: _claim_stamp()}
    if model:
        all_tags[MODEL_TAG] = model
    if parent:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent
    all_tags.update(tags or {})
    if adopt:
        log_params_and_tags(client, adopt, {}, all_tags)
        run_id = adopt
    else:
        run_id = client.create_run(exp_id, run_name=f"{label}-new",
                                   tags={k: mask_uri(str(v)) for k, v in all_tags.items()}
                                   ).info.run_id
    version = claim_version(client, exp_id, run_id, label, label_tag)
    return OpenedRun(run_id, exp_id, f"{label}-v{version}")


# --------------------------------------------------------------------------------------------
# Versions that stay unique when runs open at the same moment
# --------------------------------------------------------------------------------------------

# On a run from its creation (or adoption) until its version is written: "<ms>:<ticket>",
# ticket 0 while it is still choosing one. MLflow has no compare-and-set, so the runs that
# open at the same moment take turns by Lamport's bakery algorithm over these tags.
CLAIM_TAG = "cnnflow.version_claim"
# A claim this old belongs to a process that died before settling: nobody waits for it.
STALE_CLAIM_SEC = 60.0
CLAIM_POLL_SEC = (0.02, 0.1)


class _Claim(NamedTuple):
    """One run with the label, as `claim_version` reads it."""

    run_id: str
    version: int  # 0: none yet
    ticket: int | None  # None: not claiming (settled, reserved, or a dead claim); 0: choosing


def _claim_stamp(ticket: int = 0) -> str:
    return f"{time.time_ns() // 1_000_000}:{ticket}"


def _claims(client: MlflowClient, exp_id: str, label: str, label_tag: str) -> list[_Claim]:
    runs = client.search_runs([exp_id], filter_string=f"tags.`{label_tag}` = '{label}'",
                              run_view_type=ViewType.ALL, max_results=50000)
    now_ms = time.time_ns() // 1_000_000
    found = []
    for run in runs:
        version = run.data.tags.get(VERSION_TAG, "")
        stamp, _, ticket = run.data.tags.get(CLAIM_TAG, "").partition(":")
        live = stamp.isdigit() and ticket.isdigit() and \
            now_ms - int(stamp) < STALE_CLAIM_SEC * 1000
        found.append(_Claim(run.info.run_id, int(version) if version.isdigit() else 0,
                            int(ticket) if live else None))
    return found


def claim_version(client: MlflowClient, exp_id: str, run_id: str, label: str,
                  label_tag: str = MODEL_TAG) -> int:
    """Name `run_id` `<label>-vN` with the next version of `label`, unique and gap-free even
    against runs opening at the same moment (threads, processes, machines).

    The run already carries `label_tag`=`label` and a choosing claim. It takes a ticket one
    above every ticket it reads, then waits while any run is still choosing or holds a
    smaller ticket (ties: the smaller run id); its turn come, every earlier claimant has
    written its version, so the highest version read plus one is free. Runs are never
    deleted or renumbered; a claim older than `STALE_CLAIM_SEC` is ignored.
    """
    import random

    def poll() -> None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"run {run_id}: no version for '{label}' after "
                               f"{2 * STALE_CLAIM_SEC:g} s of waiting for other runs")
        time.sleep(random.uniform(*CLAIM_POLL_SEC))

    deadline = time.monotonic() + 2 * STALE_CLAIM_SEC
    view = _claims(client, exp_id, label, label_tag)
    while run_id not in {c.run_id for c in view}:  # searchable a moment after creation
        poll()
        view = _claims(client, exp_id, label, label_tag)
    ticket = 1 + max((c.ticket or 0 for c in view), default=0)
    client.set_tag(run_id, CLAIM_TAG, _claim_stamp(ticket))
    while True:
        view = _claims(client, exp_id, label, label_tag)
        ahead = [c for c in view if c.run_id != run_id and c.ticket is not None
                 and (c.ticket == 0 or (c.ticket, c.run_id) < (ticket, run_id))]
        if not ahead:
            break
        poll()
    version = 1 + max((c.version for c in view if c.run_id != run_id), default=0)
    client.update_run(run_id, name=f"{label}-v{version}")
    client.set_tag(run_id, VERSION_TAG, str(version))
    client.delete_tag(run_id, CLAIM_TAG)  # the next in line may go
    return version


def reserve_child(client: MlflowClient, parent: str, exp_id: str, step: str,
                  tags: dict[str, Any]) -> str:
    """A child run of `parent` held for a step that will open it (`open_run(adopt=...)`).

    The `main` pipeline reserves each step's child before the step runs, so a kill at any
    point leaves the child findable under its parent; it has no name or version until the
    step opens it (a child with a version is a training run that started, and resumes).
    """
    all_tags = {MLFLOW_PARENT_RUN_ID: parent, STEP_TAG: step, **tags}
    run = client.create_run(exp_id, tags={k: mask_uri(str(v)) for k, v in all_tags.items()})
    return run.info.run_id


def reopen_run(client: MlflowClient, run_id: str) -> OpenedRun:
    """Set an unfinished run RUNNING again, keeping its name and version (a resumed training
    run, a resumed pipeline): beside `open_run`, for runs that already have a name."""
    run = client.get_run(run_id)
    client.update_run(run_id, status="RUNNING")
    return OpenedRun(run_id, run.info.experiment_id, run.info.run_name)


@contextlib.contextmanager
def ending_run(client: MlflowClient, run_id: str):
    """FINISHED when the block completes; FAILED / KILLED with `cnnflow.error` when it raises.

    A data step that stops half-way must never look like a finished one that a later
    training run could pick up.
    """
    try:
        yield
    except BaseException as exc:
        end_failed(client, run_id, exc)
        raise
    finish_run(client, run_id, "FINISHED")


def end_failed(client: MlflowClient, run_id: str, exc: BaseException) -> None:
    """KILLED for Ctrl-C, else FAILED, with the reason; never hides the original failure."""
    interrupted = isinstance(exc, KeyboardInterrupt)
    reason = "interrupted by the user (Ctrl-C)" if interrupted else f"{type(exc).__name__}: {exc}"
    try:
        finish_run(client, run_id, "KILLED" if interrupted else "FAILED", one_line(reason))
    except Exception:  # noqa: BLE001
        pass


def announce_end(client: MlflowClient, tracking_uri: str, run_id: str, *,
                 exc: BaseException | None = None, metrics: dict[str, float] | None = None,
                 detail: str = "") -> None:
    """Alert (components.notify) that a top-level run ended, FINISHED or, with `exc`, FAILED:
    a standalone training run, a pipeline. Nested runs (trials, folds, bagging members, the
    pipeline's steps) and Ctrl-C stay quiet, so one job ends in one alert (a new `@champion`
    it makes is announced on its own, by the registry). `metrics`: the key
    numbers (default: the run's). Never raises; waits at most the alerts' timeout."""
    if not notify.enabled() or isinstance(exc, KeyboardInterrupt):
        return
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - the server that failed the run may be gone too
        return
    if MLFLOW_PARENT_RUN_ID in run.data.tags:
        return
    error = None if exc is None else f"{type(exc).__name__}: {exc}"
    notify.run_ended(run.data.tags.get(STEP_TAG, "run"), run.info.run_name or run_id,
                     "FINISHED" if exc is None else getattr(exc, "run_status", "FAILED"),
                     run.data.metrics if metrics is None else metrics,
                     run_url(tracking_uri, run.info.experiment_id, run_id), error, detail)


def log_dataset_input(client: MlflowClient, run_id: str, rows: list[dict[str, Any]], *,
                      name: str, digest: str, source: str,
                      tags: dict[str, str] | None = None) -> None:
    """Record the split manifest as the run's MLflow dataset input (context `training`).

    MLflow shows it on the run page and links runs that share it; the digest is cnnflow's
    manifest digest (cut to MLflow's 36-character limit), so equal splits show as one dataset.
    """
    import pandas as pd
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    frame = pd.DataFrame(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # schema inference advice about integer columns
        dataset = mlflow.data.from_pandas(frame, source=source, name=name, digest=digest[:32],
                                          targets="label" if "label" in frame else None)
        entity = dataset._to_mlflow_entity()  # what mlflow.log_input does, minus a fluent run
    input_tags = [InputTag(MLFLOW_DATASET_CONTEXT, "training")]
    input_tags += [InputTag(k, mask_uri(str(v))) for k, v in (tags or {}).items()]
    client.log_inputs(run_id, datasets=[DatasetInput(entity, tags=input_tags)])


def code_version() -> str:
    """The git commit of the code, with a digest of uncommitted changes when the tree is dirty,
    or the installed package version outside a repository: what 'same code' means for reuse."""
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=True,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        diff = subprocess.run(["git", "-C", str(root), "diff", "HEAD", "--", "components",
                               "pipelines"], check=True, capture_output=True, timeout=10).stdout
        new = subprocess.run(["git", "-C", str(root), "ls-files", "--others",
                              "--exclude-standard", "-z", "--", "components", "pipelines"],
                             check=True, capture_output=True, timeout=10).stdout
        for name in sorted(filter(None, new.split(b"\0"))):  # files not yet added count too
            diff += name + b"\0" + (root / name.decode()).read_bytes()
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"cnnflow-{version('cnnflow')}"
        except PackageNotFoundError:
            return "unknown"
    return f"{commit}-dirty-{hashlib.sha1(diff).hexdigest()[:12]}" if diff else commit
