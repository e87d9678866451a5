"""`cnnflow train` / `mlflow run . -e train`: train one model as one MLflow run."""

from __future__ import annotations

import dataclasses
import os
import sys

import click

from components.config import mask_text
from components.datasets import DataError
from components.engine import EngineError
from components.models import ModelError
from components.services import ServiceError, check_tracking_server, tracking_uri
from components.training import TrainingError, TrainParams
from components.training import train as run_training

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
    "resume": "Run id of an unfinished run to continue from its last checkpoint.",
}

USER_ERRORS = (DataError, ModelError, EngineError, ServiceError, TrainingError,
               FileNotFoundError)


def _options(func):
    """One click option per TrainParams field, so defaults live in exactly one place."""
    for field in reversed(dataclasses.fields(TrainParams)):
        flag = "--" + field.name.replace("_", "-")
        func = click.option(flag, field.name, type=type(field.default), default=field.default,
                            show_default=True, help=HELP[field.name])(func)
    return func


@click.command()
@_options
def train(**kwargs) -> None:
    """Train one model; every epoch is logged to MLflow as it happens."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    params = TrainParams(**kwargs)
    uri = tracking_uri()
    try:
        check_tracking_server(uri)
        outcome = run_training(params, uri)
    except USER_ERRORS as exc:
        raise click.ClickException(mask_text(str(exc).splitlines()[0])) from None
    except KeyboardInterrupt:
        click.echo("interrupted: the run was marked KILLED", err=True)
        sys.exit(130)
    r = outcome.result
    early = ", stopped early" if r.stopped_early else ""
    click.echo(f"{outcome.run_name}  run {outcome.run_id}  best_val_acc {r.best_val_acc:.4f} "
               f"(epoch {r.best_epoch}/{r.epochs_run}{early})  {outcome.url}")


if __name__ == "__main__":
    train()
