"""`cnnflow run` / `mlflow run . -e main`: the whole pipeline, each step reused when it ran."""

from __future__ import annotations

import click

from components.steps.main import TABLE_COLUMNS, PipelineParams, run_pipeline
from pipelines.options import dataclass_options, reachable_tracking_uri, user_errors

HELP = {
    "data": "`digits` (bundled) or a folder: root/<class>/* or root/{train,val,test}/<class>/*.",
    "experiment": "MLflow experiment name (default: the dataset's name).",
    "models": "Comma-separated models to train, e.g. custom_cnn,resnet50,vgg16,mobilenetv2.",
    "weights": "none | imagenet | auto (ImageNet if cached, else random) | PATH.",
    "freeze": "none | backbone | partial:N.",
    "image_size": "Square input size in pixels (also the preprocess cache's size).",
    "batch_size": "Images per batch.",
    "epochs": "Maximum number of epochs per model.",
    "optimizer": "adam | adamw | sgd.",
    "lr": "Learning rate.",
    "augmentation": "Augmentation preset: none | light | strong.",
    "patience": "Early stopping: epochs without val_loss improvement; 0 disables.",
    "val_ratio": "Validation share when the folder is not already split.",
    "test_ratio": "Test share when the folder is not already split.",
    "seed": "Random seed (split, init, batch order).",
    "cache": "Build preprocess's uint8 tensor cache and train from it.",
    "top_k": "Ensemble the k best models by validation accuracy; 0: no ensemble.",
    "vote": "Ensemble vote: soft | logits | hard.",
    "metric": "Metric that picks the best candidate and the promotion rule compares.",
    "min_delta": "The best candidate must beat the champion by at least this much.",
    "sync": "Mirror the experiment into MongoDB at the end (needs MONGO_URI or `cnnflow up`).",
    "report": "Write reports/<experiment>/report.{md,html} and log it into the parent run.",
    "reports_dir": "Folder for the eda and experiment reports.",
    "device": "auto | cpu | cuda | cuda:N | mps.",
    "num_workers": "DataLoader worker processes.",
    "force": "Re-run every step even when a finished run with the same inputs exists.",
}


@click.command()
@dataclass_options(PipelineParams, HELP)
def run_command(**kwargs) -> None:
    """eda -> preprocess -> train -> evaluate -> ensemble -> promote -> sync, as one parent run.

    Re-running the same command reuses every finished step; after an interruption it resumes
    at the first step that did not finish.
    """
    from components.services import ServiceError, check_mongo, mongo_uri
    from components.tracking.comparison import text_table

    params = PipelineParams(**kwargs)
    with user_errors():
        params.validate()
        uri = reachable_tracking_uri()
        mongo = mongo_uri() if params.sync else ""
        try:
            if mongo:
                check_mongo(mongo)
        except ServiceError as exc:  # checked before hours of training, not after
            raise ServiceError(f"{exc}, or pass --sync false") from None
        try:
            outcome = run_pipeline(params, uri, mongo)
        except KeyboardInterrupt:
            click.echo("re-run the same command to resume at the first unfinished step",
                       err=True)
            raise
    steps = outcome.steps
    reused = sum(s.reused for s in steps)
    click.echo(f"\n{outcome.run_name}: {len(steps) - reused} steps ran, {reused} reused  "
               f"{outcome.url}")
    click.echo(text_table(outcome.table, TABLE_COLUMNS))
    if outcome.champion_uri:
        click.echo(f"champion: {outcome.champion_uri}")
    if outcome.report is not None:
        r = outcome.report
        click.echo(f"report: {r.markdown}  {r.html}" + (f"  {r.pdf}" if r.pdf else ""))


run_command.name = "run"

if __name__ == "__main__":
    run_command()
