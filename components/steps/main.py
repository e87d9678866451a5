"""The `main` pipeline: eda -> preprocess -> train each model -> evaluate each -> ensemble ->
promote -> sync -> report, as child runs of one parent run (MLflow's multistep pattern).

Validation chooses, test judges: the ensemble's members and the `challenger` are the best of
this pipeline's registered versions by the validation counterpart of `metric` (`val_acc` for
`test_acc`); the promotion rule then compares that one challenger with the champion on
`metric` itself. The parent run carries the summary (`summary.<model>.<metric>` metrics, the
final table as `pipeline/comparison.json`, every model's curves in one figure, and tags
saying which metric chose and which judged).

Every step gets a key: a digest of its parameters, the code version (git commit) and its
input (the data folder's fingerprint, or the run ids it consumes). A finished run with that
key is reused instead of re-run, so a re-launched pipeline picks up at the first step that
did not finish; an interrupted parent run is re-opened, and a killed training run resumes
from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE

from components import tracking
from components.errors import CnnflowError
from components.humanize import plural
from components.names import (
    CODE_VERSION_TAG,
    DECISION_REASON_TAG,
    ERROR_TAG,
    REGISTERED_VERSION_TAG,
    STEP_KEY_TAG,
    STEP_TAG,
    VERSION_TAG,
)
from components.settings import mask_uri
from components.steps.params import EdaParams, EnsembleParams, EvalParams, PipelineParams
from components.steps.params import TrainParams as Train
from components.tracking import registry

PIPELINE_STEP = "pipeline"
NAME_TAG = "cnnflow.pipeline_step"  # which of the pipeline's steps a child run is
STEPS_ARTIFACT = "pipeline/steps.json"


class PipelineError(CnnflowError, RuntimeError):
    """A pipeline parameter or state the user can fix, in one line."""


def step_key(step: str, inputs: dict[str, Any], code: str) -> str:
    """What makes two runs of a step interchangeable: the step, its inputs, the code."""
    text = json.dumps({"step": step, "inputs": inputs, "code": code}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


@dataclass
class StepRecord:
    """One step of one pipeline run: which MLflow run holds it and whether it was reused."""

    step: str
    name: str
    run_id: str
    run_name: str
    reused: bool
    seconds: float = 0.0
    summary: str = ""


# The final table (plus the choosing and judging metrics when they are other ones).
TABLE_COLUMNS = ["model", "run", "version", "val_acc", "test_acc", "latency_ms_p50",
                 "model_size_mb", "aliases"]
COMPARISON_ARTIFACT = "pipeline/comparison.json"  # the final table, as an MLflow table
CURVES_ARTIFACT = "figures/curves_all_models.png"


@dataclass
class PipelineOutcome:
    run_id: str
    run_name: str
    experiment_id: str
    experiment: str
    url: str
    steps: list[StepRecord]
    table: list[dict[str, Any]]
    champion_uri: str
    resumed: bool = False
    report: Any = None
    selection_metric: str = ""  # what chose the challenger among this pipeline's versions
    judgement_metric: str = ""  # what the promotion rule compared with the champion
    champion_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def criteria(self) -> str:
        """'candidate chosen by val_acc (validation split); promotion judged on test_acc ...'"""
        return registry.criteria_line(self.selection_metric, self.judgement_metric)

    @property
    def columns(self) -> list[str]:
        """TABLE_COLUMNS, plus the choosing and judging metrics when they are other ones."""
        extra = [m for m in (self.selection_metric, self.judgement_metric)
                 if m and m not in TABLE_COLUMNS]
        at = TABLE_COLUMNS.index("test_acc") + 1
        return [*TABLE_COLUMNS[:at], *dict.fromkeys(extra), *TABLE_COLUMNS[at:]]


class Pipeline:
    """One invocation of the pipeline: the parent run and the steps it runs or reuses."""

    def __init__(self, params: PipelineParams, tracking_uri: str, mongo_uri: str,
                 log: Callable[[str], None], progress: bool,
                 job_run_id: str | None = None) -> None:
        self.params = params
        self.job_run_id = job_run_id  # the parent `mlflow run -e main` opened, if any
        self.uri = tracking_uri
        self.mongo_uri = mongo_uri
        self.log = log
        self.progress = progress
        self.client: MlflowClient = tracking.connect(tracking_uri)
        self.code = tracking.code_version()
        self.records: list[StepRecord] = []
        self.total = 0
        self.exp_id = ""
        self.parent = ""

    # ---------------------------------------------------------------------------- finding runs

    def _search(self, filter_string: str, max_results: int = 1) -> list[Run]:
        return self.client.search_runs([self.exp_id], filter_string=filter_string,
                                       run_view_type=ViewType.ACTIVE_ONLY,
                                       order_by=["attributes.start_time DESC"],
                                       max_results=max_results)

    def _finished(self, key: str) -> Run | None:
        if self.params.force:
            return None
        found = self._search(f"tags.`{STEP_KEY_TAG}` = '{key}' and attributes.status = 'FINISHED'")
        return found[0] if found else None

    # ---------------------------------------------------------------------------- the parent

    def open_parent(self, experiment: str, key: str) -> tuple[str, str, bool]:
        """Re-open the last unfinished pipeline run with this key (resume), or start one."""
        self.exp_id = tracking.experiment_id(self.client, experiment)
        last = self._search(f"tags.`{STEP_TAG}` = '{PIPELINE_STEP}' and "
                            f"tags.`{STEP_KEY_TAG}` = '{key}'")
        unfinished = last[0] if last and last[0].info.status != "FINISHED" else None
        if unfinished is not None:
            self._close_orphans(unfinished.info.run_id)
        if unfinished is not None and not self.job_run_id and not self.params.force:
            run_id, _, name = tracking.reopen_run(self.client, unfinished.info.run_id)
            with contextlib.suppress(MlflowException):
                self.client.delete_tag(run_id, ERROR_TAG)
            return run_id, name, True
        if unfinished is not None and unfinished.info.status == "RUNNING":
            # `mlflow run` brought its own parent (or --force): the killed one is over, and
            # its killed training runs can still be resumed under the new parent.
            tracking.finish_run(self.client, unfinished.info.run_id, "KILLED",
                                "the pipeline stopped; a later run took over")
        run_id, _, name = tracking.open_run(self.client, step=PIPELINE_STEP,
                                            experiment=experiment, adopt=self.job_run_id,
                                            tags={STEP_KEY_TAG: key, CODE_VERSION_TAG: self.code})
        present = self.client.get_run(run_id).data.params  # `mlflow run -e main` logged -P
        tracking.log_params_and_tags(self.client, run_id, {
            k: v for k, v in self.params.logged().items() if k not in present}, {})
        return run_id, name, False

    def _close_orphans(self, parent: str) -> None:
        """Children a killed pipeline left RUNNING end KILLED, so none is mistaken for live."""
        for run in self._search(f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}' and "
                                "attributes.status = 'RUNNING'", max_results=1000):
            tracking.finish_run(self.client, run.info.run_id, "KILLED",
                                "the pipeline stopped while this step ran")

    # ---------------------------------------------------------------------------- one step

    def step(self, step: str, name: str, inputs: dict[str, Any],
             work: Callable[[str], tuple[str, str]],
             still_valid: Callable[[Run], bool] = lambda run: True) -> StepRecord:
        """Reuse the finished run with this step's key, or create a child run and `work(child)`.

        `work(child)` hands the child to the step, which fills it in (as it fills in the run
        `mlflow run` opens) and returns (summary line, run id holding the result) - usually
        the child itself.
        """
        key = step_key(step, inputs, self.code)
        index = len(self.records) + 1
        label = f"[{index}/{self.total}] {step}" + (f" {name}" if name != step else "")
        found = self._finished(key)
        if found is not None and still_valid(found):
            record = StepRecord(step, name, found.info.run_id, found.info.run_name or "",
                                True, summary=_reused_summary(step, found))
            self.log(f"{label}: reused {record.run_name} ({record.run_id}) {record.summary}")
            self.records.append(record)
            return record
        self.log(f"{label}: running")
        start = time.monotonic()
        child = self._resumable(step, key) or tracking.reserve_child(
            self.client, self.parent, self.exp_id, step, {STEP_KEY_TAG: key, NAME_TAG: name})
        # A step that ends its own run (train, eda...) has set FINISHED already; one that does
        # not (evaluate, promote, sync) is ended here; a failure ends it FAILED / KILLED.
        with tracking.ending_run(self.client, child):
            summary, run_id = work(child)
        run = self.client.get_run(run_id)
        record = StepRecord(step, name, run_id, run.info.run_name or "", False,
                            time.monotonic() - start, summary)
        self.log(f"{label}: ran in {record.seconds:.1f} s -> {record.run_name} ({run_id}) "
                 f"{summary}")
        self.records.append(record)
        return record

    def _resumable(self, step: str, key: str) -> str | None:
        """A killed training run of this key with a checkpoint: continue it, not start over."""
        if step != "train" or self.params.force:
            return None
        killed = f"tags.`{STEP_KEY_TAG}` = '{key}' and attributes.status = 'KILLED'"
        for run in self._search(killed):
            names = {f.path for f in self.client.list_artifacts(run.info.run_id, "checkpoints")}
            if "checkpoints/last.pt" in names:
                self.client.set_tag(run.info.run_id, MLFLOW_PARENT_RUN_ID, self.parent)
                return run.info.run_id
        return None


# What the terminal shows for a reused step: the number that step is about.
SUMMARY_METRIC = {"eda": "n_images", "preprocess": "n_train", "train": "best_val_acc",
                  "evaluate": "test_acc", "ensemble": "test_acc", "sync": "runs_listed"}


def _reused_summary(step: str, run: Run) -> str:
    metric = SUMMARY_METRIC.get(step)
    if metric in run.data.metrics:
        return f"{metric} {run.data.metrics[metric]:.4g}"
    return run.data.tags.get(DECISION_REASON_TAG, "")


# -------------------------------------------------------------------------------- the steps


def run_pipeline(params: PipelineParams, tracking_uri: str, mongo_uri: str = "", *,
                 progress: bool | None = None,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
                 job_run_id: str | None = None) -> PipelineOutcome:
    """Run (or resume) the whole pipeline; returns its parent run, steps and final table.
    `job_run_id`: the run `mlflow run -e main` opened, filled in as the parent run."""
    from components.data.datasets import folder_fingerprint, resolve_data

    params.validate()
    if params.sync and not mongo_uri:
        raise PipelineError("sync=true needs a MongoDB URI: start it with `cnnflow up`, set "
                            "MONGO_URI, or pass --sync false")
    dataset, _ = resolve_data(params.data)
    progress = sys.stderr.isatty() if progress is None else progress
    p = Pipeline(params, tracking_uri, mongo_uri, log, progress, job_run_id)
    experiment = _experiment_name(p.client, params.experiment or dataset, job_run_id)
    data_digest = folder_fingerprint(params.data)
    key = step_key(PIPELINE_STEP, {**params.key_inputs(), "data_digest": data_digest}, p.code)
    models = params.model_list()
    ensemble = params.top_k >= 2 and len(models) >= 2
    p.total = 2 + 2 * len(models) + (2 if ensemble else 0) + 1 + int(params.sync)
    p.parent, run_name, resumed = p.open_parent(experiment, key)
    url = tracking.run_url(tracking_uri, p.exp_id, p.parent)
    log(f"pipeline {run_name} ({p.parent}){' resumed' if resumed else ''}: "
        f"{', '.join(models)} on {dataset}; code {p.code[:12]}; {url}")
    client = p.client
    try:
        with tracking.ending_run(client, p.parent):
            client.set_tag(p.parent, "cnnflow.data_digest", data_digest)
            outcome = _steps(p, experiment, data_digest, models, ensemble)
            outcome.run_name, outcome.url, outcome.resumed = run_name, url, resumed
            _log_outcome(p, outcome)
            if params.report:
                from components.steps.report import build_report

                outcome.report = build_report(tracking_uri, experiment,
                                              reports_dir=params.reports_dir,
                                              pipeline_run_id=p.parent, log=log)
    except BaseException as exc:
        _write_steps(p)  # what ran and what was reused before the failure
        tracking.announce_end(client, tracking_uri, p.parent, exc=exc)
        raise
    tracking.announce_end(client, tracking_uri, p.parent, metrics=outcome.champion_metrics,
                          detail=outcome.champion_uri)
    return outcome


def _steps(p: Pipeline, experiment: str, data_digest: str, models: list[str],
           ensemble: bool) -> PipelineOutcome:
    from components.steps.eda import NO_FINDINGS, run_eda
    from components.steps.evaluate import evaluate
    from components.steps.preprocess import run_preprocess
    from components.steps.train import train

    params, client = p.params, p.client

    eda_params = EdaParams(data=params.data, experiment=experiment,
                           reports_dir=params.reports_dir, val_ratio=params.val_ratio,
                           test_ratio=params.test_ratio, seed=params.seed)

    def eda(child: str) -> tuple[str, str]:
        out = run_eda(eda_params, p.uri, progress=p.progress, log=p.log, job_run_id=child)
        found = [f for f in out.findings if f != NO_FINDINGS]
        return (f"{plural(out.metrics['n_images'], 'image')}, "
                f"{plural(len(found), 'finding')}", child)

    p.step("eda", "eda", {**eda_params.logged(), "data_digest": data_digest}, eda)

    prep_params = params.preprocess_params(experiment)

    def preprocess(child: str) -> tuple[str, str]:
        out = run_preprocess(prep_params, p.uri, progress=p.progress, log=p.log,
                             job_run_id=child)
        return f"split digest {out.digest[:12]}", child

    prep = p.step("preprocess", "preprocess",
                  {**prep_params.logged(), "data_digest": data_digest}, preprocess)

    trained: dict[str, str] = {}
    for model in models:
        tp = params.train_params(model, prep.run_id, experiment)

        def fit(child: str, tp=tp) -> tuple[str, str]:
            if client.get_run(child).data.tags.get(VERSION_TAG):  # killed: resume it
                resume = Train(resume=child, device=tp.device, num_workers=tp.num_workers)
                out = train(resume, p.uri, progress=p.progress, log=p.log)
            else:
                out = train(tp, p.uri, progress=p.progress, log=p.log, job_run_id=child)
            r = out.result
            return (f"best_val_acc {r.best_val_acc:.4f} (epoch {r.best_epoch}/{r.epochs_run})",
                    out.run_id)

        inputs = {k: v for k, v in tp.logged().items() if k not in Train.RUNTIME}
        inputs["weights"] = _weights_input(model, tp.weights)
        trained[model] = p.step("train", model, inputs, fit).run_id

    name = registry.default_name(experiment)
    versions: dict[str, str] = {}  # model (or "ensemble") -> registered version

    def evaluation_step(label: str, run_id: str) -> None:
        def run(child: str) -> tuple[str, str]:
            out = evaluate(EvalParams(run_id=run_id, registered_model=name, promote=False,
                                      metric=params.metric), p.uri, log=p.log,
                           job_run_id=child)
            keep = {k: out.metrics[k] for k in ("val_acc", "val_loss", "test_acc", "test_loss",
                                                "latency_ms_p50", "model_size_mb")
                    if k in out.metrics}
            tracking.log_metrics(client, child, keep)
            return (f"test_acc {out.metrics['test_acc']:.4f}; registered {name} "
                    f"v{out.version.version}", child)

        def registered(run: Run) -> bool:
            try:
                registry.get_version(client, name, _registered_version(run))
            except CnnflowError:
                return False
            return True

        record = p.step("evaluate", label, {"run_id": run_id, "registered_model": name},
                        run, registered)
        versions[label] = _registered_version(client.get_run(record.run_id))

    for model in models:
        evaluation_step(model, trained[model])

    ensemble_run = ""
    if ensemble:
        from components.steps.ensemble import run_ensemble

        # Members chosen like the challenger: by the validation counterpart of `metric`.
        ranking = registry.rank_versions(client, name, {m: versions[m] for m in models},
                                         params.metric)
        if ranking.fallback:
            p.log(f"ensemble members: {ranking.fallback}")
        ranked = [label for label, _, _ in ranking.ranked][:params.top_k]
        members = [trained[m] for m in models if m in ranked]  # --models order: a stable key

        def combine(child: str) -> tuple[str, str]:
            out = run_ensemble(EnsembleParams(run_ids=",".join(members), experiment=experiment,
                                              vote=params.vote, device=params.device,
                                              num_workers=0), p.uri, log=p.log,
                               job_run_id=child)
            return (f"{len(members)} members ({', '.join(ranked)}); "
                    f"test_acc {out.metrics.get('test_acc', float('nan')):.4f}", child)

        ensemble_run = p.step("ensemble", "ensemble",
                              {"members": members, "vote": params.vote}, combine).run_id
        evaluation_step("ensemble", ensemble_run)

    def promote(child: str) -> tuple[str, str]:
        tracking.open_run(client, step="promote", experiment=experiment, adopt=child)
        ranking = registry.choose_challenger(client, name, versions, params.metric)
        label, best, value = ranking.ranked[0]
        if ranking.fallback:
            p.log(f"promote: {ranking.fallback}")
        decision = registry.promote(client, name, metric=params.metric,
                                    min_delta=params.min_delta)
        tracking.log_params_and_tags(client, child, {}, {
            "cnnflow.candidate_version": best, "cnnflow.decision": decision.action,
            DECISION_REASON_TAG: decision.reason,
            registry.SELECTION_METRIC_TAG: ranking.metric,
            registry.JUDGEMENT_METRIC_TAG: params.metric,
            "cnnflow.champion_version": _champion_version(client, name)})
        return (f"challenger v{best} ({label}, {ranking.metric} {value:.4f}); "
                f"{decision.line()}", child)

    promoted = p.step("promote", "promote", {"versions": versions, "registered_model": name,
                                             "metric": params.metric,
                                             "min_delta": params.min_delta}, promote)
    selection = client.get_run(promoted.run_id).data.tags.get(
        registry.SELECTION_METRIC_TAG, registry.selection_metric(params.metric))
    champion = _champion_version(client, name)

    if params.sync:
        from components.mirror.sync import SyncOptions, sync_once

        def mirror(child: str) -> tuple[str, str]:
            tracking.open_run(client, step="sync", experiment=experiment, adopt=child)
            report = sync_once(p.uri, p.mongo_uri, SyncOptions(experiments=[experiment]))
            tracking.log_metrics(client, child, {"runs_listed": report.listed,
                                                 "runs_written": report.changed,
                                                 "epochs_written": report.epochs})
            return report.line(), child

        p.step("sync", "sync", {"runs": sorted(r.run_id for r in p.records),
                                "champion": champion, "mongo": mask_uri(p.mongo_uri)}, mirror)

    champion_uri = f"models:/{name}@{registry.CHAMPION}" if champion else ""
    metrics = list(dict.fromkeys(("val_acc", "test_acc", selection, params.metric)))
    labelled = {**trained, **({"ensemble": ensemble_run} if ensemble_run else {})}
    table = _final_table(client, name, labelled, versions, metrics)
    champion_tags = registry.get_version(client, name, champion).tags if champion else {}
    return PipelineOutcome(p.parent, "", p.exp_id, experiment, "", list(p.records), table,
                           champion_uri, selection_metric=selection,
                           judgement_metric=params.metric,
                           champion_metrics={m: float(champion_tags[m]) for m in metrics
                                             if m in champion_tags})


def _weights_input(model: str, weights: str) -> str:
    """What `weights` means today: `auto` turns into ImageNet once the file is cached, and a
    weights file may be replaced in place; either change must re-train."""
    from components.nn.models import imagenet_weights_path

    if weights == "auto":
        cached = imagenet_weights_path(model)
        return f"auto:{'imagenet' if cached is not None and cached.is_file() else 'random'}"
    if weights in ("none", "imagenet"):
        return weights
    stat = Path(weights).expanduser().stat()  # validate() has checked the file exists
    return f"{weights}:{stat.st_size}:{stat.st_mtime_ns}"


def _registered_version(run: Run) -> str:
    """N of the `name/N` an evaluate step run records (what `evaluate` tags its job run with)."""
    return run.data.tags.get(REGISTERED_VERSION_TAG, "").rpartition("/")[2]


def _experiment_name(client: MlflowClient, name: str, job_run_id: str | None) -> str:
    """Under `mlflow run -e main` the parent run exists already: its experiment is ours (the
    command has refused a differing `-P experiment` before anything ran)."""
    if not job_run_id:
        return name
    return client.get_experiment(client.get_run(job_run_id).info.experiment_id).name


def _champion_version(client: MlflowClient, name: str) -> str:
    version = registry.get_alias(client, name, registry.CHAMPION)
    return version.version if version is not None else ""


def _final_table(client: MlflowClient, name: str, runs: dict[str, str],
                 versions: dict[str, str], metrics: list[str]) -> list[dict[str, Any]]:
    """One row per model (and the ensemble): its run, registered version, the `metrics` as
    the version records them (val_acc, test_acc, the choosing and the judging one), cost,
    and its aliases now (`@challenger` was chosen, `@champion` won)."""
    aliases = registry.version_aliases(client, name)
    rows = []
    for label, run_id in runs.items():
        run = client.get_run(run_id)
        m = run.data.metrics
        version = registry.get_version(client, name, versions[label])
        tags = version.tags
        row = {"model": label, "run": run.info.run_name, "run_id": run_id,
               "version": int(version.version)}
        for metric in metrics:
            value = tags.get(metric, m.get(metric))
            row[metric] = float(value) if value is not None else None
        if row.get("val_acc") is None:  # no val tag: the best epoch's, as training saw it
            row["val_acc"] = m.get("best_val_acc")
        row.update(latency_ms_p50=m.get("latency_ms_p50"), model_size_mb=m.get("model_size_mb"),
                   aliases=" ".join(f"@{a}" for a in aliases.get(version.version, [])
                                    if a in (registry.CHALLENGER, registry.CHAMPION)))
        rows.append(row)
    return rows


def _log_outcome(p: Pipeline, outcome: PipelineOutcome) -> None:
    """The parent run carries the summary: `summary.<model>.<metric>` (and
    `summary.champion.<metric>`), which metric chose and which judged, the final table as an
    MLflow table, and every model's training curves in one figure."""
    from components import plots
    from components.steps.report import run_history

    reused = sum(r.reused for r in outcome.steps)
    metrics = {"steps_run": len(outcome.steps) - reused, "steps_reused": reused}
    names = list(dict.fromkeys(("val_acc", "test_acc", outcome.selection_metric,
                                outcome.judgement_metric)))
    for row in outcome.table:
        metrics.update({f"summary.{row['model']}.{k}": row[k] for k in names
                        if row.get(k) is not None})
    metrics.update({f"summary.champion.{k}": v for k, v in outcome.champion_metrics.items()})
    tracking.log_metrics(p.client, p.parent, metrics)
    tags = {f"cnnflow.run.{r.step}" + (f".{r.name}" if r.name != r.step else ""): r.run_id
            for r in outcome.steps}
    if outcome.champion_uri:
        tags["cnnflow.champion_uri"] = outcome.champion_uri
    tags[registry.SELECTION_METRIC_TAG] = outcome.selection_metric
    tags[registry.JUDGEMENT_METRIC_TAG] = outcome.judgement_metric
    tags[MLFLOW_RUN_NOTE] = _run_note(outcome)
    tracking.log_params_and_tags(p.client, p.parent, {}, tags)
    columns = [*outcome.columns, "run_id"]
    p.client.log_table(p.parent, data={c: [r.get(c) for r in outcome.table] for c in columns},
                       artifact_file=COMPARISON_ARTIFACT)
    histories = {r.name: h for r in outcome.steps
                 if r.step == "train" and (h := run_history(p.client, r.run_id))}
    if histories:
        with tempfile.TemporaryDirectory(prefix="cnnflow-pipeline-") as tmp:
            path = plots.plot_curves_all(histories, Path(tmp) / Path(CURVES_ARTIFACT).name)
            p.client.log_artifact(p.parent, str(path),
                                  artifact_path=str(Path(CURVES_ARTIFACT).parent))
    _write_steps(p)


def _run_note(outcome: PipelineOutcome) -> str:
    """The parent run's description in the UI: the final table and how the champion was
    chosen, the first thing the run's page shows."""
    from components.tracking.comparison import markdown_table

    criteria = outcome.criteria
    lines = [markdown_table(outcome.table, outcome.columns), "",
             f"{criteria[:1].upper()}{criteria[1:]}."]
    if outcome.champion_uri:
        lines.append(f"Champion: `{outcome.champion_uri}`")
    return "\n".join(lines)


def _write_steps(p: Pipeline) -> None:
    """`pipeline/steps.json` on the parent: each step's run and whether it was reused."""
    if not p.parent:
        return
    try:
        with tempfile.TemporaryDirectory(prefix="cnnflow-pipeline-") as tmp:
            path = Path(tmp) / Path(STEPS_ARTIFACT).name
            path.write_text(json.dumps([asdict(r) for r in p.records], indent=2))
            p.client.log_artifact(p.parent, str(path),
                                  artifact_path=str(Path(STEPS_ARTIFACT).parent))
    except MlflowException:
        pass  # the server went away: the steps are still findable by their parent tag
