"""`cnnflow label-issues` / `mlflow run . -e label_issues`: likely mislabelled images of a
cross-validation run, ranked with cleanlab; nothing is changed."""

from __future__ import annotations

import click

from components.steps.params import LabelIssuesParams
from pipelines.options import dataclass_options, job_run_id, reachable_tracking_uri, user_errors


@click.command()
@dataclass_options(LabelIssuesParams)
def label_issues_command(**kwargs) -> None:
    """Rank likely mislabelled images from a `train --cv K` run's out-of-fold predictions."""
    from components.steps.label_issues import run_label_issues, summary

    params = LabelIssuesParams(**kwargs)
    with user_errors():
        params.validate()
        uri = reachable_tracking_uri()
        outcome = run_label_issues(params, uri, job_run_id=job_run_id(tracking_uri=uri))
    for line in summary(outcome):
        click.echo(line)


label_issues_command.name = "label-issues"

if __name__ == "__main__":
    label_issues_command()
