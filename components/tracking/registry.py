"""Registry versions and the promotion rule: `challenger` earns `champion`, nobody copies files.

Every evaluated model becomes a new version of a registered model (default
`<experiment>-classifier`) tagged with its run, model, dataset digest, test and validation
metrics, and gets the alias `challenger`. Among several candidates (the `main` pipeline's),
`choose_challenger()` picks by the validation counterpart of the promotion metric
(`selection_metric`), so the test split judges but never selects. `promote()` then moves
`champion` to the challenger only when it beats the current champion's metric by at least
`min_delta` **on the same dataset digest** (metrics on different splits are not comparable);
otherwise the champion stays. Either way the decision and its reason are written as tags on
the challenger version, so the registry explains itself.

Serving follows the alias: `mlflow models serve -m models:/<name>@champion`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from components import notify
from components.errors import CnnflowError
from components.names import DATASET_DIGEST_TAG, DATASET_TAG, MODEL_TAG, STEP_TAG
from components.tracking import version_url

CHAMPION = "champion"
CHALLENGER = "challenger"
# Version tags (beside the run's identity tags from components.names).
RUN_TAG = "cnnflow.run_id"
RUN_NAME_TAG = "cnnflow.run_name"
DECISION_TAG = "cnnflow.promotion"
REASON_TAG = "cnnflow.promotion_reason"
DECISION_TIME_TAG = "cnnflow.promotion_time"
# Metrics copied onto the version as tags, so promotion (and the UI) need not open the run:
# the ones promotion may judge on (test split, or cost) ...
VERSION_METRICS = ("test_acc", "test_loss", "test_top5_acc", "test_f1_macro", "test_f1_weighted",
                   "test_precision_macro", "test_recall_macro", "test_ece", "params_count",
                   "model_size_mb", "latency_ms_p50", "throughput_images_per_sec")
# ... and their validation counterparts, which choose the candidate (see `selection_metric`).
JUDGED_PREFIX, CHOSEN_PREFIX = "test_", "val_"
VALIDATION_METRICS = tuple(CHOSEN_PREFIX + m[len(JUDGED_PREFIX):] for m in VERSION_METRICS
                           if m.startswith(JUDGED_PREFIX))
# What a metric's prefix says about the data behind it (no prefix: a cost, no split).
METRIC_SPLITS = {JUDGED_PREFIX: "test split", CHOSEN_PREFIX: "validation split"}
# Tags of a pipeline run (and its promote step): which metric chose, which judged.
SELECTION_METRIC_TAG = "cnnflow.selection_metric"
JUDGEMENT_METRIC_TAG = "cnnflow.judgement_metric"
# Metrics where smaller is better (everything else: larger is better).
LOWER_IS_BETTER = re.compile(r"^((test_|val_|best_val_|train_)?(loss|ece)(_.+)?|latency_ms_p\d+|"
                             r"model_size_mb|peak_memory_mb|params_count)$")
_VERSION_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")
_LOGGED_URI = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]+)$")


class RegistryError(CnnflowError, RuntimeError):
    """A registry request that cannot be honoured; one line saying what to do."""


def default_name(experiment: str) -> str:
    """`<experiment>-classifier`: one registered model per experiment (= per dataset)."""
    return re.sub(r"[/:]", "-", f"{experiment}-classifier")


def check_name(name: str) -> None:
    """MLflow refuses '/' and ':' in names; say so before anything is written."""
    if not name.strip() or "/" in name or ":" in name:
        raise RegistryError(f"invalid registered model name '{name}': use a non-empty name "
                            "without '/' or ':'")


def lower_is_better(metric: str) -> bool:
    """Losses (overall and per class), calibration error and cost: smaller is better."""
    return bool(LOWER_IS_BETTER.match(metric))


def selection_metric(metric: str) -> str:
    """The validation counterpart of a promotion metric (`test_acc` -> `val_acc`): candidates
    are chosen on validation so that the test split only judges, never selects. Cost metrics
    (latency, size) have no split and choose as themselves."""
    if metric.startswith(JUDGED_PREFIX):
        return CHOSEN_PREFIX + metric[len(JUDGED_PREFIX):]
    return metric


def metric_split(metric: str) -> str:
    """'validation split', 'test split', or 'cost, no split': what a metric was measured on."""
    return next((split for prefix, split in METRIC_SPLITS.items() if metric.startswith(prefix)),
                "cost, no split")


def criteria_line(selection: str, judgement: str) -> str:
    """The one line the pipeline's table and the report print about how the champion is found."""
    return (f"candidate chosen by {selection} ({metric_split(selection)}); promotion judged on "
            f"{judgement} ({metric_split(judgement)})")


