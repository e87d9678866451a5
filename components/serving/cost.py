"""What a model costs to run: parameters, size, latency, throughput and peak memory.

Timings are pinned (warm-up, a minimum of runs and of time, medians) and flagged
(`cost_reliable`) when the machine was too busy for them to mean much."""

from __future__ import annotations

import io
import itertools
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

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


def footprint(model: Any) -> tuple[int, int]:
    """(parameters, bytes of the weights as saved) of a model, an ensemble summed over its
    members; a model that is not a torch network (an ONNX export) says its own."""
    members = getattr(model, "members", None)
    if members:
        parts = [footprint(m) for m in members]
        return sum(p for p, _ in parts), sum(b for _, b in parts)
    if hasattr(model, "footprint"):
        return model.footprint()
    buffer = io.BytesIO()
    torch.save(model.model.state_dict(), buffer)
    return count_parameters(model.model), buffer.getbuffer().nbytes


# The measurement's budget: at least this many timed calls *and* at least this long, so a
# tiny model is timed hundreds of times in a fraction of a second and a big one still
# `latency_runs` times; a cap keeps a pathological case bounded.
MIN_SECONDS = 0.2
MAX_RUNS = 10_000
# When the figures say nothing reliable about the model: the slow tail this much above the
# median (other work stole the CPU mid-measurement), or more runnable work than cores.
SPREAD_LIMIT = 5.0


class Cost(NamedTuple):
    """What `measure_cost` found: metrics to log, the conditions behind them, and a note
    (empty when the figures look reliable)."""

    metrics: dict[str, float]
    context: dict[str, Any]
    note: str


def reliability(latency_p50: float, latency_p95: float, batch_p50: float, batch_p95: float,
                load: float, cores: int) -> list[str]:
    """Why measured figures cannot be trusted (empty list: they can).

    A p95 more than `SPREAD_LIMIT` times its median means the timings were interrupted (the
    issue's custom_cnn: p50 0.44 ms, p95 145 ms); a 1-minute load average above the core
    count means the model shared the CPUs with other work throughout.
    """
    reasons = []
    if latency_p95 > SPREAD_LIMIT * latency_p50:
        reasons.append(f"latency p95 {latency_p95:.3g} ms > {SPREAD_LIMIT:g}x p50 "
                       f"{latency_p50:.3g} ms")
    if batch_p95 > SPREAD_LIMIT * batch_p50:
        reasons.append(f"batch time p95 {batch_p95:.3g} ms > {SPREAD_LIMIT:g}x p50 "
                       f"{batch_p50:.3g} ms")
    if load > cores:
        reasons.append(f"load average {load:.2f} > {cores} cores")
    return reasons


def _timed(call: Callable[[], None], device: torch.device, min_runs: int,
           min_seconds: float) -> list[float]:
    """Milliseconds of each call, repeated until both `min_runs` calls and `min_seconds` of
    timed calls have passed (at most `MAX_RUNS`)."""
    times: list[float] = []
    total = 0.0
    while len(times) < MAX_RUNS and (len(times) < min_runs or total < min_seconds * 1000):
        _sync(device)
        t0 = time.perf_counter()
        call()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000)
        total += times[-1]
    return times


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return 0.0


def measure_cost(model: Any, images: Sequence[Image.Image], batch_size: int,
                 latency_runs: int = 30, throughput_batches: int = 3,
                 min_seconds: float = MIN_SECONDS) -> Cost:
    """Latency and throughput from decoded images to probabilities (preprocessing + forward).

    After `WARMUP_RUNS` untimed calls at each shape, single-image calls are timed until both
    `latency_runs` calls and `min_seconds` have passed (p50, p95 in ms), then calls on a batch
    of `batch_size` images (the split's images repeated) until `throughput_batches` and
    `min_seconds`: throughput is `batch_size` over the median batch time, so one stolen time
    slice cannot halve it. Torch runs with its configured threads. The load average, cores and
    threads go into the context, and `cost_reliable` is 0 when `reliability` finds a reason.
    File reading and decoding are not included.
    """
    device = getattr(model, "device", torch.device("cpu"))
    transforms = model.input_transforms()

    def run(batch: Sequence[Image.Image]) -> None:
        inputs = [torch.stack([t(img) for img in batch]) for t in transforms]
        model.score_batch(inputs)

    load_before = _load()
    single = itertools.count()
    batch = [images[i % len(images)] for i in range(batch_size)]
    for i in range(WARMUP_RUNS):  # allocator, kernels, caches at both shapes
        run([images[i % len(images)]])
        run(batch)
    latencies = _timed(lambda: run([images[next(single) % len(images)]]), device,
                       latency_runs, min_seconds)
    batches = _timed(lambda: run(batch), device, throughput_batches, min_seconds)
    lat_p50, lat_p95 = np.percentile(latencies, [50, 95])
    batch_p50, batch_p95 = np.percentile(batches, [50, 95])
    load, cores = max(load_before, _load()), os.cpu_count() or 1
    reasons = reliability(lat_p50, lat_p95, batch_p50, batch_p95, load, cores)
    params_count, size_bytes = footprint(model)
    metrics = {"params_count": float(params_count),
               "model_size_mb": size_bytes / 2**20,
               "latency_ms_p50": float(lat_p50),
               "latency_ms_p95": float(lat_p95),
               "throughput_images_per_sec": batch_size * 1000 / max(float(batch_p50), 1e-9),
               "cost_reliable": 0.0 if reasons else 1.0}
    context = {"latency_runs": len(latencies), "latency_seconds": sum(latencies) / 1000,
               "throughput_batches": len(batches), "throughput_seconds": sum(batches) / 1000,
               "batch_ms_p50": float(batch_p50), "batch_ms_p95": float(batch_p95),
               "warmup_runs": WARMUP_RUNS, "torch_threads": torch.get_num_threads(),
               "cpu_count": cores, "load_avg_1m": round(load, 2), "unreliable": reasons}
    note = (f"cost figures unreliable ({'; '.join(reasons)}): re-run evaluate on an idle "
            "machine to compare costs" if reasons else "")
    return Cost(metrics, context, note)
