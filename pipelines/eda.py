"""`cnnflow eda` / `mlflow run . -e eda`: a dataset report as Markdown + PNGs and an MLflow run."""

from __future__ import annotations

import click

from components.steps.eda import EdaParams, run_eda
from pipelines.options import dataclass_options, reachable_tracking_uri, user_errors

HELP = {
    "data": "`digits` (bundled) or a folder: root/<class>/* or root/{train,val,test}/<class>/*.",
    "experiment": "MLflow experiment name (default: the dataset's name).",
    "reports_dir": "Folder the report goes to, as <reports_dir>/eda/<dataset>/report.md.",
    "val_ratio": "Flat folders: validation share of the split shown (the one train makes).",
    "test_ratio": "Flat folders: test share of the split shown (the one train makes).",
    "seed": "Flat folders: seed of the split shown.",
    "num_workers": "Processes reading files: -1 = one per CPU core, 0 = this process only.",
}



@click.command()
@dataclass_options(EdaParams, HELP)
def eda(**kwargs) -> None:
    """Report what is in a dataset: counts, sizes, modes, broken files, duplicates, leakage."""
    params = EdaParams(**kwargs)
    with user_errors():
        params.validate()
        outcome = run_eda(params, reachable_tracking_uri())
    for finding in outcome.findings:
        click.echo(f"- {finding}")
    click.echo(f"{outcome.run_name}  run {outcome.run_id}  report "
               f"{outcome.report_dir / 'report.md'}")


if __name__ == "__main__":
    eda()
