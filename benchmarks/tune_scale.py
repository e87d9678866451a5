"""Tune workers sharing one PostgreSQL study, and the MLflow server on PostgreSQL vs SQLite.

This script starts, in a temp folder, a real PostgreSQL (`components.services.LocalPostgres`,
as the tests' `postgres_server` and `cnnflow up --backend postgresql` do) and two real MLflow
servers (`components.services.up`): one on SQLite, one on that PostgreSQL. Then:

* scale: for 1, 2 and 4 workers (`--workers`), that many `cnnflow tune` processes started
  together on one fresh PostgreSQL study (lenet5, digits at 16 px, 1 epoch per trial,
  `--trials` trials in all, split between the workers) against the PostgreSQL-backed MLflow
  server. Trials per minute from the study's own trial timestamps (first start to last
  completion: the work, not the processes' start-up), and from the wall clock (all of it).
  The study must end with exactly `--trials` trials numbered 0..N-1.
* latency: against each MLflow server, `--train-runs` concurrent `cnnflow train` runs (the same
  tiny model, `--train-epochs` epochs), while a probe client in this process times
  `log_metric` and `search_runs` (p50 / p95), idle first, then under that load.

Ratios printed: trials/min of N workers over 1 worker; PostgreSQL latency over SQLite's.
The machine's load (`os.getloadavg`) is printed before and after: on a shared machine the
figures move with it.

Run from the repository root (about 5 minutes with the defaults on 2 idle cores, much more
when other work shares them):

    .venv/bin/python benchmarks/tune_scale.py
    .venv/bin/python benchmarks/tune_scale.py --workers 1,2 --trials 4 --skip-latency  # quick
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the checkout's package
    sys.path.insert(0, str(ROOT))

from components import services  # noqa: E402 - after the path set-up above
from components.settings import sqlalchemy_url  # noqa: E402

CNNFLOW = str(Path(sys.executable).parent / "cnnflow")
TINY = ["--data", "digits", "--model", "lenet5", "--image-size", "16", "--weights", "none",
        "--augmentation", "none", "--num-workers", "0", "--patience", "0"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4", help="worker counts to time (1,2,4)")
    parser.add_argument("--trials", type=int, default=6,
                        help="trials per study, split between its workers (6)")
    parser.add_argument("--train-runs", type=int, default=4,
                        help="concurrent training runs loading each MLflow server (4)")
    parser.add_argument("--train-epochs", type=int, default=2, help="their epochs (2)")
    parser.add_argument("--idle-probes", type=int, default=30,
                        help="probe requests per operation before the load (30)")
    parser.add_argument("--skip-scale", action="store_true", help="no tune workers")
    parser.add_argument("--skip-latency", action="store_true", help="no latency comparison")
    return parser.parse_args(argv)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def env_for(tracking_uri: str, home: Path) -> dict[str, str]:
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, CNNFLOW_HOME=str(home),
               MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_RUN_ID", None)
    return env


def start_mlflow(home: Path, store: str | None) -> str:
    [status] = services.up(names=["mlflow"], home=home, mlflow_port=services.free_port(),
                           timeout=180, backend_store_uri=store)
    if status.state != "running":
        raise SystemExit(f"MLflow did not start: {status}")
    return services.service_uri("mlflow", home)


# --------------------------------------------------------------------------- scale


def time_workers(n: int, trials: int, storage: str, tracking_uri: str, home: Path) -> dict:
    import optuna

    study = f"scale-{n}w-{int(time.time())}"
    per = [trials // n + (i < trials % n) for i in range(n)]
    cmd = [CNNFLOW, "tune", *TINY, "--epochs", "1", "--experiment", "bench-tune",
           "--space", "lr: loguniform(1e-3, 1e-1)", "--pruner", "none",
           "--storage", storage, "--study", study]
    start = time.monotonic()
    procs = [subprocess.Popen([*cmd, "--n-trials", str(k)], env=env_for(tracking_uri, home),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for k in per]
    errors = [p.communicate()[1] for p in procs]
    wall = time.monotonic() - start
    for p, err in zip(procs, errors, strict=True):
        if p.returncode:
            raise SystemExit(f"a tune worker failed:\n{err[-2000:]}")
    done = optuna.load_study(study_name=study, storage=sqlalchemy_url(storage)).get_trials(
        deepcopy=False)
    numbers = sorted(t.number for t in done)
    assert numbers == list(range(trials)), numbers  # none run twice, none lost
    span = (max(t.datetime_complete for t in done)
            - min(t.datetime_start for t in done)).total_seconds()
    return {"workers": n, "trials": len(done), "span_s": span, "wall_s": wall,
            "per_min": 60 * len(done) / span, "per_min_wall": 60 * len(done) / wall}


# --------------------------------------------------------------------------- latency


def probe_ops(client, exp_id: str, run_id: str) -> dict[str, Callable[[int], object]]:
    return {
        "log_metric": lambda i: client.log_metric(run_id, "probe", float(i), step=i),
        "search_runs": lambda i: client.search_runs([exp_id], max_results=50),
    }


def probe(ops: dict[str, Callable[[int], object]], times: dict[str, list[float]], i: int) -> None:
    for name, op in ops.items():
        t0 = time.perf_counter()
        op(i)
        times[name].append(time.perf_counter() - t0)


def time_latency(tracking_uri: str, runs: int, epochs: int, idle: int, home: Path) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp_id = client.create_experiment(f"bench-probe-{int(time.time())}")
    run_id = client.create_run(exp_id).info.run_id
    ops = probe_ops(client, exp_id, run_id)
    idle_times: dict[str, list[float]] = {k: [] for k in ops}
    for i in range(idle):
        probe(ops, idle_times, i)
    cmd = [CNNFLOW, "train", *TINY, "--epochs", str(epochs), "--experiment", "bench-load"]
    procs = [subprocess.Popen(cmd, env=env_for(tracking_uri, home), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for _ in range(runs)]
    loaded: dict[str, list[float]] = {k: [] for k in ops}
    start, i = time.monotonic(), idle
    while any(p.poll() is None for p in procs):
        probe(ops, loaded, i)
        i += 1
        time.sleep(0.05)
    wall = time.monotonic() - start
    for p in procs:
        if p.returncode:
            raise SystemExit(f"a training run failed:\n{p.stderr.read()[-2000:]}")
    with contextlib.redirect_stdout(io.StringIO()):  # MLflow prints the run's URL
        client.set_terminated(run_id)
    return {"wall_s": wall, "idle": idle_times, "loaded": loaded}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # each table row as it is measured
    # `timeout` / `kill` end the script through `finally`, which stops the servers it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    counts = [int(n) for n in args.workers.split(",") if n.strip()]
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"({os.cpu_count()} CPUs)")
    root = Path(tempfile.mkdtemp(prefix="cnnflow-tune-scale-"))
    root.chmod(0o711)  # as root the server runs as `postgres`, who must enter its folder
    pg = services.LocalPostgres(root / "pg", port=services.free_port(),
                                password=services.new_password())
    homes = {name: root / name for name in ("sqlite", "postgresql", "workers")}
    started: list[Path] = []
    try:
        t0 = time.monotonic()
        pg.start()
        servers = {}
        for name, store in (("sqlite", None), ("postgresql", pg.uri("mlflow_bench"))):
            servers[name] = start_mlflow(homes[name], store)
            started.append(homes[name])
        print(f"PostgreSQL and 2 MLflow servers up in {time.monotonic() - t0:.1f} s")

        if not args.skip_scale:
            storage = pg.uri("optuna_bench")
            rows = [time_workers(n, args.trials, storage, servers["postgresql"],
                                 homes["workers"]) for n in counts]
            base = rows[0]["per_min"]
            print(f"\ntune workers on one PostgreSQL study ({args.trials} trials per study, "
                  "lenet5, digits 16 px, 1 epoch)")
            print(f"{'workers':>7} {'trials':>6} {'span s':>7} {'trials/min':>10} "
                  f"{'x 1 worker':>10} {'wall s':>7} {'trials/min (wall)':>17}")
            for r in rows:
                print(f"{r['workers']:>7} {r['trials']:>6} {r['span_s']:>7.1f} "
                      f"{r['per_min']:>10.1f} {r['per_min'] / base:>10.2f} {r['wall_s']:>7.1f} "
                      f"{r['per_min_wall']:>17.1f}")

        if not args.skip_latency:
            results = {name: time_latency(uri, args.train_runs, args.train_epochs,
                                          args.idle_probes, homes["workers"])
                       for name, uri in servers.items()}
            print(f"\nMLflow server latency, probe client (ms), idle then under "
                  f"{args.train_runs} concurrent training runs ({args.train_epochs} epochs)")
            print(f"{'operation':<32} {'sqlite p50':>10} {'p95':>7} {'postgres p50':>12} "
                  f"{'p95':>7} {'pg/sqlite p50':>13} {'p95':>6}")
            for phase in ("idle", "loaded"):
                for op in results["sqlite"][phase]:
                    s = [1000 * x for x in results["sqlite"][phase][op]]
                    p = [1000 * x for x in results["postgresql"][phase][op]]
                    s50, s95, p50, p95 = (statistics.median(s), percentile(s, 0.95),
                                          statistics.median(p), percentile(p, 0.95))
                    print(f"{f'{op} ({phase}, n={len(s)}/{len(p)})':<32} {s50:>10.1f} "
                          f"{s95:>7.1f} {p50:>12.1f} {p95:>7.1f} {p50 / s50:>13.2f} "
                          f"{p95 / s95:>6.2f}")
            print("training wall time: " + ", ".join(
                f"{name} {r['wall_s']:.1f} s" for name, r in results.items()))
    finally:
        for home in started:
            services.down(["mlflow"], home=home)
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
