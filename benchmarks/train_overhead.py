"""What cnnflow's `train` costs over a bare PyTorch loop, as a wall-time ratio.

The same model, data and batch size are trained for a few epochs, alternately, in one
process, by

* a bare loop: the plain way a user writes it (Adam, cross-entropy, a train pass and a val
  pass per epoch, a `torch.save(state_dict)` checkpoint per epoch, no MLflow), and
* `components.steps.train.train`: the whole run, logged to a real MLflow tracking server that
  this script starts in a temp folder on a free port (run creation, params and manifest,
  per-epoch metrics and checkpoint uploads, history/curves and the pyfunc model at the end).

Both build their data with `load_splits` + `make_loaders` (augmentation "none") and their
model with `create_model(weights="none")`, under the same seed and torch thread count. After
one untimed warm-up of each (imports, first-run costs), `--repeats` alternating pairs are timed
with `time.perf_counter`. It prints the per-repeat times, the medians, the ratio cnnflow/bare
(target <= 1.05), the per-epoch ratio (sum of `epoch_time_sec`, i.e. train + val passes: does
logging stall training?), the CPU-time ratio (this process plus the MLflow server), where
cnnflow's extra time goes (setup, run start, the epoch loop, the end of the run), and how many
epochs a run needs before its fixed cost fits in the target. The `others` column is CPU time
other processes used meanwhile: on a shared machine, repeat the measurement when it is not ~0.

A third run per round, cnnflow with its live signals off (`heartbeat=0`, `system_metrics=0`),
prices those signals alone: the progress heartbeat (a thread logging `progress/*` every
`--heartbeat` s) and MLflow's system metrics monitor (`system/*` every `--system-metrics` s).
Their defaults here are 1 s, ten times as often as a training run's defaults, so a short
benchmark sees many beats; the section prints the per-epoch ratios signals-on / bare and
signals-on / signals-off (target <= 1.05) and how many beats and samples each run logged.

Run from the repository root (CPU, defaults: about 40 s on 2 idle cores):

    .venv/bin/python benchmarks/train_overhead.py
    .venv/bin/python benchmarks/train_overhead.py --model lenet5 --epochs 5 --repeats 5
    .venv/bin/python benchmarks/train_overhead.py --heartbeat 10 --system-metrics 10
"""

from __future__ import annotations

import argparse
import io
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: import the checkout's package
    sys.path.insert(0, str(ROOT))

TARGET = 1.05
EXPERIMENT = "train-overhead"
_EPOCH_LINE = re.compile(r"\bepoch (\d+)/(\d+)\b")


@dataclass
class Timing:
    """One timed run: total wall time and its phases, all in seconds."""

    total: float = 0.0
    cpu: float = 0.0  # CPU seconds of this process, all threads (upload thread included)
    server_cpu: float = 0.0  # CPU seconds the MLflow server spent meanwhile
    other_cpu: float = 0.0  # CPU seconds every other process on the machine spent meanwhile
    setup: float = 0.0  # data splits, loaders and model (cnnflow: also connecting)
    start: float = 0.0  # cnnflow only: open the run, log params, manifest (before epoch 1)
    loop: float = 0.0  # first epoch's start to last epoch's end, checkpoints included
    finish: float = 0.0  # after the last epoch (cnnflow: flush, history, curves, model)
    epochs: list[float] = field(default_factory=list)  # train + val pass per epoch
    beats: int = 0  # cnnflow only: `progress/*` heartbeats the run logged
    samples: int = 0  # cnnflow only: system metrics samples the run logged


