"""`cnnflow run` / `mlflow run . -e main`: the whole pipeline, each step reused when it ran."""

from __future__ import annotations

import click

from components.steps.params import PipelineParams
from pipelines.options import dataclass_options, job_run_id, reachable_tracking_uri, user_errors


@click.command()
@dataclass_options(PipelineParams)
def run_command(**kwargs) -> None:
    """eda -> preprocess -> train -> evaluate -> ensemble -> promote -> sync, as one parent run.

    Re-running the same command reuses every finished step; after an interruption it resumes
    at the first step that did not finish.
    """
    from components.services import ServiceError, check_mongo, mongo_uri
    from components.steps.main import run_pipeline
    from components.tracking.comparison import text_table

    params = PipelineParams(**kwargs)
    with user_errors():
        params.validate()
        uri = reachable_tracking_uri()
        job = job_run_id(params.experiment, uri)  # a mismatch fails the job's run before work
        try:
            mongo = mongo_uri() if params.sync else ""
            if mongo:
                check_mongo(mongo)
        except ServiceError as exc:  # checked before hours of training, not after
            raise ServiceError(f"{exc}, or pass --sync false") from None
        try:
            outcome = run_pipeline(params, uri, mongo, job_run_id=job)
        except KeyboardInterrupt:
            click.echo("re-run the same command to resume at the first unfinished step",
                       err=True)
            raise
    steps = outcome.steps
    reused = sum(s.reused for s in steps)
    click.echo(f"\n{outcome.run_name}: {len(steps) - reused} steps ran, {reused} reused  "
               f"{outcome.url}")
    click.echo(text_table(outcome.table, outcome.columns))
    click.echo(outcome.criteria)
    if outcome.champion_uri:
        click.echo(f"champion: {outcome.champion_uri}")
    if outcome.report is not None:
        r = outcome.report
        click.echo(f"report: {r.markdown}  {r.html}" + (f"  {r.pdf}" if r.pdf else ""))


run_command.name = "run"

if __name__ == "__main__":
    run_command()
