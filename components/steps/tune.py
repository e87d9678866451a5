"""`tune`: an Optuna study whose trials are nested MLflow training runs.

The MNIST seed tuned lr, batch size, dropout, epochs and ReduceLROnPlateau patience/factor
with Optuna (98.76 % -> 99.28 %); the jellyfish seed used W&B sweeps. Here every trial is an
ordinary `train` run (same engine, same params, same artifacts) nested under one parent
`tune-vN` run, so MLflow's compare view lines trials up with every other run. The engine
reports the metric each epoch to the trial through a callback, so the pruner can stop a bad
trial early (the run ends KILLED with `cnnflow.pruned=true`).

The search space is a mapping `param -> spec` (YAML file or inline text), see `parse_space`.
Samplers, pruners and distributions are registries: adding one is one decorated function.
Studies live in Optuna RDB storage: an SQLite file under `.cnnflow/` by default, or a
PostgreSQL URL shared by many `cnnflow tune --study NAME` workers on many machines.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import random
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import optuna
import yaml
from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from components import notify, tracking
from components.errors import CnnflowError, one_line
from components.names import (
    BEST_PARAM_TAG_PREFIX,
    BEST_TRIAL_TAG,
    DATASET_TAG,
    EPOCH_METRICS,
    RETRAINED_RUN_TAG,
    STUDY_TAG,
    TRIAL_TAG,
)
from components.nn.engine import Callback
from components.nn.recipes import recipe_values
from components.params import split_list
from components.registrar import registrar
from components.settings import mask_text, mask_uri, sqlalchemy_url, url_backend
from components.steps.params import EvalParams, TrainParams, TuneParams
from components.steps.train import train

Space = dict[str, BaseDistribution]
# The epoch metrics a study can optimise: losses and accuracies.
TUNABLE_METRICS = tuple(m for m in EPOCH_METRICS if m.endswith(("_loss", "_acc")))


class TuneError(CnnflowError, RuntimeError):
    """Bad tuning input (space, sampler, pruner, storage); one line saying what to do."""


# --------------------------------------------------------------------------------------------
# Registries: distributions (search-space syntax), samplers, pruners
# --------------------------------------------------------------------------------------------

DISTRIBUTIONS: dict[str, Callable[..., BaseDistribution]] = {}
SAMPLERS: dict[str, Callable[[Space, int], optuna.samplers.BaseSampler]] = {}
PRUNERS: dict[str, Callable[[int], optuna.pruners.BasePruner]] = {}


# `name(a, b, ...)` in a search space calls the decorated fn(a, b, ...).
register_distribution = registrar(DISTRIBUTIONS, "distribution")
# A sampler builder fn(space, seed) / a pruner builder fn(max_epochs): `--sampler name` works.
register_sampler = registrar(SAMPLERS, "sampler")
register_pruner = registrar(PRUNERS, "pruner")


@register_distribution("uniform")
def _uniform(low: float, high: float) -> BaseDistribution:
    return FloatDistribution(float(low), float(high))


@register_distribution("loguniform")
def _loguniform(low: float, high: float) -> BaseDistribution:
    return FloatDistribution(float(low), float(high), log=True)


@register_distribution("int")
def _int(low: int, high: int, step: int = 1) -> BaseDistribution:
    return IntDistribution(int(low), int(high), step=int(step))


@register_distribution("logint")
def _logint(low: int, high: int) -> BaseDistribution:
    return IntDistribution(int(low), int(high), log=True)


@register_distribution("choice")
def _choice(*values: Any) -> BaseDistribution:
    return CategoricalDistribution(list(values))


@register_sampler("tpe")
def _tpe(space: Space, seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.TPESampler(seed=seed)


@register_sampler("random")
def _random(space: Space, seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


@register_sampler("grid")
def _grid(space: Space, seed: int) -> optuna.samplers.BaseSampler:
    """Grid search needs finite choices: every parameter must be a list (categorical)."""
    continuous = [k for k, d in space.items() if not isinstance(d, CategoricalDistribution)]
    if continuous:
        raise TuneError(f"sampler grid needs a list of values for every parameter; "
                        f"{', '.join(continuous)} are ranges: write e.g. lr: [0.001, 0.0001]")
    return optuna.samplers.GridSampler({k: list(d.choices) for k, d in space.items()},
                                       seed=seed)


@register_pruner("median")
def _median(max_epochs: int) -> optuna.pruners.BasePruner:
    # One finished trial and one epoch before judging: tiny studies still prune.
    return optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=1)


@register_pruner("hyperband")
def _hyperband(max_epochs: int) -> optuna.pruners.BasePruner:
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(max_epochs, 1))


@register_pruner("none")
def _no_pruner(max_epochs: int) -> optuna.pruners.BasePruner:
    return optuna.pruners.NopPruner()


# --------------------------------------------------------------------------------------------
# The search space
# --------------------------------------------------------------------------------------------

_CALL = re.compile(r"^\s*([A-Za-z_]\w*)\s*\((.*)\)\s*$")
_TRAIN_FIELDS = {f.name: f for f in fields(TrainParams)}
_NOT_TUNABLE = {"data", "experiment", "resume", "preprocess_run", "device", "num_workers",
                "cv", "cv_ensemble", "extra_train", "compile"}


def parse_space(text: str) -> tuple[Space, dict[str, Any]]:
    """A search space from a YAML file path or inline text; returns (space, fixed values).

    Each entry is `param: spec` with param a `train` parameter and spec one of
    `loguniform(1e-5, 1e-2)`, `uniform(0, 0.6)`, `int(1, 5)`, `int(2, 10, 2)`,
    `logint(8, 128)`, `choice(adam, sgd)`, a list `[16, 32, 64]` (categorical), or a plain
    value (fixed for every trial, e.g. `scheduler: plateau`). Inline text may separate
    entries with `;`: `lr: loguniform(1e-5, 1e-2); batch_size: [16, 32]`.
    """
    source = str(text or "").strip()
    if not source:
        raise TuneError("empty search space: pass --space FILE.yaml or e.g. "
                        "--space 'lr: loguniform(1e-5, 1e-2); batch_size: [16, 32, 64]'")
    path = Path(source).expanduser()
    if path.suffix.lower() in (".yaml", ".yml", ".json") or _is_file(path):
        if not path.is_file():
            raise TuneError(f"search space file {path} does not exist")
        source = path.read_text()
    else:
        source = "\n".join(part.strip() for part in source.split(";"))
    try:
        raw = yaml.safe_load(source)
    except yaml.YAMLError as exc:
        raise TuneError(f"search space is not valid YAML: {one_line(exc)}") from None
    if not isinstance(raw, dict) or not raw:
        raise TuneError("search space must map parameter names to specs, e.g. "
                        "'lr: loguniform(1e-5, 1e-2)'")
    space: Space = {}
    fixed: dict[str, Any] = {}
    for name, spec in raw.items():
        name = str(name)
        if name not in _TRAIN_FIELDS or name in _NOT_TUNABLE:
            tunable = sorted(set(_TRAIN_FIELDS) - _NOT_TUNABLE)
            raise TuneError(f"'{name}' is not a tunable train parameter: use one of "
                            f"{', '.join(tunable)}")
        kind = type(_TRAIN_FIELDS[name].default)
        if isinstance(spec, list):
            if not spec:
                raise TuneError(f"{name}: an empty list has nothing to choose from")
            space[name] = CategoricalDistribution([_cast(name, kind, v) for v in spec])
        elif isinstance(spec, str) and _CALL.match(spec):
            space[name] = _distribution(name, spec)
        elif isinstance(spec, str) and "(" in spec:
            raise TuneError(f"{name}: cannot read '{spec}': write e.g. loguniform(1e-5, 1e-2)")
        else:
            fixed[name] = _cast(name, kind, spec)
    if not space:
        raise TuneError("the search space has only fixed values: give at least one range "
                        "or list")
    return space, fixed


def _is_file(path: Path) -> bool:
    """False for inline text that cannot be a path (a long line, a newline inside)."""
    try:
        return "\n" not in str(path) and path.is_file()
    except OSError:
        return False


def _distribution(name: str, spec: str) -> BaseDistribution:
    fn_name, args_text = _CALL.match(spec).groups()  # type: ignore[union-attr]
    if fn_name not in DISTRIBUTIONS:
        raise TuneError(f"{name}: unknown distribution '{fn_name}' in '{spec}': use one of "
                        f"{', '.join(sorted(DISTRIBUTIONS))}, or a list [a, b, c]")
    try:
        args = yaml.safe_load(f"[{args_text}]") if args_text.strip() else []
        dist = DISTRIBUTIONS[fn_name](*args)
    except (TypeError, ValueError, yaml.YAMLError) as exc:
        raise TuneError(f"{name}: bad arguments in '{spec}' "
                        f"({one_line(exc)})") from None
    return dist


def _cast(name: str, kind: type, value: Any) -> Any:
    try:
        return kind(value) if not isinstance(value, kind) else value
    except (TypeError, ValueError):
        raise TuneError(f"{name}: '{value}' is not a {kind.__name__}") from None


# --------------------------------------------------------------------------------------------
# Pruning: the engine's epoch callback reports to the trial
# --------------------------------------------------------------------------------------------


class TrialPruned(optuna.TrialPruned):
    """Optuna's pruning signal, carrying how the training run should end (see training.train)."""

    run_status = "KILLED"
    run_tags = {"cnnflow.pruned": "true"}


