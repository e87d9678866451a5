"""`cnnflow dashboard`: serve the Streamlit dashboard over the Mongo mirror."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click

from components.services import ServiceError, check_mongo, mongo_uri
from components.settings import DEFAULT_HOST, mask_uri

APP = Path(__file__).resolve().parents[1] / "components" / "mirror" / "dashboard" / "app.py"
DEFAULT_PORT = 8501


def streamlit_command(host: str, port: int) -> list[str]:
    """`streamlit run` of the app: headless (no browser opened on a server), no usage stats,
    no file watcher (nothing to hot-reload in an installed app), no developer toolbar."""
    return [sys.executable, "-m", "streamlit", "run", str(APP),
            "--server.address", host, "--server.port", str(port),
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--client.toolbarMode", "viewer"]


@click.command()
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to bind.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int)
def dashboard_command(host: str, port: int) -> None:
    """Serve the dashboard (model detail, comparison, time filter, live runs) over the Mongo
    mirror at MONGO_URI; it reads Mongo only."""
    uri = mongo_uri()
    try:
        check_mongo(uri, timeout=2.0)
    except ServiceError as exc:  # the page shows the same message; start anyway
        click.echo(f"warning: {exc}", err=True)
    click.echo(f"dashboard: http://{host}:{port} (mirror: {mask_uri(uri)}); Ctrl-C stops it",
               err=True)
    try:
        code = subprocess.call(streamlit_command(host, port))
    except KeyboardInterrupt:
        code = 0
    if code:
        raise click.ClickException(f"streamlit exited with code {code}")


dashboard_command.name = "dashboard"
