"""`cnnflow preprocess` / `mlflow run . -e preprocess`: split manifest + tensor cache as a run."""

from __future__ import annotations

import click

from components.steps.params import PreprocessParams
from pipelines.options import dataclass_options, job_run_id, reachable_tracking_uri, user_errors


@click.command()
@dataclass_options(PreprocessParams)
def preprocess(**kwargs) -> None:
    """Split a dataset once, leak-free, into a manifest (and optional tensor cache) run."""
    from components.steps.preprocess import run_preprocess

    params = PreprocessParams(**kwargs)
    with user_errors():
        params.validate()
        uri = reachable_tracking_uri()
        outcome = run_preprocess(params, uri, job_run_id=job_run_id(params.experiment, uri))
    m = outcome.metrics
    click.echo(f"{outcome.run_name}  run {outcome.run_id}  train {m['n_train']:.0f} "
               f"val {m['n_val']:.0f} test {m['n_test']:.0f}  moved {m['n_leakage_moved']:.0f}"
               f"  excluded {m['n_label_conflicts_excluded']:.0f}  digest {outcome.digest[:12]}")
    click.echo(f"train on it: cnnflow train --preprocess-run {outcome.run_id}")


if __name__ == "__main__":
    preprocess()
