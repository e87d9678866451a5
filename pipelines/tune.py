"""`cnnflow tune` / `mlflow run . -e tune`: an Optuna study of nested training runs."""

from __future__ import annotations

import click

from components.steps.tune import TuneParams, run_tune
from pipelines.options import dataclass_options, reachable_tracking_uri, user_errors

HELP = {
    "space": "Search space: a YAML file, or inline 'lr: loguniform(1e-5, 1e-2); "
             "batch_size: [16, 32, 64]' (uniform, loguniform, int, logint, choice, lists, "
             "fixed values).",
    "data": "`digits` (bundled) or an image folder.",
    "experiment": "MLflow experiment name (default: the dataset's name).",
    "model": "Model, or several comma-separated (then `model` is tuned too).",
    "n_trials": "Trials this worker runs (0 with a timeout: until the timeout).",
    "timeout": "Stop starting trials after this many seconds; 0 = no limit.",
    "metric": "Epoch metric to optimise: val_loss | val_acc | train_loss | train_acc.",
    "direction": "minimize | maximize.",
    "sampler": "tpe | random | grid (grid: every parameter a list).",
    "pruner": "median | hyperband | none.",
    "storage": "Optuna storage URL (default: sqlite under .cnnflow/); a PostgreSQL URL lets "
               "workers on many machines share a study.",
    "study": "Study name; workers with the same name and storage share it (default: a new "
             "study per run).",
    "epochs": "Maximum epochs of the --retrain-best run (and of trials unless trial_epochs).",
    "trial_epochs": "Maximum epochs per trial; 0 = epochs.",
    "retrain_best": "true: train the best configuration with full epochs, then evaluate it.",
    "weights": "Trials' weights: none | imagenet | auto | PATH.",
    "image_size": "Square input size in pixels.",
    "augmentation": "Augmentation preset: none | light | strong.",
    "patience": "Early-stopping patience per trial; 0 disables.",
    "val_ratio": "Validation share of a flat folder.",
    "test_ratio": "Test share of a flat folder.",
    "seed": "Seed of the split, the trials' training and the sampler.",
    "device": "auto | cpu | cuda | cuda:N | mps.",
    "num_workers": "DataLoader worker processes.",
}

@click.command()
@dataclass_options(TuneParams, HELP)
def tune_command(**kwargs) -> None:
    """Search hyperparameters with Optuna; every trial is a nested training run."""
    params = TuneParams(**kwargs)
    with user_errors():
        params.validate()
        outcome = run_tune(params, reachable_tracking_uri())
    click.echo(f"{outcome.run_name}  run {outcome.run_id}  study {outcome.study}  "
               f"best {params.metric} {outcome.best_value:.4f}  {outcome.best_params}  "
               f"({outcome.n_complete} complete, {outcome.n_pruned} pruned, "
               f"{outcome.n_failed} failed)")
    if outcome.retrained_run_id:
        click.echo(f"retrained run {outcome.retrained_run_id}  {outcome.retrained_metrics}")


tune_command.name = "tune"

if __name__ == "__main__":
    tune_command()