class PruningCallback(Callback):
    """Reports `metric` each epoch; raises TrialPruned when the pruner says the trial is bad."""

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial = trial
        self.metric = metric

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        if self.metric not in metrics:
            raise TuneError(f"metric '{self.metric}' is not an epoch metric: use one of "
                            f"{', '.join(sorted(metrics))}")
        self.trial.report(float(metrics[self.metric]), epoch)
        if self.trial.should_prune():
            raise TrialPruned(f"pruned at epoch {epoch} ({self.metric} "
                              f"{metrics[self.metric]:.4g})")


# --------------------------------------------------------------------------------------------
# The `tune` step
# --------------------------------------------------------------------------------------------


def check(params: TuneParams) -> tuple[Space, dict[str, Any]]:
    """Everything checkable before a study or a run exists; returns the parsed space."""
    params.validate()  # the declared ranges (n_trials, timeout, trial_epochs, ...)
    space, fixed = parse_space(params.space)
    models = _models(params.model)
    if len(models) > 1:
        space["model"] = CategoricalDistribution(models)
    if params.n_trials < 1 and params.timeout <= 0:
        raise TuneError(f"n_trials must be >= 1 (got {params.n_trials}), or give a timeout")
    if params.metric not in TUNABLE_METRICS:
        raise TuneError(f"metric '{params.metric}' is not an epoch metric: use one of "
                        f"{', '.join(TUNABLE_METRICS)}")
    if params.direction not in ("minimize", "maximize"):
        raise TuneError(f"direction must be minimize or maximize (got '{params.direction}')")
    if params.sampler not in SAMPLERS:
        raise TuneError(f"unknown sampler '{params.sampler}': use one of "
                        f"{', '.join(sorted(SAMPLERS))}")
    if params.pruner not in PRUNERS:
        raise TuneError(f"unknown pruner '{params.pruner}': use one of "
                        f"{', '.join(sorted(PRUNERS))}")
    SAMPLERS[params.sampler](space, params.seed)  # grid checks its space here
    check_recipe_space(params.recipe, space, fixed)
    params.base(models[0], fixed).validate()
    return space, fixed


