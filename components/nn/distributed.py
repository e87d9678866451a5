"""Multi-process (DistributedDataParallel) plumbing shared by the training loop and `train`.

The process group is read from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), so `cnnflow train --nproc N` and a hand-written
`torchrun --nproc-per-node N -m pipelines.train ...` start identical workers. The engine only
asks `world()`: with no process group everything here is a no-op, so single-process code
paths stay exactly as they were.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from components.errors import CnnflowError


class DistributedError(CnnflowError, RuntimeError):
    """A bad multi-process setting (nproc, device) reported as one line before any work."""


def env_world_size() -> int:
    """Processes torchrun started for this job (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world() -> tuple[int, int]:
    """(rank, world_size) of the live process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Rank 0 is the only process that talks to MLflow and writes checkpoints."""
    return world()[0] == 0


def check_nproc(nproc: int, device: str) -> None:
    """Reject nproc values that cannot work, before any process or run is started."""
    if nproc < 1:
        raise DistributedError(f"nproc must be >= 1 (got {nproc})")
    if nproc > 1 and device.startswith("cuda:"):
        raise DistributedError(f"nproc={nproc} puts one process on each GPU: use --device cuda "
                               f"(not {device}), and CUDA_VISIBLE_DEVICES to pick the GPUs")
    if nproc > 1 and (device == "cuda" or (device == "auto" and torch.cuda.is_available())):
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if nproc > available:
            raise DistributedError(f"nproc={nproc} with device {device} needs {nproc} GPUs, "
                                   f"but {available} are visible; lower --nproc or use "
                                   "--device cpu")


def device_for_rank(device: str) -> str:
    """One GPU per process: `cuda` becomes `cuda:LOCAL_RANK`; CPU and MPS are unchanged."""
    if env_world_size() == 1:
        return device
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return f"cuda:{env_local_rank()}"
    return device


def init_process_group(device_type: str) -> None:
    """NCCL between GPUs, gloo on CPU; idempotent so a caller that set one up keeps it."""
    if dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(env_local_rank())
    dist.init_process_group(backend=backend)


def destroy_process_group(wait_for_all: bool = False) -> None:
    """Leave the process group; `wait_for_all` first waits for every rank to get here.

    On success the ranks leave together: a rank that tears gloo down while a peer is still
    talking to it can abort that peer ("terminate called without an active exception").
    After a failure nobody waits - the failed rank will never arrive.
    """
    if dist.is_available() and dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()


def sum_across_ranks(values: Sequence[float], device: torch.device) -> list[float]:
    """Element-wise sum of per-rank numbers (loss sums, correct and sample counts).

    Sums, not means, are reduced so the result is the same mean a single process computes
    over the union of the shards, whatever each rank's share. float64 keeps counts exact.
    """
    if world()[1] == 1:
        return list(values)
    # NCCL only reduces CUDA tensors; gloo takes CPU ones.
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(list(values), dtype=torch.float64, device=on)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def sync_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running stats) before evaluating.

    DDP broadcasts buffers at the start of each training forward, so after the last batch
    each rank holds stats updated by its own shard; evaluating with those would make the
    reduced val metrics a mix of models, not the checkpointed rank-0 one.
    """
    if world()[1] == 1:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank (e.g. the run id, which only rank 0 knows); every rank of
    the group must call it."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