def model_description(name: str, experiment: str) -> str:
    """The registered model's description with its real name (Markdown in the MLflow UI, where
    angle brackets would be eaten as HTML tags): how to serve and load the champion."""
    uri = f"models:/{name}@{CHAMPION}"
    return (f"cnnflow image classifiers of experiment {experiment}. Serve the champion: "
            f"`mlflow models serve -m {uri} --env-manager local`. Load it: "
            f"`mlflow.pyfunc.load_model('{uri}')`.")


# --------------------------------------------------------------------------------------------
# Looking things up
# --------------------------------------------------------------------------------------------


def get_version(client: MlflowClient, name: str, version: str | int) -> ModelVersion:
    """A version by number, or a one-line error."""
    try:
        return client.get_model_version(name, str(version))
    except MlflowException:
        raise RegistryError(f"registered model '{name}' has no version {version}: "
                            "cnnflow compare or the MLflow UI lists the versions") from None


def get_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    """The version holding `alias`, or None (also when the registered model does not exist)."""
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def require_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion:
    version = get_alias(client, name, alias)
    if version is None:
        raise RegistryError(f"registered model '{name}' has no alias '{alias}': evaluate a "
                            "model first (cnnflow evaluate --run-id ...)")
    return version


def _registered(client: MlflowClient, model_uri: str) -> ModelVersion | None:
    """The version behind `models:/<name>@alias` or `/<version>`; None for `models:/m-<id>`."""
    if m := _ALIAS_URI.match(model_uri):
        return require_alias(client, m["name"], m["alias"])
    if m := _VERSION_URI.match(model_uri):
        return get_version(client, m["name"], m["version"])
    if _LOGGED_URI.match(model_uri):
        return None
    raise RegistryError(f"unsupported model URI '{model_uri}': use models:/<name>@<alias>, "
                        "models:/<name>/<version> or a run id")


def source_run_id(client: MlflowClient, model_uri: str) -> str:
    """The run that logged the model behind `models:/<name>@alias`, `/<version>` or `/m-<id>`."""
    version = _registered(client, model_uri)
    if version is None:
        model_id = _LOGGED_URI.match(model_uri)["model_id"]
        try:
            logged = client.get_logged_model(model_id)
        except MlflowException:
            raise RegistryError(f"logged model '{model_id}' does not exist on this "
                                "tracking server") from None
        if not logged.source_run_id:
            raise RegistryError(f"{model_uri} was not logged from a run: nothing to evaluate "
                                "it against")
        return logged.source_run_id
    if not version.run_id:
        raise RegistryError(f"{model_uri} has no source run: register models through "
                            "cnnflow evaluate")
    return version.run_id


def logged_model_id(client: MlflowClient, model_uri: str) -> str | None:
    """The `m-<id>` of the MLflow 3 logged model behind a `models:/` URI (None when a version
    was registered from files): evaluate links its metrics to it, so the model's page in the
    UI shows them."""
    if m := _LOGGED_URI.match(model_uri):
        return m["model_id"]
    version = _registered(client, model_uri)
    return getattr(version, "model_id", None) or None