def check_recipe_space(recipe: str, space: Space, fixed: dict[str, Any]) -> None:
    """A trial's recipe fills every field left at its default (components/nn/recipes.py), so
    a space value equal to a default the recipe changes would silently become the preset's:
    one line naming it. Continuous ranges are left alone (they never draw one exact value)."""
    recipes = {str(fixed.get("recipe", recipe))}
    if isinstance(space.get("recipe"), CategoricalDistribution):
        recipes |= {str(choice) for choice in space["recipe"].choices}
    for name in sorted(recipes):
        for field_name, value in recipe_values(name).items():
            default = _TRAIN_FIELDS[field_name].default
            if value == default:
                continue
            dist = space.get(field_name)
            discrete = dist is not None and not (isinstance(dist, FloatDistribution)
                                                 and dist.step is None)
            if (fixed.get(field_name, object()) == default
                    or discrete and _can_draw(dist, default)):
                raise TuneError(f"{field_name}: the space holds {default!r}, which --recipe "
                                f"{name} turns into {value!r} in every trial: leave that value "
                                "out, or tune with --recipe none")


def _can_draw(dist: BaseDistribution, value: Any) -> bool:
    """Whether a list or a stepped range can give exactly `value`."""
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    step = getattr(dist, "step", None) or 1
    position = (value - dist.low) / step  # type: ignore[attr-defined]
    return dist.low <= value <= dist.high and math.isclose(position, round(position))  # type: ignore[attr-defined]


