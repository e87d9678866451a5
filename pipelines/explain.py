"""`cnnflow explain` / `mlflow run . -e explain`: Grad-CAM of a model on your own images."""

from __future__ import annotations

import click

from components.steps.params import ExplainParams
from pipelines.options import dataclass_options, job_run_id, reachable_tracking_uri, user_errors


@click.command()
@dataclass_options(ExplainParams)
def explain_command(**kwargs) -> None:
    """Prediction, top-3 and Grad-CAM map of each image, as figures and one HTML page."""
    from components.steps.explain import run_explain

    params = ExplainParams(**kwargs)
    with user_errors():
        params.validate()
        uri = reachable_tracking_uri()
        outcome = run_explain(params, uri, job_run_id=job_run_id(params.experiment, uri))
    click.echo(f"{outcome.run_name}  run {outcome.run_id}  {outcome.n_images} images "
               f"explained with {outcome.model_uri}")
    for note in outcome.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(outcome.index.resolve())


explain_command.name = "explain"

if __name__ == "__main__":
    explain_command()
