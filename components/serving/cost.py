"""What a model costs to run: parameters, size, latency, throughput and peak memory."""

from __future__ import annotations

import io
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from components.nn.models import count_parameters

WARMUP_RUNS = 2


class PeakMemory:
    """How much memory loading and running a model took, on its device.

    CUDA: `torch.cuda.max_memory_allocated` (tensors only) since `start()`.
    CPU (Linux): growth of the process's peak resident set (VmHWM) over its resident set at
    `start()`; the peak is reset at `start()` through /proc/self/clear_refs, so an earlier,
    bigger allocation in the same process does not hide this one. It counts weights,
    activations and allocator overhead; DataLoader worker processes are not included.
    Elsewhere: the growth of `ru_maxrss`, which cannot be reset (0 when an earlier peak was
    higher). tracemalloc would see none of it: torch allocates outside Python's allocator.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = 0.0
        self.method = ""

    def start(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device) / 2**20
            self.method = "cuda.max_memory_allocated"
        elif _reset_hwm():
            self.baseline = _proc_status_mb("VmRSS")
            self.method = "VmHWM"
        else:
            self.baseline = _maxrss_mb()
            self.method = "ru_maxrss"
        return self

    def peak_mb(self) -> float:
        if self.method.startswith("cuda"):
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.baseline
        if self.method == "VmHWM":
            return max(0.0, _proc_status_mb("VmHWM") - self.baseline)
        return max(0.0, _maxrss_mb() - self.baseline)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return _proc_status_mb("VmHWM") > 0
    except OSError:
        return False


def _proc_status_mb(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _maxrss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB else


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _state_size_bytes(model: Any) -> int:
    nets = [m.model for m in getattr(model, "members", [])] or [model.model]
    total = 0
    for net in nets:
        buffer = io.BytesIO()
        torch.save(net.state_dict(), buffer)
        total += buffer.getbuffer().nbytes
    return total


def measure_cost(model: Any, images: Sequence[Image.Image], batch_size: int,
                 latency_runs: int = 30, throughput_batches: int = 3) -> dict[str, float]:
    """Latency and throughput from decoded images to probabilities (preprocessing + forward).

    Latency: `latency_runs` single-image calls (after warm-up), p50 and p95 in milliseconds.
    Throughput: `throughput_batches` calls on a batch of `batch_size` images (the split's
    images repeated if it has fewer). File reading and decoding are not included.
    """
    device = getattr(model, "device", torch.device("cpu"))
    transforms = model.input_transforms()
    nets = [m.model for m in getattr(model, "members", [])] or [model.model]

    def run(batch: Sequence[Image.Image]) -> None:
        inputs = [torch.stack([t(img) for img in batch]) for t in transforms]
        model.score_batch(inputs)

    latencies = []
    for i in range(WARMUP_RUNS + latency_runs):
        img = images[i % len(images)]
        _sync(device)
        started = time.perf_counter()
        run([img])
        _sync(device)
        if i >= WARMUP_RUNS:
            latencies.append((time.perf_counter() - started) * 1000)
    batch = [images[i % len(images)] for i in range(batch_size)]
    run(batch)  # warm-up at the batch size (allocator, kernels)
    _sync(device)
    started = time.perf_counter()
    for _ in range(throughput_batches):
        run(batch)
    _sync(device)
    elapsed = time.perf_counter() - started
    return {"params_count": float(sum(count_parameters(n) for n in nets)),
            "model_size_mb": _state_size_bytes(model) / 2**20,
            "latency_ms_p50": float(np.percentile(latencies, 50)),
            "latency_ms_p95": float(np.percentile(latencies, 95)),
            "throughput_images_per_sec": batch_size * throughput_batches / max(elapsed, 1e-9)}
