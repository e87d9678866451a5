"""`cnnflow preprocess` / `mlflow run . -e preprocess`: split manifest + tensor cache as a run."""

from __future__ import annotations

import click

from components.steps.preprocess import PreprocessParams, run_preprocess
from pipelines.options import dataclass_options, reachable_tracking_uri, user_errors

HELP = {
    "data": "`digits` (bundled) or a folder: root/<class>/* or root/{train,val,test}/<class>/*.",
    "experiment": "MLflow experiment name (default: the dataset's name).",
    "train_ratio": "Train share of a flat folder (the three shares must add up to 1).",
    "val_ratio": "Validation share (flat folder, or carved from train/ when val/ is missing).",
    "test_ratio": "Test share (flat folder, or carved from train/ when test/ is missing).",
    "seed": "Seed of the stratified split.",
    "cache": "true: also store every image decoded and resized to image_size (uint8 .npy).",
    "image_size": "Square size of the cached images; train uses the cache at this size.",
    "num_workers": "Processes reading files: -1 = one per CPU core, 0 = this process only.",
}



@click.command()
@dataclass_options(PreprocessParams, HELP)
def preprocess(**kwargs) -> None:
    """Split a dataset once, leak-free, into a manifest (and optional tensor cache) run."""
    params = PreprocessParams(**kwargs)
    with user_errors():
        params.validate()
        outcome = run_preprocess(params, reachable_tracking_uri())
    m = outcome.metrics
    click.echo(f"{outcome.run_name}  run {outcome.run_id}  train {m['n_train']:.0f} "
               f"val {m['n_val']:.0f} test {m['n_test']:.0f}  moved {m['n_leakage_moved']:.0f}"
               f"  excluded {m['n_label_conflicts_excluded']:.0f}  digest {outcome.digest[:12]}")
    click.echo(f"train on it: cnnflow train --preprocess-run {outcome.run_id}")


if __name__ == "__main__":
    preprocess()