def _metric(client: MlflowClient, version: ModelVersion, metric: str) -> float | None:
    """The version's metric: its tag (set at registration), else its run's latest value."""
    if metric in version.tags:
        return float(version.tags[metric])
    if version.run_id:
        try:
            return client.get_run(version.run_id).data.metrics.get(metric)
        except MlflowException:
            return None
    return None


# --------------------------------------------------------------------------------------------
# Registering
# --------------------------------------------------------------------------------------------


def register_version(client: MlflowClient, model_uri: str, run: Run, name: str,
                     metrics: dict[str, float], digest: str, dataset: str = "") -> ModelVersion:
    """A new version of `name` for the model, tagged with its test and validation metrics
    (test judges, validation chooses), with the alias `challenger`.

    All or nothing: when a later step fails, the version (and a registered model this call
    created) is deleted again, so a failure never leaves a half-registered model.
    """
    check_name(name)
    tags = {RUN_TAG: run.info.run_id, RUN_NAME_TAG: run.info.run_name or "",
            MODEL_TAG: run.data.tags.get(MODEL_TAG, ""),
            STEP_TAG: run.data.tags.get(STEP_TAG, ""),
            DATASET_TAG: dataset or run.data.tags.get(DATASET_TAG, ""),
            DATASET_DIGEST_TAG: digest}
    tags.update({k: repr(float(metrics[k])) for k in (*VERSION_METRICS, *VALIDATION_METRICS)
                 if k in metrics})
    created_model = False
    try:
        existing = client.get_registered_model(name)
    except MlflowException:
        existing = None
    if existing is None or "<" in (existing.description or ""):  # new, or the old text
        description = model_description(
            name, client.get_experiment(run.info.experiment_id).name)
        if existing is None:
            client.create_registered_model(name, description=description)
            created_model = True
        else:
            client.update_registered_model(name, description=description)
    version = None
    try:
        m = _LOGGED_URI.match(model_uri)
        with _quiet_registry():
            version = client.create_model_version(
                name, source=model_uri, run_id=run.info.run_id, tags=tags,
                model_id=m["model_id"] if m else None)
        client.set_registered_model_alias(name, CHALLENGER, version.version)
    except BaseException:
        _undo(client, name, version, created_model)
        raise
    return client.get_model_version(name, version.version)


@contextlib.contextmanager
def _quiet_registry():
    """MLflow logs 'Waiting up to 300 seconds...' for every version; cnnflow prints its own."""
    logger = logging.getLogger("mlflow.store.model_registry.abstract_store")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _undo(client: MlflowClient, name: str, version: ModelVersion | None,
          created_model: bool) -> None:
    try:
        if created_model:
            client.delete_registered_model(name)
        elif version is not None:
            client.delete_model_version(name, version.version)
    except MlflowException:
        pass


# --------------------------------------------------------------------------------------------
# Choosing the candidate (validation), before promotion judges it (test)
# --------------------------------------------------------------------------------------------


@dataclass
class Ranking:
    """Candidates best first by `metric` (the one that actually ranked them), as
    (label, version, value); `fallback` says why it is not the validation metric."""

    metric: str
    ranked: list[tuple[str, str, float]]
    fallback: str = ""


def rank_versions(client: MlflowClient, name: str, versions: dict[str, str],
                  metric: str) -> Ranking:
    """`versions` (label -> version of `name`) best first by `selection_metric(metric)`, read
    from the version tags (ties keep the given order; versions without it are left out).

    When no version has the validation metric (a run split without validation images), the
    judgement metric ranks instead, and `fallback` says so: the choice then sees the test
    split, which the caller must report rather than hide.
    """
    tags = {label: get_version(client, name, v).tags for label, v in versions.items()}
    for chosen in dict.fromkeys((selection_metric(metric), metric)):
        scored = [(label, str(versions[label]), float(t[chosen])) for label, t in tags.items()
                  if chosen in t]
        if scored:
            sign = 1.0 if lower_is_better(chosen) else -1.0
            fallback = ("" if chosen == selection_metric(metric) else
                        f"no version has {selection_metric(metric)} (no validation split): "
                        f"chosen by {chosen}")
            return Ranking(chosen, sorted(scored, key=lambda s: sign * s[2]), fallback)
    raise RegistryError(f"no version of {name} among {', '.join(map(str, versions.values()))} "
                        f"has {selection_metric(metric)} or {metric}: evaluate them on the test "
                        "split first, or pass a metric evaluate records")


