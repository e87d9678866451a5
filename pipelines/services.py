"""`cnnflow up | down | status | env`: start, stop and list the local MLflow and Mongo servers,
and print the `export` lines that point `mlflow run` at them."""

from __future__ import annotations

from collections.abc import Callable

import click

from components import services
from components.settings import (
    DEFAULT_HOST,
    DEFAULT_MLFLOW_PORT,
    DEFAULT_MONGO_PORT,
    DEFAULT_POSTGRES_PORT,
)
from pipelines.options import bool_option

_NAMES = click.argument("names", nargs=-1, metavar="[SERVICE]...",
                        type=click.Choice(sorted(services.SERVICES)))


def _report(call: Callable[[], list[services.ServiceStatus]]) -> list[services.ServiceStatus]:
    """Run a service call, print one line per service; a ServiceError becomes a one-line error."""
    try:
        result = call()
    except services.ServiceError as exc:
        raise click.ClickException(str(exc)) from None
    for item in result:
        click.echo(services.format_status(item))
    return result


@click.command()
@_NAMES
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to bind.")
@click.option("--mlflow-port", default=DEFAULT_MLFLOW_PORT, show_default=True, type=int)
@click.option("--mongo-port", default=DEFAULT_MONGO_PORT, show_default=True, type=int)
@click.option("--postgres-port", default=DEFAULT_POSTGRES_PORT, show_default=True, type=int,
              help="Port of the PostgreSQL that `--backend postgresql` starts.")
@click.option("--backend", type=click.Choice(sorted(services.BACKENDS)), default=None,
              help="MLflow's backend store: sqlite (the default) or a PostgreSQL cnnflow "
                   "runs in the state folder (password in postgres.password, 0600).")
@click.option("--backend-store-uri", default=None, metavar="URI",
              help="Run MLflow on an existing database instead, e.g. "
                   "postgresql://user:password@host:5432/mlflow (checked before starting).")
@click.option("--timeout", default=90.0, show_default=True, type=float,
              help="Seconds to wait for each server to answer.")
@bool_option("--with-sync", False,
             "Also start the Mongo mirror follower (`cnnflow sync --follow true`).")
def up(names: tuple[str, ...], host: str, mlflow_port: int, mongo_port: int, postgres_port: int,
       backend: str | None, backend_store_uri: str | None, timeout: float,
       with_sync: bool) -> None:
    """Start the local servers not configured by MLFLOW_TRACKING_URI / MONGO_URI."""
    selected = list(names) or None
    if with_sync:
        selected = list(dict.fromkeys([*(selected or services.default_names()), "sync"]))
    result = _report(lambda: services.up(
        host, mlflow_port, mongo_port, timeout, names=selected,
        ports={"postgres": postgres_port}, backend=backend,
        backend_store_uri=backend_store_uri))
    for item in result:
        if item.name == "mlflow" and item.url:
            # The experiments list in the UI's model-training mode, not its GenAI home page.
            click.echo(f"MLflow UI: {item.url}/#/experiments?workflowType=machine_learning")
    exports = services.started_exports(result)
    for line in exports:  # `mlflow run` reads only the environment, not cnnflow's state
        click.echo(line)
    if exports:
        click.echo('point this shell (and `mlflow run`) at them: eval "$(cnnflow env)"')


@click.command()
@_NAMES
def down(names: tuple[str, ...]) -> None:
    """Stop the servers `cnnflow up` started (external ones are left alone)."""
    _report(lambda: services.down(names or None))


@click.command()
@_NAMES
def status(names: tuple[str, ...]) -> None:
    """Show each server as running, unhealthy, stopped or external."""
    _report(lambda: services.status(names or None))


@click.command(name="env")
def env_command() -> None:
    """Print `export` lines for the running servers: eval "$(cnnflow env)" before `mlflow run`."""
    try:
        lines = services.env_exports()
    except services.ServiceError as exc:
        raise click.ClickException(str(exc)) from None
    for line in lines:
        click.echo(line)