def _models(text: str) -> list[str]:
    models = split_list(text)
    if not models:
        raise TuneError("model is empty: name one model, or several separated by commas")
    return models


@dataclass
class TuneOutcome:
    run_id: str
    run_name: str
    study: str
    best_value: float
    best_params: dict[str, Any]
    n_complete: int
    n_pruned: int
    n_failed: int
    best_run_id: str = ""
    retrained_run_id: str = ""
    retrained_metrics: dict[str, float] = field(default_factory=dict)


def check_storage(params: TuneParams, attempts: int = 3) -> str:
    """Open the study's storage once before any run exists, so a mistyped --storage, a
    missing folder or a database that does not answer leaves no FAILED `tune-vN` run behind.
    Returns the storage URL.

    A database server is first reached once, within CONNECT_TIMEOUT_SEC (refused, unknown
    host, wrong password: one line, no retry). Tables are then created if missing (as the
    study would); database errors are retried, since workers started together race to create
    them (as in `_create_study`).
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import DBAPIError

    url = params.storage_url()
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - ArgumentError, ValueError: not a URL at all
        raise TuneError(f"--storage {mask_uri(url)} is not a database URL: write e.g. "
                        "sqlite:///path/to/optuna.db, postgresql://user:pass@host/db or auto"
                        ) from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        folder = Path(parsed.database).expanduser().resolve().parent
        if not folder.is_dir():
            raise TuneError(f"the folder of Optuna storage {mask_uri(url)} ({folder}) does not "
                            "exist: create it or pass another --storage")
    elif parsed.get_backend_name() != "sqlite":
        if params.storage == "auto":  # the database is ours to name, so ours to create
            _ensure_database(url)
        _reach_server(url)
    for attempt in range(attempts):
        try:
            storage = optuna.storages.RDBStorage(sqlalchemy_url(url), **_storage_kwargs(url))
            storage.engine.dispose()
            return url
        except Exception as exc:  # noqa: BLE001 - driver missing, refused, bad schema
            if attempt == attempts - 1 or not isinstance(exc, DBAPIError):  # a race: retry
                raise TuneError(f"cannot open Optuna storage {mask_uri(url)}: "
                                f"{_db_reason(exc)}") from None
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


def describe_storage(params: TuneParams, url: str) -> str:
    """One line saying which storage the study is in and why (password masked)."""
    if params.storage == "auto":
        why = ("auto: the PostgreSQL `cnnflow up --backend postgresql` started"
               if not url.startswith("sqlite") else
               "auto: no PostgreSQL started by `cnnflow up`, so the local SQLite file")
    else:
        why = "--storage" if params.storage else "the local SQLite file (default)"
    return f"optuna storage {mask_uri(url)} ({why})"


# A database server that does not answer within this many seconds is reported, not waited on.
CONNECT_TIMEOUT_SEC = 5
# SQLAlchemy engine options per backend: SQLite writers wait for the lock instead of failing
# at once; PostgreSQL connects within a bounded time and drops dead pooled connections.
ENGINE_KWARGS: dict[str, dict[str, Any]] = {
    "sqlite": {"connect_args": {"timeout": 60}},
    "postgresql": {"connect_args": {"connect_timeout": CONNECT_TIMEOUT_SEC},
                   "pool_pre_ping": True},
}


def _engine_kwargs(url: str) -> dict[str, Any]:
    return ENGINE_KWARGS.get(url_backend(url), {})


def _storage_kwargs(url: str) -> dict[str, Any]:
    kwargs = _engine_kwargs(url)
    return {"engine_kwargs": kwargs} if kwargs else {}


def _db_reason(exc: BaseException) -> str:
    """The driver's own words (`exc.orig`), not SQLAlchemy's wrapper, on one masked line."""
    orig = getattr(exc, "orig", None) or exc
    return mask_text(f"{type(orig).__name__}: {one_line(str(orig).strip())}")


def _reach_server(url: str) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(sqlalchemy_url(url), **_engine_kwargs(url))
    try:
        with engine.connect():
            pass
    except Exception as exc:  # noqa: BLE001 - refused, timeout, auth, unknown database
        raise TuneError(f"cannot open Optuna storage {mask_uri(url)}: {_db_reason(exc)}: "
                        "check the host, port, user, password and database, or pass "
                        "another --storage") from None
    finally:
        engine.dispose()


def _ensure_database(url: str) -> None:
    """Create the database of an `auto` storage on the server `cnnflow up` started, once;
    a worker that lost the race to create it finds it there on a second look."""
    from sqlalchemy.engine import make_url

    from components.services import create_database, postgres_uri

    admin, name = postgres_uri(), make_url(url).database
    if not admin or not name:
        return
    for attempt in range(2):
        try:
            create_database(admin, name, timeout=CONNECT_TIMEOUT_SEC)
            return
        except Exception as exc:  # noqa: BLE001 - server gone, or created meanwhile
            if attempt:
                raise TuneError(f"cannot create the Optuna database on {mask_uri(admin)}: "
                                f"{_db_reason(exc)}: is `cnnflow up --backend postgresql` "
                                "still running? (`cnnflow status`)") from None


def open_study(params: TuneParams, space: Space, study_name: str) -> tuple[optuna.Study, bool]:
    """Create the study, or join it when another worker already did; returns (study, whether
    this worker created it: the creator opens the study's parent run)."""
    url = params.storage_url()
    try:
        study, created = _create_study(url, _storage_kwargs(url), params, space, study_name)
    except ValueError as exc:  # e.g. joining a study created with the other direction
        raise TuneError(f"cannot open study '{study_name}' in {mask_uri(url)}: "
                        f"{one_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy errors are many; one line each
        raise TuneError(f"cannot open Optuna storage {mask_uri(url)}: "
                        f"{_db_reason(exc)}") from None
    existing = study.direction.name.lower()
    if existing != params.direction:  # Optuna would silently keep the study's own direction
        raise TuneError(f"study '{study_name}' in {mask_uri(url)} was created to {existing}; "
                        f"pass --direction {existing} or another --study")
    return study, created


def _create_study(url: str, kwargs: dict[str, Any], params: TuneParams, space: Space,
                  study_name: str, attempts: int = 3) -> tuple[optuna.Study, bool]:
    """Workers started together race to create the schema and the study: the database lets
    one create it (DuplicatedStudyError for the others, who load it); the loser of the schema
    race finds it on a retry, so a retry (not an error) is the right answer."""
    for attempt in range(attempts):
        try:
            storage = optuna.storages.RDBStorage(sqlalchemy_url(url), **kwargs)
            sampler = SAMPLERS[params.sampler](space, params.seed)
            pruner = PRUNERS[params.pruner](params.trial_epochs or params.epochs)
            try:
                return optuna.create_study(storage=storage, study_name=study_name,
                                           direction=params.direction, sampler=sampler,
                                           pruner=pruner), True
            except optuna.exceptions.DuplicatedStudyError:
                return optuna.load_study(study_name=study_name, storage=storage,
                                         sampler=sampler, pruner=pruner), False
        except ValueError:
            raise
        except Exception:  # noqa: BLE001 - SQLAlchemy's integrity/operational errors
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable")


# The study remembers its parent run, per experiment, so every worker nests its trials there.
PARENT_ATTR = "cnnflow.parent_run.{exp_id}"
# How long a worker that joined a study without a parent run yet waits for the worker that
# created the study to open it (then it opens one itself: a study made by plain Optuna).
PARENT_WAIT_SEC = 30.0


def _study_parent(client: MlflowClient, study: optuna.Study, exp_id: str,
                  wait: float) -> str | None:
    """The live parent run of the study in this experiment, waiting up to `wait` seconds for
    the creator to record it; None: open one (then `_remember_parent`)."""
    key = PARENT_ATTR.format(exp_id=exp_id)
    deadline = time.monotonic() + wait
    while True:
        run_id = study.user_attrs.get(key)
        if run_id:
            try:
                run = client.get_run(run_id)
            except Exception:  # noqa: BLE001 - another tracking server's run: not ours
                return None
            return run_id if run.info.lifecycle_stage == "active" else None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


def _remember_parent(study: optuna.Study, exp_id: str, run_id: str) -> None:
    study.set_user_attr(PARENT_ATTR.format(exp_id=exp_id), run_id)


def run_tune(params: TuneParams, tracking_uri: str,
             log: Callable[[str], None] = lambda s: print(s, file=sys.stderr), *,
             job_run_id: str | None = None) -> TuneOutcome:
    """Run the study as a `tune-vN` parent run with one nested training run per trial
    (`job_run_id`: the run opened for this job, filled in as the parent instead of a new one).

    Workers joining a named study (same --study and --storage) share its parent run: the
    worker that created the study opens it and records it in the study; the others nest their
    trials under it (a joining `mlflow run` job's own run is nested there too)."""
    space, fixed = check(params)
    client = tracking.connect(tracking_uri)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Fail on a bad dataset before a run exists (train() would only fail inside a trial).
    from components.data.datasets import load_splits
    splits = load_splits(params.data, val_ratio=params.val_ratio,
                         test_ratio=params.test_ratio, seed=params.seed, verify=False)
    # The storage, then a named (shared) study, are opened first: a bad storage or direction
    # creates no run; an unnamed study is named after the run, so it is opened in it.
    url = check_storage(params)
    log(describe_storage(params, url))
    experiment = params.experiment or splits.name
    study, created = open_study(params, space, params.study) if params.study else (None, True)
    parent = worker_run = None
    if study is not None:
        exp_id = (client.get_run(job_run_id).info.experiment_id if job_run_id
                  else tracking.experiment_id(client, experiment))
        fresh = not created and not study.get_trials(deepcopy=False)
        parent = _study_parent(client, study, exp_id, PARENT_WAIT_SEC if fresh else 0.0)
    if parent is None:
        run_id, exp_id, run_name = tracking.open_run(client, step="tune", experiment=experiment,
                                                     adopt=job_run_id)
    else:
        run_id, run_name = parent, client.get_run(parent).info.run_name
        log(f"joining study '{params.study}': trials nest under {run_name} (run {run_id})")
        client.update_run(run_id, status="RUNNING")  # ended by a worker that finished first
        if job_run_id:
            worker_run, _, _ = tracking.open_run(client, step="tune-worker", adopt=job_run_id,
                                                 tags={MLFLOW_PARENT_RUN_ID: parent,
                                                       STUDY_TAG: params.study})
    study_name = params.study or f"tune-{run_id}"
    with contextlib.ExitStack() as ending:
        for run in filter(None, (worker_run, run_id)):
            ending.enter_context(tracking.ending_run(client, run))
        if study is None:
            study, created = open_study(params, space, study_name)
        logged = {f.name: getattr(params, f.name) for f in fields(params)}
        logged["storage"] = mask_uri(url)
        # The parent's params are its creator's (params never change); a joiner logs its own
        # only on its job run, when it has one.
        target = run_id if parent is None else worker_run
        if target:
            present = client.get_run(target).data.params  # `mlflow run` logged its -P values
            tracking.log_params_and_tags(
                client, target, {k: v for k, v in logged.items() if k not in present},
                {STUDY_TAG: study_name, DATASET_TAG: splits.name,
                 "cnnflow.optuna_storage": mask_uri(url)})
        if parent is None:
            _remember_parent(study, exp_id, run_id)
        objective = _objective(client, params, space, fixed, tracking_uri, run_id, study_name, log)
        study.optimize(objective, n_trials=params.n_trials if params.n_trials > 0 else None,
                       timeout=params.timeout or None, catch=(Exception,))
        outcome = _log_study(client, study, run_id, run_name, params)
        if params.retrain_best:
            with notify.muted():  # the study's alert below reports it
                _retrain(client, params, fixed, outcome, tracking_uri, run_id, log)
    notify.tune_finished(run_name, params.metric, outcome.best_value, outcome.best_params, {
        "complete": outcome.n_complete, "pruned": outcome.n_pruned, "failed": outcome.n_failed},
        tracking.run_url(tracking_uri, exp_id, run_id), outcome.retrained_metrics)
    return outcome


def suggest(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    """Ask the trial for one value through Optuna's public suggest_* API."""
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def _objective(client: MlflowClient, params: TuneParams, space: Space, fixed: dict[str, Any],
               tracking_uri: str, parent: str, study_name: str, log: Callable[[str], None]
               ) -> Callable[[optuna.Trial], float]:
    def objective(trial: optuna.Trial) -> float:
        sampled = {name: suggest(trial, name, dist) for name, dist in space.items()}
        model = sampled.pop("model", _models(params.model)[0])
        train_params = dataclasses.replace(params.base(model, fixed), **sampled)
        log(f"trial {trial.number}: {model} {sampled}")
        tags = {TRIAL_TAG: str(trial.number), STUDY_TAG: study_name}
        try:
            outcome = train(train_params, tracking_uri, progress=False, log=log,
                            parent_run_id=parent, run_tags=tags,
                            callbacks=[PruningCallback(trial, params.metric)])
        except TrialPruned:
            _remember_pruned_run(client, trial, parent)
            raise
        trial.set_user_attr("run_id", outcome.run_id)
        trial.set_user_attr("model", model)
        return objective_value(outcome.result.history, outcome.result.best_epoch, params.metric)
    return objective


def _remember_pruned_run(client: MlflowClient, trial: optuna.Trial, parent: str) -> None:
    runs = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent}' and "
                      f"tags.`{TRIAL_TAG}` = '{trial.number}'", max_results=1)
    if runs:
        trial.set_user_attr("run_id", runs[0].info.run_id)


def objective_value(history: list[dict[str, float]], best_epoch: int, metric: str) -> float:
    """The metric at the kept (best val_loss) checkpoint: the model the trial would hand on,
    so the study ranks the models it can actually deliver."""
    row = next((h for h in history if int(h["epoch"]) == best_epoch), history[-1])
    if metric not in row:
        raise TuneError(f"metric '{metric}' is not an epoch metric: use one of "
                        f"{', '.join(sorted(k for k in row if k != 'epoch'))}")
    return float(row[metric])


def _log_study(client: MlflowClient, study: optuna.Study, run_id: str, run_name: str,
               params: TuneParams) -> TuneOutcome:
    """Best params/value, the trial table and Optuna's figures of the whole study into the
    parent run. Workers sharing the parent each write it when they end, in any order: a
    worker writes again until no trial finished meanwhile, so the last write covers every
    trial; metrics carry step = finished trials, so a late write of an older best never wins."""
    while True:
        finished = _n_finished(study)
        outcome = _write_study(client, study, run_id, run_name, params, finished)
        if _n_finished(study) == finished:
            return outcome


def _n_finished(study: optuna.Study) -> int:
    return sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))