def choose_challenger(client: MlflowClient, name: str, versions: dict[str, str],
                      metric: str) -> Ranking:
    """Give `challenger` to the best of `versions` by the validation counterpart of `metric`
    (`promote` then judges that one challenger against the champion on `metric`, test split).
    Returns the ranking; its first entry is the challenger."""
    ranking = rank_versions(client, name, versions, metric)
    client.set_registered_model_alias(name, CHALLENGER, ranking.ranked[0][1])
    return ranking


# --------------------------------------------------------------------------------------------
# Promotion
# --------------------------------------------------------------------------------------------


@dataclass
class Decision:
    """What `promote` did and why (also written as tags on the candidate version)."""

    name: str
    version: str
    action: str  # promoted | kept | forced | rollback | manual
    reason: str
    champion_before: str | None

    @property
    def promoted(self) -> bool:
        return self.action != "kept"

    def line(self) -> str:
        """One line for the terminal: where `champion` points now, and why."""
        v, before = f"v{self.version}", f"v{self.champion_before}"
        return {
            "promoted": f"{self.name}: {v} is the new champion: {self.reason}",
            "forced": f"{self.name}: {v} is the new champion: {self.reason}",
            "rollback": f"{self.name}: champion rolled back to {v} (was {before})",
            "manual": f"{self.name}: champion set to {v}: {self.reason}",
            "kept": (f"{self.name}: champion stays {before}: {self.reason}"
                     if self.champion_before else f"{self.name}: {self.reason}"),
        }[self.action]


def decide(candidate: ModelVersion, champion: ModelVersion | None, metric: str,
           candidate_value: float | None, champion_value: float | None, min_delta: float,
           force: bool) -> tuple[str, str]:
    """The promotion rule as a pure function: (action, reason)."""
    v = candidate.version
    if champion is not None and champion.version == v:
        return "kept", f"v{v} already is the champion"
    if candidate_value is None and not force:
        raise RegistryError(f"version {v} has no {metric}: evaluate its run first, or "
                            "promote with --force")
    if champion is None:
        return "promoted", "no champion yet"
    if force:
        return "forced", f"--force (champion was v{champion.version})"
    digest = candidate.tags.get(DATASET_DIGEST_TAG)
    champion_digest = champion.tags.get(DATASET_DIGEST_TAG)
    if not digest or digest != champion_digest:
        return "kept", (f"v{v} was evaluated on a different dataset split than champion "
                        f"v{champion.version} (digest {str(digest)[:12]} vs "
                        f"{str(champion_digest)[:12]}): not comparable; use --force")
    if champion_value is None:
        return "kept", (f"champion v{champion.version} has no {metric} to compare with; "
                        "use --force")
    gain = (champion_value - candidate_value if lower_is_better(metric)
            else candidate_value - champion_value)
    compared = (f"{metric} {candidate_value:.4f} vs champion v{champion.version}'s "
                f"{champion_value:.4f}")
    if gain > 0 and gain >= min_delta:
        return "promoted", f"{compared}: better by {gain:.4f} (min_delta {min_delta:g})"
    return "kept", f"{compared}: not better by at least min_delta {min_delta:g}"


