"""`cnnflow compare`: the experiment's models side by side, as a table, CSV and Markdown."""

from __future__ import annotations

from pathlib import Path

import click

from components.params import DataParams, split_list
from components.steps.params import PromotionParams, ReportsParams
from pipelines.options import bool_option, reachable_tracking_uri, user_errors


@click.command()
@click.option("--experiment", default=DataParams.data, show_default=True,
              help="MLflow experiment (the dataset's name unless train got --experiment).")
@click.option("--sort", "sort", default=PromotionParams.metric, show_default=True,
              help="Column to sort by, better first (e.g. val_acc, latency_ms_p50).")
@bool_option("--reverse", False, "Reverse the sort order (worse first).")
@click.option("--columns", default="", metavar="NAME,...",
              help="Columns to print, e.g. run,test_acc,lr,dropout (`all`: every column with a "
                   "value). Default: run, format (with exports), val_acc, test_acc, "
                   "latency_ms_p50, model_size_mb, the --sort column and registry, fitted to "
                   "120 characters. The CSV and Markdown always hold every column.")
@click.option("--out", default=ReportsParams.reports_dir, show_default=True,
              type=click.Path(path_type=Path),
              help="Folder for compare-<experiment>.csv and .md.")
def compare_command(experiment: str, sort: str, reverse: bool, columns: str, out: Path) -> None:
    """Print and save a table of the experiment's training and ensemble runs."""
    from components.tracking import connect
    from components.tracking.comparison import (
        check_columns,
        compare_runs,
        readable_table,
        report_stem,
        shown_columns,
        sort_rows,
        useful_columns,
        write_table,
    )

    picked = split_list(columns)
    with user_errors():
        check_columns([sort], "--sort")
        if picked != ["all"]:
            check_columns(picked, "--columns")
        rows = sort_rows(compare_runs(connect(reachable_tracking_uri()), experiment), sort,
                         reverse)
    every = useful_columns(rows)
    if not rows:
        click.echo(f"experiment '{experiment}' has no training or ensemble runs yet")
    else:
        shown = ([c for c in every if c != "run_id"] if picked == ["all"]
                 else shown_columns(rows, picked, sort))
        click.echo(readable_table(rows, shown, width=10**6 if picked == ["all"] else 120))
    csv_path, md_path = write_table(rows, out, report_stem(experiment), every)
    click.echo(f"wrote {csv_path} and {md_path}", err=True)


compare_command.name = "compare"

if __name__ == "__main__":
    compare_command()
