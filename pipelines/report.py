"""`cnnflow report`: the experiment's report (Markdown, self-contained HTML, PDF when possible)."""

from __future__ import annotations

import click

from components.steps.report import PDF_CHOICES, build_report
from pipelines.options import reachable_tracking_uri, user_errors


@click.command()
@click.option("--experiment", default="digits", show_default=True,
              help="MLflow experiment (the dataset's name unless train got --experiment).")
@click.option("--reports-dir", default="reports", show_default=True,
              help="The report goes to <reports-dir>/<experiment>/.")
@click.option("--pipeline-run", default="", show_default=True,
              help="Report the runs of this pipeline run (default: the latest finished runs).")
@click.option("--pdf", type=click.Choice(PDF_CHOICES, case_sensitive=False), default="auto",
              show_default=True,
              help="auto: a PDF when chromium or wkhtmltopdf is installed; true: required.")
def report_command(experiment: str, reports_dir: str, pipeline_run: str, pdf: str) -> None:
    """Data, models, cost, confusion matrices, tuning and registry in one document."""
    with user_errors():
        outcome = build_report(reachable_tracking_uri(), experiment, reports_dir=reports_dir,
                               pipeline_run_id=pipeline_run, pdf=pdf, log=lambda s: None)
    click.echo(f"wrote {outcome.markdown}")
    click.echo(f"wrote {outcome.html}")
    click.echo(f"wrote {outcome.pdf}" if outcome.pdf else f"no PDF: {outcome.pdf_note}")
    click.echo(f"logged into run {outcome.run_id} (artifacts report/)")


report_command.name = "report"

if __name__ == "__main__":
    report_command()
