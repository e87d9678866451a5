"""`cnnflow train` / `mlflow run . -e train`: train one model as one MLflow run."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import click

from components.nn.distributed import env_world_size
from components.steps.train import TrainParams
from components.steps.train import train as run_training
from pipelines.options import dataclass_options, reachable_tracking_uri, user_errors

HELP = {
    "data": "`digits` (bundled) or a folder: root/<class>/* or root/{train,val,test}/<class>/*.",
    "experiment": "MLflow experiment name (default: the dataset's name).",
    "model": "Registered model name, e.g. custom_cnn, lenet5, resnet50, vgg16, mobilenetv2.",
    "weights": "none | imagenet | auto (ImageNet if cached, else random) | PATH to a state dict.",
    "freeze": "none | backbone (feature extraction) | partial:N (last N blocks also train).",
    "image_size": "Square input size in pixels.",
    "batch_size": "Images per batch.",
    "epochs": "Maximum number of epochs.",
    "optimizer": "adam | adamw | sgd.",
    "lr": "Learning rate.",
    "weight_decay": "Weight decay (L2).",
    "scheduler": "none | plateau | cosine | onecycle.",
    "scheduler_patience": "plateau: epochs without improvement before the LR is reduced.",
    "scheduler_factor": "plateau: factor the LR is multiplied by.",
    "momentum": "SGD momentum (Nesterov when > 0).",
    "patience": "Early stopping: epochs without val_loss improvement; 0 disables.",
    "min_delta": "Early stopping: smallest val_loss decrease that counts as improvement.",
    "augmentation": "Augmentation preset: none | light | strong.",
    "dropout": "Dropout in the classifier head.",
    "head_hidden": "Hidden units of the head; 0 = the model's default.",
    "label_smoothing": "Label smoothing for the training loss.",
    "class_weights": "none | balanced (inverse class frequency).",
    "val_ratio": "Validation share when the folder is not already split.",
    "test_ratio": "Test share when the folder is not already split.",
    "preprocess_run": "Run id of a `cnnflow preprocess` run: train on its manifest (and tensor "
                      "cache at this image_size) instead of scanning `data`.",
    "seed": "Random seed (split, init, batch order).",
    "device": "auto | cpu | cuda | cuda:N | mps.",
    "amp": "Mixed precision: auto (on for CUDA) | on | off.",
    "num_workers": "DataLoader worker processes.",
    "nproc": "Training processes (DistributedDataParallel via torchrun: gloo on CPU, one GPU "
             "each with NCCL); batch_size is per process.",
    "resume": "Run id of an unfinished run to continue from its last checkpoint.",
    "cv": "Stratified K-fold cross-validation over train+val (test untouched); 0 = off.",
    "cv_ensemble": "With --cv: also soft-vote the K fold models into one ensemble run.",
    "extra_train": "Folder of extra labelled images (class sub-folders, e.g. from "
                   "`cnnflow pseudo-label`) added to the train split only.",
}



@click.command()
@dataclass_options(TrainParams, HELP)
def train(**kwargs) -> None:
    """Train one model; every epoch is logged to MLflow as it happens."""
    params = TrainParams(**kwargs)
    if params.nproc > 1 and env_world_size() == 1:
        _launch(params)
        return
    if params.cv:
        _train_cv(params)
        return
    with user_errors():
        outcome = run_training(params, reachable_tracking_uri())
    if not outcome.run_id:  # a worker rank of a --nproc run: rank 0 reports
        return
    r = outcome.result
    early = ", stopped early" if r.stopped_early else ""
    click.echo(f"{outcome.run_name}  run {outcome.run_id}  best_val_acc {r.best_val_acc:.4f} "
               f"(epoch {r.best_epoch}/{r.epochs_run}{early})  {outcome.url}")


def _launch(params: TrainParams) -> None:
    """Re-run this command under torchrun, N processes on this machine; exit with its code.

    Validated here first, so a bad value is one line and no worker starts.
    """
    with user_errors():
        params.validate()
        reachable_tracking_uri()
    args = []
    for field in dataclasses.fields(TrainParams):
        if field.name == "nproc":  # workers read WORLD_SIZE; torchrun would take --nproc
            continue
        value = getattr(params, field.name)
        args += [f"--{field.name.replace('_', '-')}",
                 str(value).lower() if isinstance(value, bool) else str(value)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={params.nproc}", "-m", "pipelines.train", *args]
    code = subprocess.run(command).returncode
    if code:
        sys.exit(code)


def _train_cv(params: TrainParams) -> None:
    from components.steps.crossval import run_cv

    with user_errors():
        outcome = run_cv(params, reachable_tracking_uri())
    m = outcome.metrics
    click.echo(f"{outcome.run_name}  run {outcome.run_id}  {len(outcome.folds)} folds  "
               f"val_acc {m['cv_val_acc_mean']:.4f} ± {m['cv_val_acc_std']:.4f}  "
               f"val_loss {m['cv_val_loss_mean']:.4f} ± {m['cv_val_loss_std']:.4f}  "
               f"{outcome.url}")
    if outcome.ensemble_run_id:
        click.echo(f"fold ensemble run {outcome.ensemble_run_id} "
                   f"(register it: cnnflow evaluate --run-id {outcome.ensemble_run_id})")


if __name__ == "__main__":
    train()