class StampedStream(io.StringIO):
    """A stderr stand-in that remembers when each line was written (cnnflow's epoch lines)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        now = time.perf_counter()
        for line in text.splitlines():
            if line.strip():
                self.lines.append((now, line))
        return super().write(text)

    def epoch_ends(self) -> list[float]:
        """perf_counter time of each `epoch i/n` console line (one per finished epoch)."""
        return [t for t, line in self.lines if _EPOCH_LINE.search(line)]

    def first(self, prefix: str) -> float | None:
        return next((t for t, line in self.lines if line.startswith(prefix)), None)


def group_cpu(pgid: int | None) -> float:
    """CPU seconds used so far by every live process in a process group (Linux /proc; else 0).

    `services.up` starts the MLflow server in its own session, so its group holds the
    `mlflow server` process and its uvicorn worker.
    """
    if pgid is None or not Path("/proc").is_dir():
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:  # fields[2] = pgrp; [11], [12] = utime, stime
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def machine_cpu() -> float:
    """CPU seconds all processes on the machine used so far (Linux /proc/stat; else 0)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    busy = sum(values[:8]) - values[3] - values[4]  # all but idle and iowait (guest is in user)
    return busy / os.sysconf("SC_CLK_TCK")



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from components.params import DataParams

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DataParams.data,
                        help="dataset (default: bundled digits)")
    parser.add_argument("--model", default="custom_cnn")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=DataParams.seed)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (both loops)")
    parser.add_argument("--heartbeat", type=float, default=1.0,
                        help="seconds between progress beats of the signals-on run (default 1)")
    parser.add_argument("--system-metrics", type=float, default=1.0,
                        help="seconds between system metrics samples of the signals-on run "
                             "(default 1)")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.repeats < 1:
        parser.error("--epochs and --repeats must be >= 1")
    return args


# --------------------------------------------------------------------------- the bare loop


def run_bare(args: argparse.Namespace, ckpt_dir: Path) -> Timing:
    """A plain PyTorch loop on the same split, loaders and model; no tracking at all."""
    import torch
    from torch import nn

    from components.data.datasets import load_splits, make_loaders
    from components.nn.engine import resolve_device
    from components.nn.models import create_model, model_normalization

    timing = Timing()
    t0 = time.perf_counter()
    splits = load_splits(args.data, seed=args.seed)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    model, _ = create_model(args.model, len(splits.classes), weights="none",
                            image_size=args.image_size)
    mean, std = model_normalization(args.model)
    loaders = make_loaders(splits, args.image_size, args.batch_size, augmentation="none",
                           mean=mean, std=std, num_workers=args.num_workers, seed=args.seed,
                           device_type=device.type)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    t1 = time.perf_counter()
    timing.setup = t1 - t0

    for epoch in range(1, args.epochs + 1):
        started = time.perf_counter()
        model.train()
        for images, labels in loaders["train"]:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            logits = model(images)
            loss = criterion(logits, labels)
            loss.backward()
            optimizer.step()
            _ = loss.item(), (logits.argmax(1) == labels).sum().item()  # running stats
        model.eval()
        val_loss, correct, seen = 0.0, 0, 0
        with torch.no_grad():
            for images, labels in loaders["val"]:
                images, labels = images.to(device), labels.to(device)
                logits = model(images)
                val_loss += criterion(logits, labels).item() * labels.size(0)
                correct += (logits.argmax(1) == labels).sum().item()
                seen += labels.size(0)
        timing.epochs.append(time.perf_counter() - started)
        torch.save(model.state_dict(), ckpt_dir / f"epoch{epoch}.pt")
    t2 = time.perf_counter()
    timing.loop = t2 - t1
    timing.total = t2 - t0
    return timing


# --------------------------------------------------------------------------- cnnflow's train


