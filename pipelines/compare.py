"""`cnnflow compare`: the experiment's models side by side, as a table, CSV and Markdown."""

from __future__ import annotations

from pathlib import Path

import click

from components.params import DataParams
from components.steps.params import PromotionParams, ReportsParams
from pipelines.options import reachable_tracking_uri, user_errors


@click.command()
@click.option("--experiment", default=DataParams.data, show_default=True,
              help="MLflow experiment (the dataset's name unless train got --experiment).")
@click.option("--sort", "sort", default=PromotionParams.metric, show_default=True,
              help="Column to sort by, better first (e.g. val_acc, latency_ms_p50).")
@click.option("--reverse", is_flag=True, help="Reverse the sort order.")
@click.option("--out", default=ReportsParams.reports_dir, show_default=True,
              type=click.Path(path_type=Path),
              help="Folder for compare-<experiment>.csv and .md.")
def compare_command(experiment: str, sort: str, reverse: bool, out: Path) -> None:
    """Print and save a table of the experiment's training and ensemble runs."""
    from components.tracking import connect
    from components.tracking.comparison import (
        compare_runs,
        report_stem,
        sort_rows,
        text_table,
        useful_columns,
        write_table,
    )

    with user_errors():
        rows = sort_rows(compare_runs(connect(reachable_tracking_uri()), experiment), sort,
                         reverse)
    columns = useful_columns(rows)
    if not rows:
        click.echo(f"experiment '{experiment}' has no training or ensemble runs yet")
    else:
        click.echo(text_table(rows, [c for c in columns if c != "run_id"]))
    csv_path, md_path = write_table(rows, out, report_stem(experiment), columns)
    click.echo(f"wrote {csv_path} and {md_path}", err=True)


compare_command.name = "compare"

if __name__ == "__main__":
    compare_command()
