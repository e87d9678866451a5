"""`cnnflow notify`: show where alerts go (masked), send a test message, or add a target.

A local utility like `cnnflow up`, not an MLproject entry point: it touches no MLflow run.
"""

from __future__ import annotations

import click

from pipelines.options import bool_option, user_errors


@click.command(name="notify")
@bool_option("--test", False, "Send one test message to every target; exit 1 if one did not "
             "take it.", dest="send_test")
@click.option("--add", metavar="URL", default="",
              help="Add an apprise URL to notify.yaml in the state folder (permissions 0600).")
def notify_command(send_test: bool, add: str) -> None:
    """Alerts (Slack, Discord, Teams, Telegram, e-mail, JSON webhooks) through apprise:
    configured by CNNFLOW_NOTIFY or notify.yaml in the state folder (docs/alerts.md)."""
    from components import notify
    from components.humanize import plural

    with user_errors():
        if add:
            path = notify.add_url(add)
            click.echo(f"added {notify.mask(add)} to {path}")
        config = notify.load_config()
    if config is None:
        message = (f"alerts are off: set {notify.ENV_URLS}=URL (an apprise URL, e.g. "
                   f"json://HOST:PORT/PATH) or run `cnnflow notify --add URL`")
        if send_test:
            raise click.ClickException(message)
        click.echo(message)
        return
    click.echo(f"alerts: {plural(len(config.urls), 'target')} from {config.source} "
               f"(timeout {config.timeout:g} s, {plural(config.retries, 'retry', 'retries')})")
    if not send_test:
        for target in config.targets:
            click.echo(f"  {target}")
        return
    deliveries = notify.deliver([notify.probe_message()], config)
    for delivery in deliveries:
        if delivery.ok:
            click.echo(f"  {delivery.target}: sent in {delivery.seconds:.2f} s")
    failed = [d for d in deliveries if not d.ok]
    if failed:
        raise click.ClickException("; ".join(f"{d.target} did not take the test message: "
                                             f"{d.reason}" for d in failed))


if __name__ == "__main__":
    notify_command()
