"""`MLflowCallback`: the engine's callbacks as MLflow calls, on one background thread, so
uploads and metric writes never stall the training loop, and a lost server never stops it.

While the server does not answer, epochs queue up in order (checkpoint, then metrics) and the
thread retries the oldest every few seconds; one line says logging stopped, one that it is
back. `flush(timeout)` bounds how long the end of training waits for that backlog.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from components.errors import one_line
from components.files import temp_prefix
from components.nn.engine import Callback
from components.settings import mask_uri
from components.tracking import log_metrics

RETRY_EVERY = 2.0  # seconds between tries while the server does not answer


def unreachable(exc: BaseException) -> bool:
    """A failure worth retrying: no answer, a timeout or a 5xx, not a refused request (4xx)."""
    if isinstance(exc, MlflowException):
        return exc.get_http_status_code() >= 500
    return isinstance(exc, (ConnectionError, TimeoutError)) or \
        type(exc).__module__.startswith(("requests.", "urllib3."))


@dataclass
class _Epoch:
    """One epoch's writes; `uploaded` spares a retry the checkpoint it already sent."""

    epoch: int
    metrics: dict[str, float]
    copies: dict[str, str] = field(default_factory=dict)  # file name -> snapshot
    uploaded: bool = False


class MLflowCallback(Callback):
    """Logs epoch metrics (step=epoch) and uploads checkpoints, in order, off the hot path."""

    def __init__(self, client: MlflowClient, run_id: str,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> None:
        self.client = client
        self.run_id = run_id
        self.log = log
        self.snapshots = Path(tempfile.mkdtemp(prefix=temp_prefix("ckpt")))
        self.copies: dict[str, str] = {}
        self.backlog: deque[_Epoch] = deque()
        self.error: BaseException | None = None  # a refused write: raised in the training thread
        self.failing_since: float | None = None
        self.closed = False
        self.changed = threading.Condition()
        self.abandon = threading.Event()
        # A daemon thread: a process giving up on a dead server exits without joining it.
        self.thread = threading.Thread(target=self._work, name="cnnflow-mlflow", daemon=True)
        self.thread.start()

    def on_checkpoint(self, epoch: int, last_path: Path, best_path: Path | None) -> None:
        # Snapshot now: the engine overwrites last.pt next epoch while the upload may still run.
        folder = self.snapshots / str(epoch)
        folder.mkdir()
        self.copies = {p.name: shutil.copy2(p, folder / p.name) for p in (last_path, best_path)
                       if p}

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        # One job per epoch, checkpoint before metrics: a logged epoch always has its
        # checkpoint, so a resumed run never logs an epoch twice.
        job = _Epoch(epoch, dict(metrics), self.copies)
        self.copies = {}
        with self.changed:
            if self.error is not None:
                raise self.error  # a refused upload or write, in the training thread
            if len(self.backlog) >= 2:
                # A backlog (server gone): the oldest job not yet started carries the newest
                # checkpoint instead of its own, so at most two are kept and sent. Checkpoints
                # stay ahead of metrics, which is all a resume needs.
                carrier = self.backlog[1]
                for name, path in job.copies.items():
                    old = carrier.copies.get(name)
                    carrier.copies[name] = path
                    if old:
                        Path(old).unlink(missing_ok=True)
                job.copies = {}
            self.backlog.append(job)
            self.changed.notify_all()

    def _work(self) -> None:
        """Log the oldest queued epoch; on no answer, keep it and try again shortly."""
        while True:
            with self.changed:
                while not self.backlog and not self.closed:
                    self.changed.wait()
                if not self.backlog:
                    return
                job = self.backlog[0]
            try:
                self._log_epoch(job)
            except Exception as exc:  # noqa: BLE001 - sorted into retry / refused just below
                if self.abandon.is_set():
                    return
                if not unreachable(exc):
                    with self.changed:
                        self.error = exc
                        self.backlog.clear()
                        self.changed.notify_all()
                    return
                if self.failing_since is None:
                    self.failing_since = time.monotonic()
                    self.log(f"MLflow at {mask_uri(self.client.tracking_uri)} is not answering "
                             f"({_reason(exc)}): training goes on and epoch {job.epoch} onwards "
                             "will be logged when it is back")
                if self.abandon.wait(RETRY_EVERY):
                    return
                continue
            with self.changed:
                self.backlog.popleft()
                left = [j.epoch for j in self.backlog]
                self.changed.notify_all()
            if self.failing_since is not None:
                waited = time.monotonic() - self.failing_since
                self.failing_since = None
                self.log(f"MLflow is answering again after {waited:.0f} s: logged epoch "
                         f"{job.epoch}" + (f", logging epochs {epoch_span(left)}" if left else ""))

    def _log_epoch(self, job: _Epoch) -> None:
        if not job.uploaded:
            for path in job.copies.values():
                self.client.log_artifact(self.run_id, path, artifact_path="checkpoints")
            job.uploaded = True
        # After a failure, a try may have written the metrics and lost only the answer.
        if self.failing_since is None or not self._metrics_logged(job):
            log_metrics(self.client, self.run_id, job.metrics, step=job.epoch)
        for path in job.copies.values():
            Path(path).unlink(missing_ok=True)

    def _metrics_logged(self, job: _Epoch) -> bool:
        """Whether the epoch's metrics are on the server (one batch: all of them or none)."""
        name = next(iter(job.metrics))
        return any(m.step == job.epoch for m in self.client.get_metric_history(self.run_id, name))

    def flush(self, timeout: float | None = None) -> list[int]:
        """Wait for every queued write, at most `timeout` seconds; call before ending the run,
        also on failure. Returns the epochs still not logged (the thread then stops trying);
        raises a write the server refused."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.changed:
            self.closed = True
            self.changed.notify_all()
            while self.backlog and self.error is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self.changed.wait(left)
            missing = [j.epoch for j in self.backlog]
            error = self.error
        if missing:
            self.abandon.set()  # the thread may be inside a request: leave it to time out
        else:
            self.thread.join()
        shutil.rmtree(self.snapshots, ignore_errors=True)
        if error is not None:
            raise error
        return missing


def epoch_span(epochs: list[int]) -> str:
    """`3..7` for a run of epochs, `3` for one."""
    return f"{epochs[0]}..{epochs[-1]}" if len(epochs) > 1 else str(epochs[0])


def _reason(exc: BaseException) -> str:
    """The gist of a connection failure, not urllib3's nested retry story."""
    text = one_line(exc)
    for gist in ("Connection refused", "timed out", "Name or service not known",
                 "Connection reset", "Remote end closed"):
        if gist in text:
            return gist.lower()
    return text[:120]
