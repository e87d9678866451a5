"""`cnnflow report`: the experiment's report (Markdown, self-contained HTML, PDF when possible)."""

from __future__ import annotations

import click

from components.params import DataParams
from components.steps.params import ReportsParams
from pipelines.options import dataclass_options, job_run_id, reachable_tracking_uri, user_errors


@click.command()
@click.option("--experiment", default=DataParams.data, show_default=True,
              help="MLflow experiment (the dataset's name unless train got --experiment).")
@dataclass_options(ReportsParams)
@click.option("--pipeline-run", default="",
              help="Report the runs of this pipeline run (default: the latest finished runs).")
@click.option("--pdf", default="auto", show_default=True, metavar="auto|true|false",
              help="auto: a PDF when chromium or wkhtmltopdf is installed; true: required.")
def report_command(experiment: str, reports_dir: str, pipeline_run: str, pdf: str) -> None:
    """Data, models, cost, confusion matrices, tuning and registry in one document."""
    from components.steps.report import build_report, check_pdf

    with user_errors():
        pdf = check_pdf(pdf)  # a bad value costs no server check
        outcome = build_report(reachable_tracking_uri(), experiment, reports_dir=reports_dir,
                               pipeline_run_id=pipeline_run, pdf=pdf, log=lambda s: None,
                               job_run_id=job_run_id())
    click.echo(f"wrote {outcome.markdown}")
    click.echo(f"wrote {outcome.html}")
    click.echo(f"wrote {outcome.pdf}" if outcome.pdf else f"no PDF: {outcome.pdf_note}")
    click.echo(f"logged into run {outcome.run_id} (artifacts report/)")


report_command.name = "report"

if __name__ == "__main__":
    report_command()