def run_cnnflow(args: argparse.Namespace, tracking_uri: str, signals: bool = True) -> Timing:
    """`components.steps.train.train` end to end, its console output captured and time-stamped;
    `signals`: with the heartbeat and system metrics at `--heartbeat` / `--system-metrics`,
    else both off."""
    from mlflow import MlflowClient

    from components.names import PROGRESS_EPOCH
    from components.steps.params import TrainParams
    from components.steps.train import train

    params = TrainParams(
        data=args.data, experiment=EXPERIMENT, model=args.model, weights="none",
        image_size=args.image_size, batch_size=args.batch_size, epochs=args.epochs,
        lr=1e-3, weight_decay=1e-4, patience=0, augmentation="none", seed=args.seed,
        device=args.device, amp="off", num_workers=args.num_workers,
        heartbeat=args.heartbeat if signals else 0.0,
        system_metrics=args.system_metrics if signals else 0.0)
    stream = StampedStream()
    t0 = time.perf_counter()
    with redirect_stderr(stream), redirect_stdout(io.StringIO()):  # MLflow prints run URLs
        outcome = train(params, tracking_uri, progress=False)
    t3 = time.perf_counter()

    timing = Timing(total=t3 - t0)
    timing.epochs = [row["epoch_time_sec"] for row in outcome.result.history]
    data_line, ends = stream.first("data:"), stream.epoch_ends()
    if data_line is not None and len(ends) == len(timing.epochs) and ends:
        loop_start = ends[0] - timing.epochs[0]  # epoch 1's start, from its epoch_time_sec
        timing.setup = data_line - t0
        timing.start = loop_start - data_line
        timing.loop = ends[-1] - loop_start
        timing.finish = t3 - ends[-1]
    client = MlflowClient(tracking_uri)  # after the clock stopped
    timing.beats = len(client.get_metric_history(outcome.run_id, PROGRESS_EPOCH))
    timing.samples = len(client.get_metric_history(outcome.run_id,
                                                   "system/cpu_utilization_percentage"))
    return timing


def disturbed(timing: Timing) -> bool:
    """Other processes used enough CPU during the run to move its wall time noticeably."""
    return timing.other_cpu > max(0.3, 0.05 * timing.total)


def measured(run: Callable[[], Timing], server_pgid: int | None) -> Timing:
    """Run one timed run, adding its CPU time and the server's CPU time meanwhile."""
    cpu0, server0, machine0 = time.process_time(), group_cpu(server_pgid), machine_cpu()
    timing = run()
    timing.cpu = time.process_time() - cpu0
    timing.server_cpu = group_cpu(server_pgid) - server0
    timing.other_cpu = max(0.0, machine_cpu() - machine0 - timing.cpu - timing.server_cpu)
    return timing


# --------------------------------------------------------------------------- report


