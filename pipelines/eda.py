"""`cnnflow eda` / `mlflow run . -e eda`: a dataset report as Markdown + PNGs and an MLflow run."""

from __future__ import annotations

import click

from components.steps.params import EdaParams
from pipelines.options import dataclass_options, job_run_id, reachable_tracking_uri, user_errors


@click.command()
@dataclass_options(EdaParams)
def eda(**kwargs) -> None:
    """Report what is in a dataset: counts, sizes, modes, broken files, duplicates, leakage."""
    from components.steps.eda import run_eda

    params = EdaParams(**kwargs)
    with user_errors():
        params.validate()
        uri = reachable_tracking_uri()
        outcome = run_eda(params, uri, job_run_id=job_run_id(params.experiment, uri))
    for finding in outcome.findings:
        click.echo(f"- {finding}")
    click.echo(f"{outcome.run_name}  run {outcome.run_id}  report "
               f"{outcome.report_dir / 'report.md'}")


if __name__ == "__main__":
    eda()
