"""`cnnflow train` / `mlflow run . -e train`: train one model as one MLflow run."""

from __future__ import annotations

import dataclasses
import os
import sys

import click

from components.params import ParamError, bool_text
from components.steps.params import TrainParams
from pipelines.options import (
    dataclass_options,
    job_run_id,
    next_step,
    option_name,
    reachable_tracking_uri,
    shell_args,
    user_errors,
)


@click.command()
@dataclass_options(TrainParams)
def train(**kwargs) -> None:
    """Train one model; every epoch is logged to MLflow as it happens."""
    params = TrainParams(**kwargs)
    if (params.nproc > 1 or params.nnodes > 1) and os.environ.get("WORLD_SIZE", "1") == "1":
        _launch(params)  # not yet under torchrun: start it
        return
    from components.steps.train import train as run_training

    if params.cv:
        _train_cv(params)
        return
    with user_errors():
        uri = reachable_tracking_uri()
        outcome = run_training(params, uri, job_run_id=job_run_id(params.experiment, uri))
    if not outcome.run_id:  # a worker rank of a --nproc run: rank 0 reports
        return
    r = outcome.result
    early = ", stopped early" if r.stopped_early else ""
    click.echo(f"{outcome.run_name}  run {outcome.run_id}  best_val_acc {r.best_val_acc:.4f} "
               f"(epoch {r.best_epoch}/{r.epochs_run}{early})  {outcome.url}")
    next_step(f"cnnflow evaluate --run-id {outcome.run_id}",
              "test metrics, cost, and a registry version")


# Options torchrun acts on: the workers read the world it made from its environment instead.
LAUNCH_OPTIONS = ("nproc", "nnodes", *TrainParams.LAUNCH)


def _launch(params: TrainParams) -> None:
    """Re-run this command under torchrun: nproc processes on this machine, which joins
    nnodes machines at rdzv_endpoint when there are several; exit with its code.

    Validated here first, so a bad value is one line and no worker starts; a rendezvous that
    fails is one line too, and no MLflow run exists by then (rank 0 opens it after).
    """
    _quiet_cpp_warnings()
    from components.nn.distributed import launch

    with user_errors():
        params.validate()
        job = job_run_id(params.experiment, reachable_tracking_uri())  # before any worker
        if job and params.nnodes > 1:
            raise ParamError("nnodes > 1 starts with `cnnflow train` on every node: under "
                             "`mlflow run` each node would have its own run")
    args = []
    for field in dataclasses.fields(TrainParams):
        if field.name not in LAUNCH_OPTIONS:
            args += [option_name(field.name), str(bool_text(getattr(params, field.name)))]
    with user_errors():
        code = launch(["pipelines.train", *args], params.nproc, params.nnodes,
                      params.node_rank, params.rdzv_endpoint, params.rdzv_timeout)
    if code:
        sys.exit(code)


def _quiet_cpp_warnings() -> None:
    """Keep torch's C++ warnings out of the launcher: when node 0 finishes first, another
    node's agent warns with a stack trace that its store is gone, after a run that went
    well. TORCH_CPP_LOG_LEVEL is read once, as torch loads (a user's own value wins); the
    workers get the environment back as it was."""
    if "torch" in sys.modules or "TORCH_CPP_LOG_LEVEL" in os.environ:
        return
    os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"
    try:
        import torch  # noqa: F401 - loads libc10, which reads the level now
    finally:
        del os.environ["TORCH_CPP_LOG_LEVEL"]


def _train_cv(params: TrainParams) -> None:
    from components.steps.crossval import run_cv

    with user_errors():
        uri = reachable_tracking_uri()
        outcome = run_cv(params, uri, job_run_id=job_run_id(params.experiment, uri))
    m = outcome.metrics
    click.echo(f"{outcome.run_name}  run {outcome.run_id}  {len(outcome.folds)} folds  "
               f"val_acc {m['cv_val_acc_mean']:.4f} ± {m['cv_val_acc_std']:.4f}  "
               f"val_loss {m['cv_val_loss_mean']:.4f} ± {m['cv_val_loss_std']:.4f}  "
               f"{outcome.url}")
    if outcome.ensemble_run_id:
        click.echo(f"fold ensemble run {outcome.ensemble_run_id}")
    if outcome.label_issues is not None:
        from components.steps.label_issues import summary

        for line in summary(outcome.label_issues):
            click.echo(line)
    if outcome.ensemble_run_id:
        next_step(f"cnnflow evaluate --run-id {outcome.ensemble_run_id}",
                  "test metrics and a registry version of the fold ensemble")
    else:
        same = {"data": params.data, "model": params.model,
                **({"experiment": params.experiment} if params.experiment else {})}
        next_step(f"cnnflow train {shell_args(same)}", "one model on the whole train split")


if __name__ == "__main__":
    train()