def report(bare: list[Timing], flow: list[Timing], info: str) -> None:
    def med(runs: list[Timing], value: Callable[[Timing], float]) -> float:
        return statistics.median(value(t) for t in runs)

    def least(runs: list[Timing], value: Callable[[Timing], float]) -> float:
        return min(value(t) for t in runs)

    def wall(t: Timing) -> float:
        return t.total

    def epochs(t: Timing) -> float:
        return sum(t.epochs)

    def cpu(t: Timing) -> float:  # this process plus the tracking server
        return t.cpu + t.server_cpu

    print(info)
    print()
    print(f"{'':>6} {'wall time, s':^27}  {'sum(epoch_time_sec), s':^27}  {'CPU time, s':^27}")
    header = f"{'bare':>8} {'cnnflow':>9} {'ratio':>8}"
    print(f"{'repeat':>6} {header}  {header}  {header}  {'others, s':>10}")
    pairs = list(zip(bare, flow, strict=True))
    quiet = [i for i, (b, f) in enumerate(pairs) if not disturbed(b) and not disturbed(f)]
    rows = [(f"{i + 1}{'' if i in quiet else '*'}", [b], [f], med)
            for i, (b, f) in enumerate(pairs)]
    if quiet and len(quiet) < len(pairs):  # summarise the undisturbed pairs only
        bare, flow = [pairs[i][0] for i in quiet], [pairs[i][1] for i in quiet]
    for name, bs, fs, pick in [*rows, ("median", bare, flow, med), ("min", bare, flow, least)]:
        cells = []
        for value in (wall, epochs, cpu):
            vb, vf = pick(bs, value), pick(fs, value)
            cells.append(f"{vb:>8.2f} {vf:>9.2f} {vf / vb:>8.3f}")
        others = f"{pick(bs, lambda t: t.other_cpu):.1f}/{pick(fs, lambda t: t.other_cpu):.1f}"
        print(f"{name:>6} {'  '.join(cells)}  {others:>10}")
    print("(CPU time: this process plus the MLflow server. others: CPU seconds other processes\n"
          " used during the bare/cnnflow run; * marks a pair they disturbed.)")
    if not quiet:
        print("WARNING: other processes disturbed every repeat: the ratios below are noise; "
              "run again on a quiet machine")
    elif len(quiet) < len(pairs):
        print(f"median and min use the {len(quiet)} undisturbed pair(s) of {len(pairs)}")
    print()
    ratio = med(flow, wall) / med(bare, wall)
    verdict = "OK" if ratio <= TARGET else "ABOVE TARGET"
    verdict += "" if quiet else ", UNRELIABLE"
    print(f"wall-time ratio cnnflow/bare (medians): {ratio:.3f}  (target <= {TARGET}: {verdict})")
    print(f"wall-time ratio of the fastest runs (least disturbed by other load): "
          f"{least(flow, wall) / least(bare, wall):.3f}")
    print(f"per-epoch ratio (sum of train+val pass times): "
          f"{med(flow, epochs) / med(bare, epochs):.3f}")
    print(f"CPU-time ratio (this process + MLflow server): "
          f"{med(flow, cpu) / med(bare, cpu):.3f}  (MLflow server: "
          f"{med(flow, lambda t: t.server_cpu):.2f} s CPU per cnnflow run)")
    print()
    print("where the wall time goes (medians, seconds):")
    rows = [
        ("setup: splits, loaders, model (+ connect)", lambda t: t.setup),
        ("run start: create run, params, manifest", lambda t: t.start),
        ("epoch loop incl. checkpoints + callbacks", lambda t: t.loop),
        ("finish: flush, metrics, history, curves, model", lambda t: t.finish),
        ("total minus sum(epoch_time_sec)", lambda t: t.total - sum(t.epochs)),
    ]
    print(f"  {'phase':<48} {'bare':>7} {'cnnflow':>8} {'extra':>7}")
    for label, value in rows:
        vb, vf = med(bare, value), med(flow, value)
        print(f"  {label:<48} {vb:>7.2f} {vf:>8.2f} {vf - vb:>+7.2f}")

    # cnnflow(E) = outside + fixed + E * epoch * r and bare(E) = outside + E * epoch, so
    # cnnflow/bare <= TARGET once E >= (fixed - (TARGET - 1) * outside) / (epoch * (TARGET - r)).
    outside = med(bare, lambda t: t.total - sum(t.epochs))
    fixed = med(flow, lambda t: t.total - sum(t.epochs)) - outside
    epoch = med(bare, epochs) / len(bare[0].epochs)
    r = med(flow, epochs) / med(bare, epochs)
    print()
    print(f"fixed cost per run: {fixed:.2f} s = {fixed / epoch:.1f} bare epochs of {epoch:.2f} s")
    if quiet and r < TARGET:  # (a disturbed per-epoch ratio is noise: no estimate then)
        need = max(1.0, (fixed - (TARGET - 1) * outside) / (epoch * (TARGET - r)))
        print(f"epochs needed for cnnflow/bare <= {TARGET} at this per-epoch ratio: "
              f"about {need:.0f}")
    elif quiet:
        print(f"per-epoch ratio {r:.3f} >= {TARGET}: no run length meets the target")


