"""How long the dashboard's comparison view takes to load its data from a big mirror.

This script starts a real `secantusd-py` in a temp folder (free port, via
`components.services.up`), seeds it directly in the mirror's schema with `--runs` trainings
(full documents: params, metrics and tags maps included, as `cnnflow sync` writes them) and
`--epochs` epoch documents per run, creates the mirror's indexes, and then times, with the
functions the page calls (components/mirror/dashboard/data.py):

* comparison view: filter options + the run table + sort + the bar chart's data + the overlaid
  curves of the 3 best runs (what one rerun of the page reads);
* filtered comparison: the same with a model filter;
* time filter: the table of the last 30 days;
* detail picker: the run list of the detail view, then one run's detail and curves;
* whole page: the comparison view rendered by Streamlit's AppTest (in-process: queries,
  pandas, plotly figures and the 1,000-row table, without a browser's drawing time);
* naive load (for scale): every trainings document in full plus every epoch document, what a
  page that loads everything and filters in pandas would read.

Run from the repository root (defaults: 1,000 runs x 100 epochs; seeding takes a minute or two):

    .venv/bin/python benchmarks/dashboard_load.py
    .venv/bin/python benchmarks/dashboard_load.py --runs 200 --epochs 50   # quick look
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the checkout's package
    sys.path.insert(0, str(ROOT))

MODELS = ("custom_cnn", "lenet5", "resnet18", "resnet50", "vgg16", "mobilenetv2")
STATUSES = ("completed",) * 8 + ("failed", "killed")



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="trainings documents")
    parser.add_argument("--epochs", type=int, default=100, help="epoch documents per run")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median shown)")
    parser.add_argument("--skip-naive", action="store_true", help="leave out the naive load")
    return parser.parse_args(argv)


def training(i: int, now: datetime, epochs: int, rng: random.Random) -> dict[str, Any]:
    """A trainings document shaped like the mirror's (same fields, realistic sizes)."""
    from components.mirror.sync import safe_key

    model = MODELS[i % len(MODELS)]
    start = now - timedelta(hours=i * 2)  # 1,000 runs span about 83 days
    acc = round(rng.uniform(0.5, 0.99), 4)
    run_id = f"{i:032x}"
    params = {"lr": "0.001", "batch_size": "32", "dropout": "0.3", "epochs": str(epochs),
              "optimizer": "adam", "weight_decay": "0.0001", "image_size": "64",
              "freeze": "none", "patience": "5", "weights": "none", "seed": str(i),
              "augmentation": "light", "num_classes": "10", "num_workers": "2"}
    metrics = {k: rng.random() for k in ("train_loss", "train_acc", "val_loss", "val_acc", "lr",
                                          "best_val_loss", "best_val_acc", "test_loss",
                                          "test_acc", "epochs_run", "epoch_time_sec")}
    tags = {safe_key(k): v for k, v in {
        "cnnflow.step": "train", "cnnflow.model": model, "cnnflow.version": str(i // 6 + 1),
        "cnnflow.dataset": "digits", "cnnflow.dataset_digest": f"d{i % 3}",
        "cnnflow.weights_source": "none", "mlflow.runName": f"{model}-v{i // 6 + 1}",
        "mlflow.user": "bench", "mlflow.source.name": "cnnflow"}.items()}
    return {"_id": run_id, "run_id": run_id, "run_name": f"{model}-v{i // 6 + 1}",
            "experiment": f"exp{i % 4}", "experiment_id": str(i % 4), "step": "train",
            "model_name": model, "version": i // 6 + 1, "num_classes": 10,
            "class_names": [str(c) for c in range(10)], "feature_extraction": False,
            "dropout": 0.3, "batch_size": 32, "learning_rate": 0.001, "optimizer": "adam",
            "weight_decay": 0.0001, "early_stopping": True, "patience": 5, "image_size": 64,
            "weights": "none", "dataset": "digits", "epochs_run": epochs, "max_epochs": epochs,
            "train_accuracy": min(acc + 0.03, 1.0), "val_accuracy": acc, "test_accuracy": acc,
            "best_val_loss": round(1 - acc, 4), "test_loss": round(1.1 - acc, 4),
            "duration_sec": 60.0 * epochs, "start_time": start,
            "end_time": start + timedelta(seconds=60 * epochs),
            "status": STATUSES[i % len(STATUSES)], "params": params, "metrics": metrics,
            "tags": tags, "mlflow_url": f"http://127.0.0.1:5000/#/experiments/1/runs/{run_id}"}


def epoch_docs(run: dict[str, Any], epochs: int) -> list[dict[str, Any]]:
    start = run["start_time"]
    return [{"_id": f"{run['run_id']}:{e}", "run_id": run["run_id"], "epoch": e,
             "train_loss": 1.0 / e, "train_acc": 1 - 0.5 / e, "val_loss": 1.1 / e,
             "val_acc": 1 - 0.6 / e, "lr": 0.001, "epoch_time_sec": 60.0,
             "train_images_per_sec": 500.0, "timestamp": start + timedelta(seconds=60 * e)}
            for e in range(1, epochs + 1)]


def seed(db, runs: int, epochs: int) -> None:
    from components.mirror.sync import EPOCHS, STATUS, TRAININGS, ensure_indexes

    ensure_indexes(db)
    rng = random.Random(0)
    now = datetime.now(UTC).replace(microsecond=0)
    docs = [training(i, now, epochs, rng) for i in range(runs)]
    db[TRAININGS].insert_many(docs, ordered=False)
    db[STATUS].insert_many([{"_id": d["_id"], "run_id": d["run_id"], "status": d["status"],
                             "start_time": d["start_time"], "end_time": d["end_time"],
                             "current_epoch": epochs, "max_epochs": epochs,
                             "last_heartbeat": d["end_time"], "updated_at": now}
                            for d in docs], ordered=False)
    batch: list[dict[str, Any]] = []
    for doc in docs:
        batch.extend(epoch_docs(doc, epochs))
        if len(batch) >= 10000:
            db[EPOCHS].insert_many(batch, ordered=False)
            batch = []
    if batch:
        db[EPOCHS].insert_many(batch, ordered=False)


def comparison_load(db, models: list[str] | None = None) -> int:
    """What one rerun of the comparison view reads; returns the table's row count."""
    from components.mirror.dashboard import data

    data.filter_options(db)
    frame = data.load_runs(db, models=models or ())
    frame = data.sort_runs(frame, "test_accuracy", ascending=False)
    data.best_test_accuracy_by_model(frame)
    best = list(frame.dropna(subset=["test_accuracy"]).nlargest(3, "test_accuracy")["run_id"])
    data.load_curves(db, best)
    return len(frame)


def time_load(db) -> int:
    from components.mirror.dashboard import data

    today = datetime.now(UTC).date()
    start, end = data.day_range(today - timedelta(days=30), today)
    return len(data.load_runs(db, start=start, end=end))


def detail_load(db) -> int:
    from components.mirror.dashboard import data

    choices = data.run_choices(db)
    run_id = choices[len(choices) // 2]["run_id"]
    data.run_detail(db, run_id)
    return len(data.load_curves(db, [run_id]))


def naive_load(db) -> int:
    import pandas as pd

    from components.mirror.sync import EPOCHS, TRAININGS

    runs = pd.DataFrame(list(db[TRAININGS].find({})))
    epochs = pd.DataFrame(list(db[EPOCHS].find({})))
    return len(runs) + len(epochs)


def page_load(uri: str) -> Callable[[], int]:
    """A rerun of the whole comparison page in AppTest (the app's own code path)."""
    from streamlit.testing.v1 import AppTest

    os.environ["MONGO_URI"] = uri
    app = AppTest.from_file(str(ROOT / "components" / "mirror" / "dashboard" / "app.py"),
                            default_timeout=120)
    app.run()
    app.radio(key="view").set_value("Model comparison").run()

    def rerun() -> int:
        app.run()
        assert not app.exception, [e.value for e in app.exception]
        return len(app.dataframe[0].value)

    return rerun


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        began = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.pop("MONGO_URI", None)  # a set URI would make `up` skip the start

    from components import services
    from components.mirror.sync import connect_mongo

    with tempfile.TemporaryDirectory(prefix="cnnflow-dashboard-bench-") as tmp:
        home = Path(tmp) / "services"
        print("starting secantusd-py ...", file=sys.stderr, flush=True)
        [started] = services.up(names=["mongo"], home=home, timeout=120,
                                ports={"mongo": services.free_port()})
        try:
            client = connect_mongo(started.url, timeout=10)
            db = client["dashboard_bench"]
            print(f"seeding {args.runs} runs x {args.epochs} epochs ...", file=sys.stderr,
                  flush=True)
            began = time.perf_counter()
            seed(db, args.runs, args.epochs)
            t_seed = time.perf_counter() - began
            rows = [("comparison view", *timed(lambda: comparison_load(db), args.repeats)),
                    ("comparison, model filter",
                     *timed(lambda: comparison_load(db, ["resnet18"]), args.repeats)),
                    ("time filter (30 days)", *timed(lambda: time_load(db), args.repeats)),
                    ("detail picker + one run", *timed(lambda: detail_load(db), args.repeats)),
                    ("whole page (AppTest rerun)",
                     *timed(page_load(f"{started.url}/dashboard_bench"), args.repeats))]
            if not args.skip_naive:
                print("naive load ...", file=sys.stderr, flush=True)
                rows.append(("naive: everything", *timed(lambda: naive_load(db), 1)))
            client.close()
        finally:
            services.down(["mongo"], home=home)

    print(f"dashboard data load, {args.runs} runs x {args.epochs} epochs in secantusd-py "
          f"(seeded in {t_seed:.1f} s); median of {args.repeats}:")
    print(f"  {'what':<28}{'seconds':>9}{'rows':>9}")
    for name, seconds, count in rows:
        print(f"  {name:<28}{seconds:>9.3f}{count:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
