"""`cnnflow pseudo-label`: label confidently predicted images into a new dataset folder."""

from __future__ import annotations

import click

from components.steps.params import PseudoLabelParams
from pipelines.options import dataclass_options, job_run_id, reachable_tracking_uri, user_errors


@click.command()
@dataclass_options(PseudoLabelParams)
def pseudo_label_command(**kwargs) -> None:
    """Write images the model labels with >= threshold confidence into class folders."""
    from components.steps.pseudo_label import REPORT_DIR, check, run_pseudo_label

    params = PseudoLabelParams(**kwargs)
    with user_errors():
        check(params)
        uri = reachable_tracking_uri()
        outcome = run_pseudo_label(params, uri, job_run_id=job_run_id(params.experiment, uri))
    counts = ", ".join(f"{c} {n}" for c, n in outcome.per_class.items())
    below = outcome.out / REPORT_DIR / "below_threshold.csv"
    click.echo(f"{outcome.run_name}  run {outcome.run_id}  {outcome.n_confident}/"
               f"{outcome.n_images} images >= {params.threshold} ({counts}); "
               f"{outcome.n_below} below, listed in {below}")
    click.echo(f"train with them: cnnflow train --extra-train {outcome.out}")


pseudo_label_command.name = "pseudo-label"

if __name__ == "__main__":
    pseudo_label_command()
