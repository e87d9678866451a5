"""`cnnflow pseudo-label`: label confidently predicted images into a new dataset folder."""

from __future__ import annotations

import click

from components.steps.pseudo_label import PseudoLabelParams, run_pseudo_label
from pipelines.options import dataclass_options, reachable_tracking_uri, user_errors

HELP = {
    "model": "A models:/ URI (models:/<name>@champion, models:/m-<id>) or a training run id.",
    "images": "Folder of unlabelled images (any depth).",
    "out": "New dataset folder for the confident images (default: <images>-pseudo).",
    "threshold": "Keep images whose top probability is at least this, in (0, 1].",
    "mode": "copy | hardlink | symlink: how images are placed in the new folder.",
    "experiment": "MLflow experiment of the run (default: the model's run's experiment).",
    "batch_size": "Prediction batch size; 0 = auto (64 on CUDA, 4 on CPU).",
    "num_workers": "DataLoader worker processes decoding images.",
    "device": "auto | cpu | cuda | cuda:N | mps.",
}


@click.command()
@dataclass_options(PseudoLabelParams, HELP)
def pseudo_label_command(**kwargs) -> None:
    """Write images the model labels with >= threshold confidence into class folders."""
    params = PseudoLabelParams(**kwargs)
    with user_errors():
        params.validate()
        outcome = run_pseudo_label(params, reachable_tracking_uri())
    counts = ", ".join(f"{c} {n}" for c, n in outcome.per_class.items())
    click.echo(f"{outcome.run_name}  run {outcome.run_id}  {outcome.n_confident}/"
               f"{outcome.n_images} images >= {params.threshold} ({counts}); "
               f"{outcome.n_below} below, listed in {outcome.out / 'below_threshold.csv'}")
    click.echo(f"train with them: cnnflow train --extra-train {outcome.out}")


pseudo_label_command.name = "pseudo-label"

if __name__ == "__main__":
    pseudo_label_command()
