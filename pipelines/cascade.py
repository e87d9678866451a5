"""`cnnflow cascade` / `mlflow run . -e cascade`: detect objects, classify each crop."""

from __future__ import annotations

import click

from components.steps.params import CascadeParams
from pipelines.options import dataclass_options, job_run_id, reachable_tracking_uri, user_errors


@click.command()
@dataclass_options(CascadeParams)
def cascade_command(**kwargs) -> None:
    """Find the objects (a torchvision detector, or --boxes from any detector), re-label the
    --refine classes' crops with a cnnflow classifier; write detections.csv and annotated
    images, log the run (and with a detector, the cascade model, registered @challenger)."""
    from components.steps.cascade import check, run_cascade

    params = CascadeParams(**kwargs)
    with user_errors():
        check(params)
        uri = reachable_tracking_uri()
        outcome = run_cascade(params, uri, job_run_id=job_run_id(params.experiment, uri))
    counts = ", ".join(f"{c} {n}" for c, n in outcome.per_class.items())
    click.echo(f"{outcome.run_name}  run {outcome.run_id}  {outcome.n_images} images  "
               f"{outcome.n_boxes} boxes, {outcome.n_refined} re-labelled ({counts})")
    m = outcome.metrics
    if "map50" in m:
        click.echo(f"  mAP@0.5 {m['map50']:.4f}  precision@0.5 {m['precision50']:.4f}  "
                   f"recall@0.5 {m['recall50']:.4f}")
    click.echo(f"  {outcome.out / 'detections.csv'}  {outcome.out / 'annotated'}/")
    if outcome.skipped:
        click.echo(f"  {len(outcome.skipped)} unreadable files skipped, listed in "
                   f"{outcome.out / 'skipped_files.csv'}", err=True)
    if outcome.version is not None:
        v = outcome.version
        click.echo(f"  registered {v.name} v{v.version} (@challenger): mlflow models serve "
                   f"-m models:/{v.name}/{v.version} --env-manager local")
    click.echo(outcome.url)


cascade_command.name = "cascade"

if __name__ == "__main__":
    cascade_command()