def report_signals(bare: list[Timing], on: list[Timing], off: list[Timing],
                   args: argparse.Namespace) -> None:
    """What the heartbeat and system metrics cost: the same cnnflow run with them on and off."""
    def epochs(t: Timing) -> float:
        return sum(t.epochs)

    print()
    print(f"live signals: heartbeat every {args.heartbeat:g} s + system metrics every "
          f"{args.system_metrics:g} s (on) vs both off")
    print(f"{'repeat':>6} {'bare':>8} {'off':>8} {'on':>8} {'on/off':>7} {'beats':>6} "
          f"{'samples':>7}  (sum(epoch_time_sec), s)")
    for i, (b, f, n) in enumerate(zip(bare, off, on, strict=True)):
        mark = "*" if disturbed(b) or disturbed(f) or disturbed(n) else ""
        print(f"{i + 1:>5}{mark or ' '} {epochs(b):>8.2f} {epochs(f):>8.2f} {epochs(n):>8.2f} "
              f"{epochs(n) / epochs(f):>7.3f} {n.beats:>6} {n.samples:>7}")
    mb, mf, mn = (statistics.median(epochs(t) for t in runs) for runs in (bare, off, on))
    ratio = mn / mf
    print(f"median {mb:>8.2f} {mf:>8.2f} {mn:>8.2f} {ratio:>7.3f}")
    print(f"per-epoch ratio, signals on / bare: {mn / mb:.3f}; signals off / bare: "
          f"{mf / mb:.3f}; on / off: {ratio:.3f}  (target <= {TARGET}: "
          f"{'OK' if ratio <= TARGET else 'ABOVE TARGET'})")
    print(f"wall-time ratio on / off (medians): "
          f"{statistics.median(t.total for t in on) / statistics.median(t.total for t in off):.3f}")
    cpu_on, cpu_off = (statistics.median(t.cpu + t.server_cpu for t in runs) for runs in (on, off))
    print(f"CPU-time ratio on / off (this process + MLflow server, medians; steadier than wall "
          f"time on a busy machine): {cpu_on / cpu_off:.3f} ({cpu_on - cpu_off:+.2f} s per run)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME"):
        os.environ.pop(var, None)  # a set tracking URI would make `up` skip the start

    import torch

    from components import services
    from components.data.datasets import load_splits
    from components.nn.engine import resolve_device

    with tempfile.TemporaryDirectory(prefix="cnnflow-bench-") as tmp_name:
        tmp = Path(tmp_name)
        os.environ.setdefault("CNNFLOW_DATA_DIR", str(tmp / "data"))
        home = tmp / "services"
        busy0 = machine_cpu()
        time.sleep(1.0)
        busy = machine_cpu() - busy0  # CPUs other processes keep busy right now
        if busy > 0.3:
            print(f"note: other processes use {busy:.1f} of {os.cpu_count()} CPUs; wall times "
                  "will be noisy (see the 'others' column)", file=sys.stderr, flush=True)
        print("starting a local MLflow server ...", file=sys.stderr, flush=True)
        [server] = services.up(names=["mlflow"], ports={"mlflow": services.free_port()}, home=home,
                               timeout=120)
        try:
            splits = load_splits(args.data, seed=args.seed)  # generates digits on first use
            info = (f"cnnflow train overhead: {args.model} on {splits.name} "
                    f"(train {len(splits.train)}, val {len(splits.val)}), "
                    f"{args.image_size} px, batch {args.batch_size}, {args.epochs} epochs, "
                    f"{args.repeats} repeats, device {resolve_device(args.device).type}, "
                    f"{torch.get_num_threads()} torch threads, num_workers {args.num_workers}\n"
                    f"MLflow server: {server.url} (sqlite + local artifacts, temp folder)")
            bare: list[Timing] = []
            flow: list[Timing] = []
            quiet: list[Timing] = []  # cnnflow with the heartbeat and system metrics off
            for i in range(args.repeats + 1):  # round 0 is the untimed warm-up
                label = "warm-up" if i == 0 else f"repeat {i}/{args.repeats}"
                print(f"{label}: bare ...", file=sys.stderr, flush=True)
                ckpt = tmp / f"bare-{i}"
                ckpt.mkdir()
                b = measured(partial(run_bare, args, ckpt), server.pid)
                print(f"{label}: cnnflow ...", file=sys.stderr, flush=True)
                f = measured(partial(run_cnnflow, args, server.url), server.pid)
                print(f"{label}: cnnflow, heartbeat + system metrics off ...", file=sys.stderr,
                      flush=True)
                q = measured(partial(run_cnnflow, args, server.url, False), server.pid)
                if i:
                    bare.append(b)
                    flow.append(f)
                    quiet.append(q)
            info += (f"\nCPUs busy with other work just before the start: {busy:.2f} of "
                     f"{os.cpu_count()}")
            info += (f"\ncnnflow runs: heartbeat every {args.heartbeat:g} s, system metrics "
                     f"every {args.system_metrics:g} s")
            report(bare, flow, info)
            report_signals(bare, flow, quiet, args)
        finally:
            services.down(["mlflow"], home=home)
    return 0


if __name__ == "__main__":
    sys.exit(main())
