"""`cnnflow eda` / `mlflow run . -e eda`: a dataset report as Markdown + PNGs and an MLflow run."""

from __future__ import annotations

import os
import sys

import click

from components.config import mask_text
from components.datasets import DataError
from components.eda import EdaParams, run_eda
from components.services import ServiceError, check_tracking_server, tracking_uri
from pipelines.options import dataclass_options

HELP = {
    "data": "`digits` (bundled) or a folder: root/<class>/* or root/{train,val,test}/<class>/*.",
    "experiment": "MLflow experiment name (default: the dataset's name).",
    "reports_dir": "Folder the report goes to, as <reports_dir>/eda/<dataset>/report.md.",
    "val_ratio": "Flat folders: validation share of the split shown (the one train makes).",
    "test_ratio": "Flat folders: test share of the split shown (the one train makes).",
    "seed": "Flat folders: seed of the split shown.",
    "num_workers": "Processes reading files: -1 = one per CPU core, 0 = this process only.",
}

USER_ERRORS = (DataError, ServiceError, FileNotFoundError)


@click.command()
@dataclass_options(EdaParams, HELP)
def eda(**kwargs) -> None:
    """Report what is in a dataset: counts, sizes, modes, broken files, duplicates, leakage."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    params = EdaParams(**kwargs)
    uri = tracking_uri()
    try:
        params.validate()
        check_tracking_server(uri)
        outcome = run_eda(params, uri)
    except USER_ERRORS as exc:
        raise click.ClickException(mask_text(str(exc).splitlines()[0])) from None
    except KeyboardInterrupt:
        click.echo("interrupted (a run already started is marked KILLED)", err=True)
        sys.exit(130)
    for finding in outcome.findings:
        click.echo(f"- {finding}")
    click.echo(f"{outcome.run_name}  run {outcome.run_id}  report "
               f"{outcome.report_dir / 'report.md'}")


if __name__ == "__main__":
    eda()
