"""`MLflowCallback`: the engine's callbacks as MLflow calls, on one background worker, so
uploads and metric writes never stall the training loop."""

from __future__ import annotations

import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from mlflow import MlflowClient

from components.nn.engine import Callback
from components.tracking import log_metrics


class MLflowCallback(Callback):
    """Logs epoch metrics (step=epoch) and uploads checkpoints, in order, off the hot path."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cnnflow-mlflow")
        self.pending: list[Future] = []
        self.snapshots = Path(tempfile.mkdtemp(prefix="cnnflow-ckpt-"))
        self.copies: list[str] = []

    def _submit(self, fn, *args) -> None:
        self._raise_failures()
        self.pending.append(self.pool.submit(fn, *args))

    def _raise_failures(self) -> None:
        still = []
        for fut in self.pending:
            if fut.done():
                fut.result()  # re-raises an upload or logging error in the training thread
            else:
                still.append(fut)
        self.pending = still

    def on_checkpoint(self, epoch: int, last_path: Path, best_path: Path | None) -> None:
        # Snapshot now: the engine overwrites last.pt next epoch while the upload may still run.
        folder = self.snapshots / str(epoch)
        folder.mkdir()
        self.copies = [shutil.copy2(p, folder / p.name) for p in (last_path, best_path) if p]

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        # One job per epoch, checkpoint before metrics: a logged epoch always has its
        # checkpoint, so a resumed run never logs an epoch twice.
        copies, self.copies = self.copies, []
        self._submit(self._log_epoch, epoch, metrics, copies)

    def _log_epoch(self, epoch: int, metrics: dict[str, float], copies: list[str]) -> None:
        for path in copies:
            self.client.log_artifact(self.run_id, path, artifact_path="checkpoints")
        log_metrics(self.client, self.run_id, metrics, step=epoch)
        if copies:
            shutil.rmtree(Path(copies[0]).parent, ignore_errors=True)

    def flush(self) -> None:
        """Wait for every queued write; call before ending the run, also on failure."""
        try:
            for fut in self.pending:
                fut.result()
        finally:
            self.pending = []
            self.pool.shutdown(wait=True)
            shutil.rmtree(self.snapshots, ignore_errors=True)


