"""`cnnflow ensemble` / `mlflow run . -e ensemble`: combine trained runs into one model."""

from __future__ import annotations

import click

from components.steps.ensemble import EnsembleParams, run_ensemble
from components.tracking.comparison import text_table
from pipelines.options import dataclass_options, reachable_tracking_uri, user_errors

HELP = {
    "run_ids": "Member run ids, comma-separated (default: the experiment's top-k).",
    "top_k": "Without --run-ids: the k best finished training runs by best_val_acc.",
    "experiment": "Experiment for top-k selection and for bagging (default: dataset name).",
    "vote": "soft (mean of probabilities) | logits (mean of logits) | hard (majority).",
    "weights": "equal | val_acc | comma-separated list, one per member.",
    "batch_size": "Bagging: images per training batch.",
    "num_workers": "DataLoader worker processes.",
    "device": "auto | cpu | cuda | cuda:N | mps.",
    "bagging": "Train N members on bootstrap samples of train (0: off).",
    "data": "Bagging: `digits` or an image folder.",
    "model": "Bagging: the members' model.",
    "epochs": "Bagging: maximum epochs per member.",
    "image_size": "Bagging: square input size in pixels.",
    "lr": "Bagging: learning rate.",
    "init_weights": "Bagging: none | imagenet | auto | PATH (the members' starting weights).",
    "augmentation": "Bagging: none | light | strong.",
    "patience": "Bagging: early-stopping patience; 0 disables.",
    "val_ratio": "Bagging: validation share of a flat folder.",
    "test_ratio": "Bagging: test share of a flat folder.",
    "seed": "Bagging: split seed (bootstrap i uses seed + 1 + i).",
}



@click.command()
@dataclass_options(EnsembleParams, HELP)
def ensemble_command(**kwargs) -> None:
    """Soft-vote trained models (or bag new ones) into one logged, servable model."""
    with user_errors():
        outcome = run_ensemble(EnsembleParams(**kwargs), reachable_tracking_uri())
    columns = [c for c in ("member", "model", "weight", "val_acc", "val_loss", "test_acc",
                           "test_loss") if any(c in row for row in outcome.table)]
    click.echo(text_table(outcome.table, columns), err=True)
    m = outcome.metrics
    click.echo(f"{outcome.run_name}  run {outcome.run_id}  {len(outcome.members)} members  "
               f"test_acc {m.get('test_acc', float('nan')):.4f}  "
               f"(register it: cnnflow evaluate --run-id {outcome.run_id})")


ensemble_command.name = "ensemble"

if __name__ == "__main__":
    ensemble_command()
