"""`cnnflow tune` / `mlflow run . -e tune`: an Optuna study of nested training runs."""

from __future__ import annotations

import click

from components.steps.params import TuneParams
from pipelines.options import (
    dataclass_options,
    job_run_id,
    next_step,
    reachable_tracking_uri,
    shell_args,
    user_errors,
)


@click.command()
@dataclass_options(TuneParams)
def tune_command(**kwargs) -> None:
    """Search hyperparameters with Optuna; every trial is a nested training run."""
    from components.steps.tune import check, run_tune

    params = TuneParams(**kwargs)
    with user_errors():
        check(params)
        uri = reachable_tracking_uri()
        outcome = run_tune(params, uri, job_run_id=job_run_id(params.experiment, uri))
    click.echo(f"{outcome.run_name}  run {outcome.run_id}  study {outcome.study}  "
               f"best {params.metric} {outcome.best_value:.4f}  {outcome.best_params}  "
               f"({outcome.n_complete} complete, {outcome.n_pruned} pruned, "
               f"{outcome.n_failed} failed)")
    if outcome.retrained_run_id:
        click.echo(f"retrained run {outcome.retrained_run_id}  {outcome.retrained_metrics}")
        next_step(f"cnnflow evaluate --run-id {outcome.retrained_run_id}",
                  "cost, and a registry version of the retrained best configuration")
    elif outcome.best_params:
        next_step(f"cnnflow train {shell_args(best_configuration(params, outcome.best_params))}",
                  "the best configuration with the full epochs")


def best_configuration(params: TuneParams, best: dict) -> dict:
    """The `cnnflow train` options of the best trial: what this tune run set beyond train's
    defaults (data, experiment, recipe), its model, the best values, and the full epochs."""
    from components.params import inherited
    from components.steps.params import TrainParams

    defaults = TrainParams()
    given = {name: getattr(params, name) for name in inherited(TuneParams, TrainParams)
             if getattr(params, name) != getattr(defaults, name)}
    return {**given, "model": params.model.split(",")[0].strip(), **best}


tune_command.name = "tune"

if __name__ == "__main__":
    tune_command()
