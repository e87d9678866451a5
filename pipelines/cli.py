"""The `cnnflow` command: one sub-command per MLproject entry point, plus service control."""

from __future__ import annotations

import click

from pipelines.services import down, status, up
from pipelines.train import train


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Train, compare and promote image classifiers, tracked in MLflow."""


for command in (train, up, down, status):
    cli.add_command(command)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
