"""`cnnflow dashboard`: serve the Streamlit dashboard over the Mongo mirror."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import click

from components.services import ServiceError, check_mongo, mongo_uri, stop_process_group
from components.settings import DEFAULT_HOST, mask_uri

APP = Path(__file__).resolve().parents[1] / "components" / "mirror" / "dashboard" / "app.py"
DEFAULT_PORT = 8501
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def streamlit_command(host: str, port: int) -> list[str]:
    """`streamlit run` of the app: headless (no browser opened on a server), no usage stats,
    no file watcher (nothing to hot-reload in an installed app), no developer toolbar."""
    return [sys.executable, "-m", "streamlit", "run", str(APP),
            "--server.address", host, "--server.port", str(port),
            "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--client.toolbarMode", "viewer"]


def serve(command: list[str]) -> int:
    """Run `command` in its own process group until it exits or we get SIGTERM / SIGINT.

    A signal sent to this process alone (a service manager's SIGTERM, `kill <pid>`) would
    otherwise leave Streamlit holding the port: it is passed on to the child's whole group,
    which is waited for. Returns the child's exit code, 0 when we were asked to stop.
    """
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, _frame: received.append(signum))
                for sig in STOP_SIGNALS}
    child = None
    try:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, process_group=0)
        while child.poll() is None and not received:
            time.sleep(0.2)
    finally:
        if child is not None and child.poll() is None:  # asked to stop, or an error here
            stop_process_group(child.pid)
            child.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if received else child.returncode


@click.command()
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to bind.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int)
def dashboard_command(host: str, port: int) -> None:
    """Serve the dashboard (model detail, comparison, time filter, live runs) over the Mongo
    mirror at MONGO_URI; it reads Mongo only."""
    mirror = "none set"
    try:
        uri = mongo_uri()
        mirror = mask_uri(uri)
        check_mongo(uri, timeout=2.0)
    except ServiceError as exc:  # the page shows the same message; start anyway
        click.echo(f"warning: {exc}", err=True)
    click.echo(f"dashboard: http://{host}:{port} (mirror: {mirror}); Ctrl-C stops it", err=True)
    code = serve(streamlit_command(host, port))
    if code:
        raise click.ClickException(f"streamlit exited with code {code}")


dashboard_command.name = "dashboard"
