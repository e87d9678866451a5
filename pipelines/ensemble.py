"""`cnnflow ensemble` / `mlflow run . -e ensemble`: combine trained runs into one model."""

from __future__ import annotations

import click

from components.steps.params import EnsembleParams
from pipelines.options import (
    dataclass_options,
    job_run_id,
    next_step,
    reachable_tracking_uri,
    user_errors,
)


@click.command()
@dataclass_options(EnsembleParams)
def ensemble_command(**kwargs) -> None:
    """Soft-vote trained models (or bag new ones) into one logged, servable model.

    With --bagging N the training options train N members on bootstrap samples first.
    """
    from components.steps.ensemble import run_ensemble
    from components.tracking.comparison import text_table

    with user_errors():
        params, uri = EnsembleParams(**kwargs), reachable_tracking_uri()
        outcome = run_ensemble(params, uri, job_run_id=job_run_id(params.experiment, uri))
    columns = [c for c in ("member", "model", "weight", "val_acc", "val_loss", "test_acc",
                           "test_loss") if any(c in row for row in outcome.table)]
    click.echo(text_table(outcome.table, columns), err=True)
    m = outcome.metrics
    click.echo(f"{outcome.run_name}  run {outcome.run_id}  {len(outcome.members)} members  "
               f"test_acc {m.get('test_acc', float('nan')):.4f}")
    next_step(f"cnnflow evaluate --run-id {outcome.run_id}",
              "cost, and a registry version of the ensemble")


ensemble_command.name = "ensemble"

if __name__ == "__main__":
    ensemble_command()
