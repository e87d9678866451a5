"""`cnnflow lr-find` / `mlflow run . -e lr_find`: the learning-rate range test on the model
and data `train` would use; prints the suggested LR and the train command that uses it."""

from __future__ import annotations

import click

from components.steps.params import LrFindParams
from pipelines.options import dataclass_options, job_run_id, reachable_tracking_uri, user_errors


@click.command()
@dataclass_options(LrFindParams)
def lr_find_command(**kwargs) -> None:
    """Sweep the learning rate over a few hundred batches; suggest one, logged as a run."""
    from components.steps.lr_find import run_lr_find, summary

    params = LrFindParams(**kwargs)
    with user_errors():
        params.validate()
        uri = reachable_tracking_uri()
        outcome = run_lr_find(params, uri, job_run_id=job_run_id(tracking_uri=uri))
    for line in summary(outcome):
        click.echo(line)


lr_find_command.name = "lr-find"

if __name__ == "__main__":
    lr_find_command()
