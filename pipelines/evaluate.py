"""`cnnflow evaluate` / `mlflow run . -e evaluate`: judge a model, log into its run, register."""

from __future__ import annotations

import shlex

import click

from components.steps.params import EvalParams
from pipelines.options import (
    dataclass_options,
    job_run_id,
    next_step,
    reachable_tracking_uri,
    user_errors,
)


@click.command()
@dataclass_options(EvalParams)
def evaluate_command(**kwargs) -> None:
    """Test metrics, figures and cost of a model, logged into its run; then registry."""
    from components.steps.evaluate import evaluate

    with user_errors():
        outcome = evaluate(EvalParams(**kwargs), reachable_tracking_uri(),
                           job_run_id=job_run_id())
    m, split = outcome.metrics, outcome.split
    line = (f"{outcome.run_name}  run {outcome.run_id}  {split}_acc {m[f'{split}_acc']:.4f}  "
            f"{split}_loss {m[f'{split}_loss']:.4f}")
    if f"{split}_top5_acc" in m:
        line += f"  top5 {m[f'{split}_top5_acc']:.4f}"
    if split != "val" and "val_acc" in m:
        line += f"  val_acc {m['val_acc']:.4f}"
    if "latency_ms_p50" in m:
        line += (f"  latency p50 {m['latency_ms_p50']:.1f} ms  "
                 f"{m['throughput_images_per_sec']:.0f} img/s  "
                 f"peak {m['peak_memory_mb']:.0f} MB")
    click.echo(line)
    click.echo(outcome.url)
    for note in outcome.notes:
        click.echo(f"note: {note}", err=True)
    if outcome.version is not None:
        v = outcome.version
        click.echo(f"registered {v.name} v{v.version} (@challenger)")
    if outcome.decision is not None:
        click.echo(outcome.decision.line())
    _next(outcome)


def _next(outcome) -> None:
    """Serve a new champion; apply the rule to a fresh challenger; else compare the models."""
    v, decision = outcome.version, outcome.decision
    if v is not None and decision is not None and decision.promoted:
        next_step(f"mlflow models serve -m models:/{v.name}@champion --env-manager local",
                  "serve the champion")
    elif v is not None and decision is None:
        next_step(f"cnnflow promote --registered-model {v.name}",
                  "apply the promotion rule to the challenger")
    else:
        next_step(f"cnnflow compare --experiment {shlex.quote(outcome.experiment)}",
                  "the experiment's models side by side")


evaluate_command.name = "evaluate"

if __name__ == "__main__":
    evaluate_command()
