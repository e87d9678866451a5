"""How fast `cnnflow sync` mirrors MLflow into Mongo, against a naive one-document-at-a-time sync.

This script starts a real MLflow server and a real `secantusd-py` in a temp folder (free
ports, via `components.services.up`), fills MLflow with `--runs` training-like runs of
`--epochs` epochs each (seven per-epoch metrics, params and tags, written with log_batch;
`--live` of them left RUNNING, the rest FINISHED), then times, against fresh databases:

* full sync: `components.mirror.sync.sync_pass` into an empty mirror;
* no-change pass: the next incremental pass (nothing changed in MLflow);
* reconcile pass: the full listing with fingerprint checks (nothing changed either);
* 5-run update: `--live` running runs each log one more epoch, then an incremental pass;
* naive sync: what the seeds' style would do: list the runs, read every metric history of
  every run with one request each, and `update_one(upsert=True)` every document one at a time
  (it re-reads and rewrites everything on every pass; `--naive-resync` times that second,
  no-change naive pass too, which takes longer than the first on secantusd-py).

Both mirrors are checked to hold the same number of documents. Targets: full sync >= 5x faster
than naive, no-change pass < 0.5 s, 5-run update < 1 s.

Run from the repository root (defaults: 200 runs x 50 epochs, a few minutes on 2 busy cores):

    .venv/bin/python benchmarks/sync.py
    .venv/bin/python benchmarks/sync.py --runs 50 --epochs 20      # quick look
    .venv/bin/python benchmarks/sync.py --runs 1000 --epochs 100   # scale up
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the checkout's package
    sys.path.insert(0, str(ROOT))

from components.names import (  # noqa: E402 - after the path set-up above
    CLASS_NAMES_TAG,
    DATASET_TAG,
    EPOCH_METRICS,
    MODEL_TAG,
    STEP_TAG,
    VERSION_TAG,
)

TARGET_FULL_RATIO = 5.0
TARGET_NOCHANGE_S = 0.5
TARGET_UPDATE_S = 1.0



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200, help="runs in MLflow")
    parser.add_argument("--epochs", type=int, default=50, help="epochs per run")
    parser.add_argument("--live", type=int, default=5,
                        help="runs left RUNNING that gain one epoch for the update pass")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed repeats of the cheap passes (median shown)")
    parser.add_argument("--skip-naive", action="store_true", help="leave out the naive sync")
    parser.add_argument("--naive-resync", action="store_true",
                        help="also time a second naive pass over an unchanged MLflow (slow: "
                             "it rewrites every document one by one)")
    return parser.parse_args(argv)


def epoch_metrics(epoch: int, stamp: int, seed: int):
    from mlflow.entities import Metric

    return [Metric(k, round(1.0 / (epoch + i + seed % 7 + 1), 6), stamp, epoch)
            for i, k in enumerate(EPOCH_METRICS)]


def populate(client, exp_id: str, runs: int, epochs: int, live: int) -> list[str]:
    """`runs` training-like runs; the last `live` ones stay RUNNING. Returns all run ids."""
    from mlflow.entities import Metric, Param, RunTag

    base = int(time.time() * 1000) - (runs + 1) * 600_000  # one run every 10 minutes

    def one(i: int) -> str:
        live_run = i >= runs - live
        # A history, not a burst: finished runs started and ended in the past, like a real
        # tracking server's; the running ones started just now.
        start = int(time.time() * 1000) if live_run else base + i * 600_000
        run = client.create_run(exp_id, run_name=f"custom_cnn-v{i + 1}", start_time=start,
                                tags={STEP_TAG: "train", MODEL_TAG: "custom_cnn",
                                      VERSION_TAG: str(i + 1)})
        run_id = run.info.run_id
        now = start + 5000 * epochs if not live_run else start
        params = [Param(k, v) for k, v in {
            "model": "custom_cnn", "epochs": str(epochs), "lr": "0.001", "batch_size": "32",
            "dropout": "0.5", "optimizer": "adam", "weight_decay": "0.0001", "patience": "10",
            "image_size": "32", "weights": "none", "freeze": "none", "num_classes": "10"}.items()]
        tags = [RunTag(CLASS_NAMES_TAG, ",".join(str(c) for c in range(10))),
                RunTag(DATASET_TAG, "digits")]
        metrics = [m for e in range(1, epochs + 1)
                   for m in epoch_metrics(e, start + 5000 * e if not live_run else now, i)]
        for start in range(0, max(len(metrics), 1), 900):  # log_batch takes 1000 at most
            client.log_batch(run_id, metrics=metrics[start:start + 900],
                             params=params if start == 0 else [],
                             tags=tags if start == 0 else [])
        if not live_run:
            client.log_batch(run_id, metrics=[Metric("best_val_loss", 0.1, now, 0),
                                              Metric("best_val_acc", 0.97, now, 0),
                                              Metric("epochs_run", epochs, now, 0)])
            client.set_terminated(run_id, "FINISHED", end_time=now + 1000)
        return run_id

    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(one, range(runs)))


def naive_sync(client, db, exp_ids: list[str], experiments: dict[str, str]) -> None:
    """The seeds' way: read everything, write one document at a time with update_one."""
    from components.mirror import sync as mirror

    for run in mirror._search(client, exp_ids):
        run_id = run.info.run_id
        rows: dict[int, dict] = {}
        for key in EPOCH_METRICS:
            for m in client.get_metric_history(run_id, key):
                if m.step >= 1:
                    row = rows.setdefault(m.step, {})
                    row[key] = m.value
                    row["timestamp"] = max(row.get("timestamp", 0), m.timestamp)
        status = mirror.mirror_status(run, int(time.time() * 1000), 120)
        doc = mirror.training_doc(run, experiments[run.info.experiment_id], status, [], "")
        db[mirror.TRAININGS].update_one({"_id": run_id}, {"$set": doc}, upsert=True)
        for epoch, row in sorted(rows.items()):
            edoc = mirror.epoch_doc(run_id, epoch, row)
            key = edoc.pop("_id")
            db[mirror.EPOCHS].update_one({"_id": key}, {"$set": edoc}, upsert=True)
        sdoc = mirror.status_doc(run, status, mirror._ms_to_dt(int(time.time() * 1000)))
        db[mirror.STATUS].update_one({"_id": run_id}, {"$set": sdoc}, upsert=True)


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def counts(db) -> tuple[int, int, int]:
    from components.mirror import sync as mirror

    return tuple(db[c].count_documents({}) for c in (mirror.TRAININGS, mirror.EPOCHS,
                                                     mirror.STATUS))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    for var in ("MLFLOW_TRACKING_URI", "MONGO_URI", "MLFLOW_RUN_ID"):
        os.environ.pop(var, None)  # a set URI would make `up` skip the start

    from mlflow import MlflowClient

    from components import services
    from components.mirror import sync as mirror

    with tempfile.TemporaryDirectory(prefix="cnnflow-sync-bench-") as tmp:
        home = Path(tmp) / "services"
        print("starting a local MLflow server and secantusd-py ...", file=sys.stderr, flush=True)
        started = services.up(names=["mlflow", "mongo"], home=home, timeout=120,
                              ports={"mlflow": services.free_port(), "mongo": services.free_port()})
        urls = {s.name: s.url for s in started}
        try:
            client = MlflowClient(urls["mlflow"])
            exp_id = client.create_experiment("sync-bench")
            experiments = {exp_id: "sync-bench"}
            print(f"populating {args.runs} runs x {args.epochs} epochs ...", file=sys.stderr,
                  flush=True)
            with contextlib.redirect_stdout(io.StringIO()):  # MLflow prints each run's URL
                t_pop, run_ids = timed(lambda: populate(client, exp_id, args.runs, args.epochs,
                                                        args.live))
            mongo = mirror.connect_mongo(urls["mongo"])
            fast_db, naive_db = mongo["bench_fast"], mongo["bench_naive"]
            uri = urls["mlflow"]
            options = mirror.SyncOptions(experiments=["sync-bench"], reconcile_every=3600)

            print("full sync ...", file=sys.stderr, flush=True)
            t_full, full = timed(lambda: mirror.sync_pass(client, fast_db, uri, options))
            nochange, reconcile, update = [], [], []
            listed = 0
            for _ in range(args.repeats):
                t, quiet = timed(lambda: mirror.sync_pass(client, fast_db, uri, options))
                assert quiet.changed == 0, quiet.line()
                nochange.append(t)
                listed = quiet.listed
                reconcile.append(timed(lambda: mirror.sync_pass(
                    client, fast_db, uri, mirror.SyncOptions(experiments=["sync-bench"],
                                                             reconcile_every=0)))[0])
            live = run_ids[len(run_ids) - args.live:]
            next_epoch = args.epochs + 1
            for _ in range(args.repeats):
                now = int(time.time() * 1000)
                for i, run_id in enumerate(live):
                    client.log_batch(run_id, metrics=epoch_metrics(next_epoch, now, i))
                t, report = timed(lambda: mirror.sync_pass(client, fast_db, uri, options))
                assert report.changed == len(live), report.line()
                update.append(t)
                next_epoch += 1
            fast_counts = counts(fast_db)

            t_naive = t_naive2 = float("nan")
            if not args.skip_naive:
                print("naive sync ...", file=sys.stderr, flush=True)
                t_naive, _ = timed(lambda: naive_sync(client, naive_db, [exp_id], experiments))
                if args.naive_resync:
                    t_naive2, _ = timed(lambda: naive_sync(client, naive_db, [exp_id],
                                                           experiments))
                assert counts(naive_db) == fast_counts, (counts(naive_db), fast_counts)
            mongo.close()
        finally:
            services.down(["mlflow", "mongo"], home=home)

    med = statistics.median
    total_epochs = args.runs * args.epochs
    print(f"cnnflow sync benchmark: {args.runs} runs x {args.epochs} epochs "
          f"({total_epochs} epoch documents, {len(EPOCH_METRICS)} metrics each), "
          f"{args.live} runs RUNNING, the others finished over the past "
          f"{args.runs * 10 / 60:.0f} h; MLflow server (sqlite) + secantusd-py, local; "
          f"{os.cpu_count()} CPUs")
    print(f"populating MLflow: {t_pop:.1f} s")
    print(f"mirror holds trainings/epochs/status = {fast_counts}")
    print(f"{'pass':<42}{'seconds':>9}   target")
    rows = [("full sync (empty mirror)", t_full, ""),
            ("  of which reading MLflow", full.read_seconds, ""),
            ("  of which writing Mongo", t_full - full.read_seconds, ""),
            (f"no-change pass, incremental ({listed} listed)", med(nochange),
             f"< {TARGET_NOCHANGE_S} s"),
            ("no-change pass, reconcile", med(reconcile), "(full listing)"),
            (f"{args.live} runs +1 epoch, incremental", med(update), f"< {TARGET_UPDATE_S} s"),
            ("naive full sync", t_naive, ""),
            ("naive re-sync (no change)", t_naive2, "")]
    for name, seconds, target in rows:
        if seconds != seconds:  # NaN: not measured
            continue
        print(f"{name:<42}{seconds:>9.3f}   {target}")
    ratio = t_naive / t_full if t_full else float("nan")
    ratio2 = t_naive2 / med(nochange) if med(nochange) else float("nan")
    print(f"full sync: naive / cnnflow = {ratio:.1f}x (target >= {TARGET_FULL_RATIO:g}x)")
    if args.naive_resync:
        print(f"no-change: naive re-sync / incremental pass = {ratio2:.0f}x")
    print(f"full sync wrote {full.changed} runs, {full.epochs} epochs "
          f"({total_epochs / t_full:.0f} epochs/s)")
    verdict = {"full >= 5x naive": args.skip_naive or ratio >= TARGET_FULL_RATIO,
               "no-change < 0.5 s": med(nochange) < TARGET_NOCHANGE_S,
               "5-run update < 1 s": med(update) < TARGET_UPDATE_S}
    print("targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in verdict.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
