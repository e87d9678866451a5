"""`cnnflow lr-find`: the learning-rate range test as its own run, to pick `train --lr`.

The sweep (components/nn/lr_find.py) runs on exactly what `train` would build with the same
options: the split, the seeded model and the train loader come from
`components.steps.train.prepare`, the optimiser, weight decay and label smoothing from the
recipe. The run `lr-find-vN` (in the dataset's experiment, like train's) logs the sweep's
parameters, the metric `suggested_lr` (and `lr_find_diverged`), the curve as metrics per
batch (`lr_find_lr`, `lr_find_loss`, `lr_find_smoothed_loss`, step = batch) and as
`lr_find/lr_find.csv`, and the figure `lr_find/lr_find.png` with the suggestion marked.
`train --lr auto` runs the same test inside the training run instead (components/steps/train.py).
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import Metric

from components import tracking
from components.files import temp_prefix
from components.names import DATASET_DIGEST_TAG, DATASET_TAG
from components.steps.params import LrFindParams
from components.steps.train import log_range_test, prepare

STEP = "lr-find"


@dataclass
class LrFindOutcome:
    run_id: str
    run_name: str
    experiment_id: str
    suggestion: float
    start_lr: float  # the swept range, as far as it went
    end_lr: float
    batches: int
    diverged: bool
    url: str = ""


def run_lr_find(params: LrFindParams, tracking_uri: str, *,
                log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
                job_run_id: str | None = None) -> LrFindOutcome:
    """Sweep the LR on `train`'s model and data and log an `lr-find-vN` run; every input check
    (parameters, data, model) passes before the run exists. `job_run_id`: the run opened for
    this job (`mlflow run`)."""
    from components.nn.lr_find import range_test

    params.validate()
    client = tracking.connect(tracking_uri)
    ready = prepare(client, params.train_params(), log, job_run_id=job_run_id)
    splits = ready.splits
    tags = {DATASET_TAG: splits.name, DATASET_DIGEST_TAG: splits.digest()}
    run_id, exp_id, run_name = tracking.open_run(
        client, step=STEP, experiment=params.experiment or splits.name, adopt=job_run_id,
        tags=tags)
    with tracking.ending_run(client, run_id):
        present = client.get_run(run_id).data.params  # `mlflow run` logged its -P values
        logged = {**params.logged(), "data": ready.params.data,
                  "n_train": len(splits.train), "weights_source": ready.weights_source}
        tracking.log_params_and_tags(
            client, run_id, {k: v for k, v in logged.items() if k not in present}, {})
        log(f"{run_name}: {params.num_batches} batches, lr {params.start_lr:g} to "
            f"{params.end_lr:g} ({params.model}, {params.optimizer})")
        test = range_test(ready.model, ready.loaders["train"], params.engine_config(),
                          device=ready.device, start_lr=params.start_lr, end_lr=params.end_lr,
                          num_batches=params.num_batches, class_weights=ready.weights)
        _log_curve(client, run_id, test)
        tracking.log_metrics(client, run_id, {"suggested_lr": test.suggestion,
                                              "lr_find_diverged": float(test.diverged),
                                              "lr_find_batches": len(test.lrs)})
        with tempfile.TemporaryDirectory(prefix=temp_prefix("lr-find")) as tmp:
            log_range_test(client, run_id, test, Path(tmp) / "lr_find")
    return LrFindOutcome(run_id, run_name, exp_id, test.suggestion, test.lrs[0], test.lrs[-1],
                         len(test.lrs), test.diverged,
                         tracking.run_url(tracking_uri, exp_id, run_id))


def _log_curve(client, run_id: str, test, chunk: int = 1000) -> None:
    """The curve as metrics with step = batch, so the MLflow UI draws it (log_batch takes at
    most 1000 metrics a request)."""
    now = int(time.time() * 1000)
    metrics = [Metric(name, float(value), now, step)
               for step, (lr, loss, smooth) in enumerate(
                   zip(test.lrs, test.losses, test.smoothed, strict=True))
               for name, value in (("lr_find_lr", lr), ("lr_find_loss", loss),
                                   ("lr_find_smoothed_loss", smooth))]
    for start in range(0, len(metrics), chunk):
        client.log_batch(run_id, metrics=metrics[start:start + chunk])


def summary(outcome: LrFindOutcome) -> list[str]:
    """What the command line prints: the suggestion, the run, and the next command."""
    how = ("; the loss diverged, the sweep stopped early" if outcome.diverged else "")
    return [f"{outcome.run_name}  run {outcome.run_id}  suggested lr {outcome.suggestion:.3g} "
            f"(steepest descent of the smoothed loss over {outcome.batches} batches, lr "
            f"{outcome.start_lr:.2g} to {outcome.end_lr:.2g}{how})  {outcome.url}",
            f"next: cnnflow train --lr {outcome.suggestion:.3g}  (with the same model and data "
            "options; or train --lr auto)"]