def promote(client: MlflowClient, name: str, *, version: str | int | None = None,
            metric: str = "test_acc", min_delta: float = 0.0,
            force: bool = False) -> Decision:
    """Apply the promotion rule to the challenger (or make `version` champion: a rollback).

    Everything is checked before the first write; the decision tags are written before the
    alias moves, so a champion never changes without its reason on record.
    """
    check_name(name)
    if min_delta < 0:
        raise RegistryError(f"min_delta must be >= 0 (got {min_delta})")
    champion = get_alias(client, name, CHAMPION)
    if version is not None and str(version) != "":
        candidate = get_version(client, name, version)
        if champion is not None and champion.version == candidate.version:
            action, reason = "kept", f"v{candidate.version} already is the champion"
        elif champion is not None and int(candidate.version) < int(champion.version):
            action, reason = "rollback", f"explicit --version (champion was v{champion.version})"
        else:
            before = f"v{champion.version}" if champion is not None else "none"
            action, reason = "manual", f"explicit --version (champion was {before})"
    else:
        candidate = require_alias(client, name, CHALLENGER)
        action, reason = decide(candidate, champion, metric, _metric(client, candidate, metric),
                                None if champion is None else _metric(client, champion, metric),
                                min_delta, force)
    decision = Decision(name, candidate.version, action, reason,
                        champion.version if champion is not None else None)
    if champion is not None and champion.version == candidate.version:
        return decision  # nothing changes; keep the tags that explain how it became champion
    _write_decision(client, decision)
    if decision.promoted:
        client.set_registered_model_alias(name, CHAMPION, candidate.version)
        _announce(client, decision, candidate, champion, metric)
    return decision


def _announce(client: MlflowClient, decision: Decision, new: ModelVersion,
              old: ModelVersion | None, metric: str) -> None:
    """Alert (components.notify): `@champion` moved, with both versions' `metric`."""
    if not notify.enabled():
        return
    with contextlib.suppress(Exception):  # the alias moved; an alert never undoes that
        notify.new_champion(decision.name, new.version, decision.champion_before, metric,
                            _metric(client, new, metric),
                            None if old is None else _metric(client, old, metric),
                            decision.reason,
                            version_url(client.tracking_uri, decision.name, new.version))


def _write_decision(client: MlflowClient, decision: Decision) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for key, value in ((DECISION_TAG, decision.action), (REASON_TAG, decision.reason),
                       (DECISION_TIME_TAG, stamp)):
        client.set_model_version_tag(decision.name, decision.version, key, value)


def version_aliases(client: MlflowClient, name: str) -> dict[str, list[str]]:
    """version -> its aliases, asked of the registered model: the versions that
    `search_model_versions` returns carry no aliases."""
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        return {}
    found: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        found.setdefault(str(version), []).append(alias)
    return {v: sorted(a) for v, a in found.items()}


class AliasLookup:
    """`version_aliases` for many versions, one registry request per model name."""

    def __init__(self, client: MlflowClient) -> None:
        self.client = client
        self.by_name: dict[str, dict[str, list[str]]] = {}

    def __call__(self, name: str, version: str | int) -> list[str]:
        if name not in self.by_name:
            self.by_name[name] = version_aliases(self.client, name)
        return self.by_name[name].get(str(version), [])


def version_summary(client: MlflowClient, name: str) -> list[dict[str, Any]]:
    """Every version of `name` with its aliases, run and decision (newest first)."""
    try:
        quote = '"' if "'" in name else "'"  # MLflow's filter has no escapes
        versions = client.search_model_versions(f"name = {quote}{name}{quote}")
    except MlflowException:
        return []
    aliases = version_aliases(client, name)
    rows = []
    for v in sorted(versions, key=lambda v: -int(v.version)):
        rows.append({"version": int(v.version),
                     "aliases": ",".join(aliases.get(str(v.version), [])),
                     "run_id": v.run_id, "decision": v.tags.get(DECISION_TAG, ""),
                     "reason": v.tags.get(REASON_TAG, "")})
    return rows
