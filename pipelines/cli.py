"""The `cnnflow` command: one sub-command per MLproject entry point, plus service control.

Sub-commands are imported on first use, so `cnnflow status` answers without loading torch.
"""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute"; adding an entry point is one line here.
COMMANDS = {
    "eda": "pipelines.eda:eda",
    "preprocess": "pipelines.preprocess:preprocess",
    "train": "pipelines.train:train",
    "evaluate": "pipelines.evaluate:evaluate_command",
    "ensemble": "pipelines.ensemble:ensemble_command",
    "export": "pipelines.export:export_command",
    "promote": "pipelines.promote:promote_command",
    "compare": "pipelines.compare:compare_command",
    "sync": "pipelines.sync:sync_command",
    "dashboard": "pipelines.dashboard:dashboard_command",
    "tune": "pipelines.tune:tune_command",
    "pseudo-label": "pipelines.pseudo_label:pseudo_label_command",
    "label-issues": "pipelines.label_issues:label_issues_command",
    "lr-find": "pipelines.lr_find:lr_find_command",
    "explain": "pipelines.explain:explain_command",
    "cascade": "pipelines.cascade:cascade_command",
    "report": "pipelines.report:report_command",
    "run": "pipelines.main:run_command",
    "up": "pipelines.services:up",
    "down": "pipelines.services:down",
    "status": "pipelines.services:status",
    "env": "pipelines.services:env_command",
    "notify": "pipelines.notify:notify_command",
}


class LazyGroup(click.Group):
    """A click group that imports each sub-command only when it is run or asked for help."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attribute = COMMANDS[cmd_name].split(":")
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Train, compare and promote image classifiers, tracked in MLflow."""


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
