"""`cnnflow sync` / `mlflow run . -e sync`: mirror MLflow runs into MongoDB (trainings, epochs,
status), once or, with `--follow`, pass after pass until stopped."""

from __future__ import annotations

import logging
import os
import signal
import sys

import click

from components.services import local_store_note, mongo_uri, tracking_uri
from components.settings import mask_uri
from components.steps.params import SyncParams
from pipelines.options import dataclass_options, job_run_id, user_errors


@click.command()
@dataclass_options(SyncParams)
def sync_command(**kwargs) -> None:
    """Mirror MLflow runs into MongoDB for the dashboard (MLflow stays the source of truth)."""
    from components.mirror.sync import SyncOptions, check_servers, follow, sync_once, tag_job_run

    params = SyncParams(**kwargs)
    with user_errors():
        params.validate()
    # Fail fast on a dead server instead of MLflow's minutes of HTTP retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    options = SyncOptions(experiments=params.experiment_list(), dead_after=params.dead_after,
                          reconcile_every=params.reconcile_every, rebuild=params.rebuild)
    with user_errors():  # no server set or started: one line, before anything is read
        mlflow_uri, mongo = tracking_uri(), mongo_uri()
    if note := local_store_note(mlflow_uri):
        click.echo(note, err=True)
    job = job_run_id()
    if not params.follow:
        with user_errors():
            if job:  # tag the job's own run before it is listed
                check_servers(mlflow_uri, mongo)
                tag_job_run(mlflow_uri, job)
            report = sync_once(mlflow_uri, mongo, options)
        click.echo(report.line())
        return
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(message)s")
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    click.echo(f"following {mask_uri(mlflow_uri)} -> {mask_uri(mongo)} every {params.interval:g} s",
               err=True)
    try:
        if job:
            with user_errors():
                tag_job_run(mlflow_uri, job)
        follow(mlflow_uri, mongo, options, interval=params.interval,
               log=lambda line: click.echo(line, err=True), stop=lambda: bool(stopping))
    except KeyboardInterrupt:
        pass
    click.echo("sync stopped", err=True)


sync_command.name = "sync"

if __name__ == "__main__":
    sync_command()
