"""`cnnflow promote`: apply the promotion rule to the challenger, force it, or roll back."""

from __future__ import annotations

import click

from components.steps.params import PromoteParams
from pipelines.options import dataclass_options, reachable_tracking_uri, user_errors


@click.command()
@dataclass_options(PromoteParams)
def promote_command(registered_model: str, experiment: str, version: str, metric: str,
                    min_delta: float, force: bool) -> None:
    """Move the `champion` alias by the rule: better on the same dataset split, or stay."""
    from components.params import check_bounds
    from components.tracking import connect
    from components.tracking.registry import (
        VERSION_METRICS,
        RegistryError,
        default_name,
        promote,
        version_summary,
    )

    name = registered_model or (default_name(experiment) if experiment else "")
    with user_errors():
        check_bounds(PromoteParams(registered_model=registered_model, experiment=experiment,
                                   version=version, metric=metric, min_delta=min_delta,
                                   force=force))
        if not name:
            raise RegistryError("pass --registered-model NAME or --experiment NAME")
        # Before the server: with challenger = champion the rule never reads the metric,
        # so a typo would otherwise pass as "already is the champion".
        if metric not in VERSION_METRICS:
            raise RegistryError(f"metric '{metric}' is not one evaluate records on a version: "
                                f"choose one of {', '.join(VERSION_METRICS)}")
        if version and force:
            raise RegistryError("--version already sets the champion; drop --force")
        client = connect(reachable_tracking_uri())
        decision = promote(client, name, version=version or None, metric=metric,
                           min_delta=min_delta, force=force)
    click.echo(decision.line())
    for row in version_summary(client, name)[:5]:
        aliases = f" @{row['aliases'].replace(',', ' @')}" if row["aliases"] else ""
        click.echo(f"  v{row['version']}{aliases}  run {row['run_id']}  {row['decision']}")


promote_command.name = "promote"

if __name__ == "__main__":
    promote_command()
