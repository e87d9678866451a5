"""`cnnflow sync` / `mlflow run . -e sync`: mirror MLflow runs into MongoDB (trainings, epochs,
status), once or, with `--follow`, pass after pass until stopped."""

from __future__ import annotations

import logging
import os
import signal
import sys

import click

from components.mirror.sync import SyncOptions, check_servers, follow, sync_once, tag_job_run
from components.services import mongo_uri, tracking_uri
from components.settings import mask_uri
from pipelines.options import user_errors


def _flag(value: str) -> bool:
    """MLproject passes booleans as strings; the CLI accepts the same spellings."""
    return str(value).strip().lower() in ("1", "true", "yes", "on")


@click.command()
@click.option("--experiments", default="", show_default=True,
              help="Comma-separated experiment names to mirror (default: all).")
@click.option("--follow", "follow_", default="false", metavar="true|false", show_default=True,
              flag_value="true", is_flag=False,
              help="Keep polling until stopped (Ctrl-C / SIGTERM) instead of one pass.")
@click.option("--interval", default=2.0, show_default=True, type=float,
              help="Seconds between passes with --follow.")
@click.option("--dead-after", default=120.0, show_default=True, type=float,
              help="A RUNNING run silent this many seconds shows as `died`.")
@click.option("--reconcile-every", default=60.0, show_default=True, type=float,
              help="Seconds between full listings that catch edits to long-finished runs "
                   "(0 = every pass).")
@click.option("--rebuild", default="false", metavar="true|false", show_default=True,
              flag_value="true", is_flag=False,
              help="Drop the mirror and rebuild it from MLflow.")
def sync_command(experiments: str, follow_: str, interval: float, dead_after: float,
                 reconcile_every: float, rebuild: str) -> None:
    """Mirror MLflow runs into MongoDB for the dashboard (MLflow stays the source of truth)."""
    # Fail fast on a dead server instead of MLflow's minutes of HTTP retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    options = SyncOptions(
        experiments=[e.strip() for e in experiments.split(",") if e.strip()],
        dead_after=dead_after, reconcile_every=reconcile_every, rebuild=_flag(rebuild))
    mlflow_uri, mongo = tracking_uri(), mongo_uri()
    if not _flag(follow_):
        with user_errors():
            if os.environ.get("MLFLOW_RUN_ID"):  # tag the job's own run before it is listed
                check_servers(mlflow_uri, mongo)
                tag_job_run(mlflow_uri)
            report = sync_once(mlflow_uri, mongo, options)
        click.echo(report.line())
        return
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(message)s")
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    click.echo(f"following {mask_uri(mlflow_uri)} -> {mask_uri(mongo)} every {interval:g} s",
               err=True)
    try:
        if os.environ.get("MLFLOW_RUN_ID"):
            with user_errors():
                tag_job_run(mlflow_uri)
        follow(mlflow_uri, mongo, options, interval=interval,
               log=lambda line: click.echo(line, err=True), stop=lambda: bool(stopping))
    except KeyboardInterrupt:
        pass
    click.echo("sync stopped", err=True)


sync_command.name = "sync"

if __name__ == "__main__":
    sync_command()
