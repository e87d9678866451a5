"""A training run's signs of life between epochs: progress heartbeats and system metrics.

An epoch of a large model on a CPU takes minutes, and the engine's metrics arrive once per
epoch, so without more a healthy run looks silent (the mirror would call it `died`) and a
slow one cannot be explained afterwards. `Heartbeat` fixes both, off the training thread:

* `on_batch_end` only stores a tuple (the engine calls it once per batch); a daemon thread
  wakes every `interval` seconds and logs the latest numbers as the `progress/*` metrics
  (`PROGRESS_METRICS`), step = the beat's number, counting on from a resumed run's last beat,
  so MLflow's "latest value" (highest step) is always the newest beat;
* MLflow's own `SystemMetricsMonitor` logs `system/*` (CPU, memory, disk, network, and GPU
  through pynvml when one is present) every `system_metrics` seconds.

A failed log never reaches training: a beat the server does not take is dropped (the next
one carries newer numbers), silently: the epochs' logging already says once that the server
is gone and once that it is back. `stop()` ends both before the run is ended, so nothing is
logged after it.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from mlflow import MlflowClient

from components.names import (
    PROGRESS_BATCH,
    PROGRESS_BATCHES,
    PROGRESS_EPOCH,
    PROGRESS_IMAGES_PER_SEC,
    PROGRESS_METRICS,
)
from components.nn import distributed
from components.nn.config import TrainConfig
from components.nn.engine import Callback
from components.tracking import log_metrics
from components.tracking.callback import _reason, unreachable

STOP_TIMEOUT = 10.0  # seconds `stop` waits for a beat or a system-metrics flush in flight


class _Batch(NamedTuple):
    """The latest batch, as `on_batch_end` saw it (one tuple: the thread reads it whole)."""

    epoch: int
    batch: int
    batches: int
    images: int
    at: float  # time.monotonic()


class Heartbeat(Callback):
    """Logs `progress/*` every `interval` s and starts MLflow's system metrics monitor; both
    run from construction (right after the run opens) until `stop()` (right before it ends).

    `interval` / `system_metrics`: seconds, 0 = off. `world_size`: training processes; the
    engine counts this process's images, so the rate is scaled to the whole job. `resumed`:
    the run logged beats before, which the new ones count on from. `node`: this machine's
    name in the system metric keys of a multi-machine job (`this_node()`).
    """

    def __init__(self, client: MlflowClient, run_id: str, interval: float, *,
                 system_metrics: float = 0.0, world_size: int = 1, resumed: bool = False,
                 node: str | None = None,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> None:
        self.client = client
        self.run_id = run_id
        self.interval = interval
        self.world_size = max(world_size, 1)
        self.log = log
        self.latest: _Batch | None = None
        self.epoch_start: tuple[int, float] = (0, time.monotonic())  # (epoch, when it began)
        self.beats = 0  # the next beat's step
        self.resumed = resumed
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.monitor = start_system_metrics(run_id, client.tracking_uri, system_metrics,
                                            node=node, resumed=resumed) \
            if system_metrics > 0 else None
        if interval > 0:
            self.thread = threading.Thread(target=self._beat, name="cnnflow-heartbeat",
                                           daemon=True)
            self.thread.start()

    # -- the engine's hooks: a few attribute writes each ----------------------------------

    def on_train_start(self, config: TrainConfig, start_epoch: int) -> None:
        self.epoch_start = (start_epoch, time.monotonic())

    def on_batch_end(self, epoch: int, batch: int, batches: int, images: int) -> None:
        self.latest = _Batch(epoch, batch, batches, images, time.monotonic())

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.epoch_start = (epoch + 1, time.monotonic())

    # -- the thread ------------------------------------------------------------------------

    def progress(self) -> dict[str, float]:
        """The numbers a beat logs now: the epoch, batch i of n, images/s since it began
        (epoch 0, batch 0 until the first batch ends)."""
        latest, (epoch, began) = self.latest, self.epoch_start
        if latest is None:
            return {PROGRESS_EPOCH: 0, PROGRESS_BATCH: 0}
        values = {PROGRESS_EPOCH: latest.epoch, PROGRESS_BATCH: latest.batch,
                  PROGRESS_BATCHES: latest.batches}
        if latest.epoch == epoch and latest.at > began:
            values[PROGRESS_IMAGES_PER_SEC] = latest.images * self.world_size / (latest.at - began)
        return values

    def _beat(self) -> None:
        if self.resumed:
            self.beats = _next_step(self.client, self.run_id, PROGRESS_METRICS)
        while not self.stopped.wait(self.interval):
            try:
                log_metrics(self.client, self.run_id, self.progress(), step=self.beats)
            except Exception as exc:  # noqa: BLE001 - a beat never stops training
                if not unreachable(exc):
                    self.log(f"progress heartbeat stopped: MLflow refused it ({_reason(exc)})")
                    return
                # Silent: the epochs' own logging says once that MLflow is gone and once
                # that it is back; beats simply resume with it.
                continue
            self.beats += 1

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """End beats and system metrics (idempotent); call before the run is ended."""
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(timeout)
        stop_system_metrics(self.monitor, timeout)
        self.monitor = None


def _next_step(client: MlflowClient, run_id: str, keys: tuple[str, ...]) -> int:
    """One past the highest step `keys` have on the run (0 when none, or on no answer)."""
    try:
        metrics = client.get_run(run_id).data._metric_objs
    except Exception:  # noqa: BLE001 - the first beat then starts at 0
        return 0
    return 1 + max((m.step for m in metrics if m.key in keys), default=-1)


def this_node() -> str | None:
    """This machine's name in system metric keys (`system/<host>-node<N>/...`) when the job
    (torchrun) spans several machines; None on one machine, where the keys stay `system/...`."""
    if distributed.env_nodes() <= 1:
        return None
    return f"{socket.gethostname()}-node{os.environ.get('GROUP_RANK', '0')}"


def leads_other_node() -> bool:
    """The first process of a machine other than rank 0's, on a multi-machine job: the one
    that logs that machine's system metrics."""
    return this_node() is not None and os.environ.get("LOCAL_RANK", "0") == "0" \
        and os.environ.get("RANK", "0") != "0"


def start_system_metrics(run_id: str, tracking_uri: str, interval: float, *,
                         node: str | None = None, resumed: bool = False) -> Any:
    """MLflow's `SystemMetricsMonitor` on a run opened by cnnflow (not a fluent run), started.

    One sample per `interval` seconds, logged as it is taken; `resumed` continues a resumed
    run's steps. The monitor stops by itself when the run is no longer RUNNING, and on
    `finish()`. MLflow's info and warning lines about it are kept off the console.
    """
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # Its warnings repeat, per sample, the outage the epochs' logging already reported.
    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, samples_before_logging=1,
                                   resume_logging=resumed, node_id=node,
                                   tracking_uri=tracking_uri)
    monitor.start()
    return monitor


def stop_system_metrics(monitor: Any, timeout: float = STOP_TIMEOUT) -> None:
    """End a monitor from `start_system_metrics` (None: nothing to do), waiting at most
    `timeout` s: MLflow's `finish()` joins its thread and flushes without a bound, so it runs
    on a thread of its own, and a server gone at the end costs `timeout`, not HTTP retries."""
    if monitor is None:
        return
    finisher = threading.Thread(target=monitor.finish, daemon=True,
                                name="cnnflow-system-metrics-stop")
    finisher.start()
    finisher.join(timeout)