def _write_study(client: MlflowClient, study: optuna.Study, run_id: str, run_name: str,
                 params: TuneParams, step: int) -> TuneOutcome:
    states = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(t.state == s for t in trials) for s in
              (states.COMPLETE, states.PRUNED, states.FAIL)}
    metrics = {"n_trials_complete": counts[states.COMPLETE],
               "n_trials_pruned": counts[states.PRUNED], "n_trials_failed": counts[states.FAIL]}
    if not counts[states.COMPLETE]:
        tracking.log_metrics(client, run_id, metrics, step=step)
        raise TuneError(f"no trial of study '{study.study_name}' completed "
                        f"({counts[states.PRUNED]} pruned, {counts[states.FAIL]} failed): "
                        "see the trial runs' cnnflow.error tags")
    best = study.best_trial
    metrics["best_value"] = float(best.value)
    metrics[f"best_{params.metric}"] = float(best.value)
    best_params = {**best.params}
    tracking.log_metrics(client, run_id, metrics, step=step)
    stale = [k for k in client.get_run(run_id).data.tags
             if k.startswith(BEST_PARAM_TAG_PREFIX)
             and k[len(BEST_PARAM_TAG_PREFIX):] not in best_params]
    for key in stale:  # a parameter the new best trial does not have
        client.delete_tag(run_id, key)
    tracking.log_params_and_tags(
        client, run_id, {},
        {**{f"{BEST_PARAM_TAG_PREFIX}{k}": v for k, v in best_params.items()},
         BEST_TRIAL_TAG: str(best.number),
         "cnnflow.best_run_id": best.user_attrs.get("run_id", "")})
    with tempfile.TemporaryDirectory(prefix="cnnflow-tune-") as tmp:
        folder = Path(tmp)
        study.trials_dataframe().to_csv(folder / "trials.csv", index=False)
        client.log_artifact(run_id, str(folder / "trials.csv"), artifact_path="tune")
        figures = folder / "figures"
        figures.mkdir()
        _write_figures(study, figures)
        client.log_artifacts(run_id, str(figures), artifact_path="tune/figures")
    return TuneOutcome(run_id, run_name, study.study_name, float(best.value), best_params,
                       counts[states.COMPLETE], counts[states.PRUNED], counts[states.FAIL],
                       best_run_id=best.user_attrs.get("run_id", ""))


