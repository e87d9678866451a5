"""`cnnflow evaluate` / `mlflow run . -e evaluate`: judge a model, log into its run, register."""

from __future__ import annotations

import click

from components.steps.evaluate import EvalParams, evaluate
from pipelines.options import dataclass_options, reachable_tracking_uri, user_errors

HELP = {
    "run_id": "Run to evaluate (a train or ensemble run); or use --model-uri.",
    "model_uri": "models:/<name>@<alias>, models:/<name>/<version> or models:/m-<id>.",
    "split": "val | test: a split of the run's own manifest.",
    "batch_size": "Prediction and throughput batch size; 0: auto (64 on CUDA, 4 on CPU).",
    "num_workers": "DataLoader worker processes decoding images.",
    "device": "run (the device the run trained on) | auto | cpu | cuda | cuda:N | mps.",
    "cost": "Measure parameters, size, latency, throughput and peak memory.",
    "latency_runs": "Single-image predictions timed for latency p50/p95.",
    "register": "Register the model (test split) as a new version with alias challenger.",
    "registered_model": "Registered model name (default: <experiment>-classifier).",
    "promote": "Apply the promotion rule after registering.",
    "metric": "Metric the promotion rule compares.",
    "min_delta": "The challenger must beat the champion by at least this much.",
}



@click.command()
@dataclass_options(EvalParams, HELP)
def evaluate_command(**kwargs) -> None:
    """Test metrics, figures and cost of a model, logged into its run; then registry."""
    with user_errors():
        outcome = evaluate(EvalParams(**kwargs), reachable_tracking_uri())
    m, split = outcome.metrics, outcome.split
    line = (f"{outcome.run_name}  run {outcome.run_id}  {split}_acc {m[f'{split}_acc']:.4f}  "
            f"{split}_loss {m[f'{split}_loss']:.4f}")
    if f"{split}_top5_acc" in m:
        line += f"  top5 {m[f'{split}_top5_acc']:.4f}"
    if "latency_ms_p50" in m:
        line += (f"  latency p50 {m['latency_ms_p50']:.1f} ms  "
                 f"{m['throughput_images_per_sec']:.0f} img/s  "
                 f"peak {m['peak_memory_mb']:.0f} MB")
    click.echo(line)
    for note in outcome.notes:
        click.echo(f"note: {note}", err=True)
    if outcome.version is not None:
        v = outcome.version
        click.echo(f"registered {v.name} v{v.version} (@challenger)")
    if outcome.decision is not None:
        click.echo(outcome.decision.line())


evaluate_command.name = "evaluate"

if __name__ == "__main__":
    evaluate_command()
