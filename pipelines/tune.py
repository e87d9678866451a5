"""`cnnflow tune` / `mlflow run . -e tune`: an Optuna study of nested training runs."""

from __future__ import annotations

import click

from components.steps.params import TuneParams
from pipelines.options import dataclass_options, job_run_id, reachable_tracking_uri, user_errors


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


tune_command.name = "tune"

if __name__ == "__main__":
    tune_command()