# name -> (matplotlib plot, plotly plot); each needs optuna.visualization's own conditions.
FIGURES = {
    "optimization_history": "plot_optimization_history",
    "param_importances": "plot_param_importances",
    "parallel_coordinate": "plot_parallel_coordinate",
    "slice": "plot_slice",
}


def _write_figures(study: optuna.Study, folder: Path) -> list[str]:
    """PNG through optuna.visualization.matplotlib (no kaleido needed); HTML through plotly
    when it is installed. A figure Optuna cannot draw yet (importances need 2+ complete
    trials with varied values) is skipped, with the reason in skipped.txt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from optuna.visualization import matplotlib as mpl_vis

    try:
        import plotly  # noqa: F401
        from optuna import visualization as plotly_vis
    except ImportError:
        plotly_vis = None
    skipped, written = [], []
    for name, fn in FIGURES.items():
        try:
            with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                logging.getLogger("optuna").setLevel(logging.ERROR)
                ax = getattr(mpl_vis, fn)(study)
                fig = _figure_of(ax)
                if not isinstance(ax, np.ndarray):  # multi-panel plots keep Optuna's layout
                    fig.set_size_inches(9, 5)
                    fig.tight_layout()
                fig.savefig(folder / f"{name}.png", dpi=100, bbox_inches="tight")
                plt.close(fig)
                written.append(f"{name}.png")
                if plotly_vis is not None:
                    getattr(plotly_vis, fn)(study).write_html(folder / f"{name}.html",
                                                              include_plotlyjs="cdn")
                    written.append(f"{name}.html")
        except Exception as exc:  # noqa: BLE001 - a figure never fails the study
            skipped.append(f"{name}: {type(exc).__name__}: {one_line(exc)}")
            plt.close("all")
    if plotly_vis is None:
        skipped.append("*.html: plotly is not installed (pip install plotly)")
    if skipped:
        (folder / "skipped.txt").write_text("\n".join(skipped) + "\n")
    return written


def _figure_of(ax: Any) -> Any:
    """Optuna returns one Axes, or an array of them (slice plots)."""
    import numpy as np

    if isinstance(ax, np.ndarray):
        return ax.flat[0].figure
    return ax.figure


def _retrain(client: MlflowClient, params: TuneParams, fixed: dict[str, Any],
             outcome: TuneOutcome, tracking_uri: str, parent: str,
             log: Callable[[str], None]) -> None:
    """Train the best configuration with the full epochs as a normal run, then evaluate it."""
    from components.steps.evaluate import evaluate

    best = dict(outcome.best_params)
    model = best.pop("model", _models(params.model)[0])
    train_params = dataclasses.replace(params.base(model, fixed), epochs=params.epochs, **best)
    if "epochs" in best:  # epochs was tuned: it is part of the configuration
        train_params.epochs = int(best["epochs"])
    log(f"retraining the best configuration: {model} {best}")
    # Next to the tune run (not the dataset's default experiment), as a run of its own.
    train_params.experiment = client.get_experiment(
        client.get_run(parent).info.experiment_id).name
    trained = train(train_params, tracking_uri, progress=False, log=log,
                    run_tags={"cnnflow.tuned_by": parent})
    evaluated = evaluate(EvalParams(run_id=trained.run_id, cost=False, register=False,
                                    num_workers=0), tracking_uri, log=log)
    outcome.retrained_run_id = trained.run_id
    outcome.retrained_metrics = {k: v for k, v in evaluated.metrics.items()
                                 if k in ("test_acc", "test_loss")}
    client.set_tag(parent, RETRAINED_RUN_TAG, trained.run_id)
    tracking.log_metrics(client, parent, {f"retrained_{k}": v
                                          for k, v in outcome.retrained_metrics.items()
                                          if math.isfinite(v)})
