"""Multi-process (DistributedDataParallel) plumbing shared by the training loop and `train`.

The process group is read from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, GROUP_WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so `cnnflow train --nproc N
[--nnodes M ...]` and a hand-written or scheduler-started `torchrun ... -m pipelines.train`
start identical workers. The engine only asks `world()`: with no process group everything
here is a no-op, so single-process code paths stay exactly as they were.

Several machines: `launch` runs torchrun's own agent (c10d rendezvous hosted by node 0) in
this process, so a rendezvous nobody answers is one line after a bounded wait; `shared_splits`
gives every rank rank 0's split (the manifest travels through the process group, not a
shared disk) and `agree` makes the whole group fail together, with one line per machine.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from components.data.datasets import (
    SPLITS,
    DatasetSplits,
    hash_files,
    list_images,
    resolve_data,
)
from components.errors import CnnflowError, one_line


class DistributedError(CnnflowError, RuntimeError):
    """A bad multi-process setting (nproc, device) reported as one line before any work."""


class GroupError(DistributedError):
    """A problem one rank found that the whole process group fails on alike.

    `said_elsewhere` is true on every process but the first of its machine: each machine's
    console gets the line once, not once per process (the command line reads the attribute).
    """

    def __init__(self, message: object = "") -> None:
        super().__init__(message)
        self.said_elsewhere = env_local_rank() != 0


def env_world_size() -> int:
    """Processes torchrun started for this job (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def env_local_world_size() -> int:
    """Processes torchrun started on this machine (all of them without LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(env_world_size())))


def env_nodes() -> int:
    """Machines (torchrun agents) in the job: GROUP_WORLD_SIZE, else processes per machine."""
    if "GROUP_WORLD_SIZE" in os.environ:
        return int(os.environ["GROUP_WORLD_SIZE"])
    return max(1, env_world_size() // max(1, env_local_world_size()))


def node_name() -> str:
    """How messages name this process's machine: host name and global rank."""
    return f"{socket.gethostname()} (rank {os.environ.get('RANK', '0')})"


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


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`) as (host, port), or one line saying what is wrong."""
    try:
        parts = urlsplit(f"//{endpoint}")
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port or parts.path or parts.username or endpoint.strip() != endpoint:
        raise DistributedError(f"rdzv_endpoint '{endpoint}' is not HOST:PORT (a port in "
                               "1-65535): pass node 0's address and a free port on it, the "
                               "same on every node, e.g. 10.0.0.5:29400")
    return host, port


def check_nodes(nnodes: int, node_rank: int, rdzv_endpoint: str) -> None:
    """Reject node settings that cannot form a job, before any process or run is started.

    Under torchrun (WORLD_SIZE set) the rendezvous is done: the endpoint is not needed then.
    """
    if node_rank >= nnodes:
        raise DistributedError(f"node_rank={node_rank} but nnodes={nnodes}: number the nodes "
                               f"0 to {nnodes - 1} (node 0 hosts the rendezvous)")
    if nnodes > 1 and not rdzv_endpoint and env_world_size() == 1:
        raise DistributedError(f"nnodes={nnodes} needs --rdzv-endpoint HOST:PORT: node 0's "
                               "address and a free port on it, the same on every node")
    if rdzv_endpoint and nnodes == 1:
        raise DistributedError("rdzv_endpoint is for training on several machines: add "
                               "--nnodes N (and --node-rank) or drop --rdzv-endpoint")
    if rdzv_endpoint:
        parse_endpoint(rdzv_endpoint)


def launch(module_args: Sequence[str], nproc: int, nnodes: int = 1, node_rank: int = 0,
           rdzv_endpoint: str = "", rdzv_timeout: float = 300) -> int:
    """Run `python -m <module_args>` under torchrun's agent in this process; the exit code.

    One machine: `--standalone`. Several: c10d rendezvous at `rdzv_endpoint`, whose store node
    0 hosts (`is_host`), so the others wait up to `rdzv_timeout` s for it to come up, and node
    0 waits as long for them; no restarts. torchrun's own parser and `run` do the work (the
    same code as the `torchrun` command), so its errors arrive as exceptions: a rendezvous
    that fails is one DistributedError line; a worker that failed has said why itself.
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import (
        RendezvousConnectionError,
        RendezvousError,
        RendezvousTimeoutError,
    )

    argv = [f"--nproc-per-node={nproc}", "--max-restarts=0"]
    seconds = max(1, round(rdzv_timeout))
    host, port = parse_endpoint(rdzv_endpoint) if nnodes > 1 else ("localhost", 0)
    if nnodes == 1:
        argv.append("--standalone")
    else:
        argv += [f"--nnodes={nnodes}", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint={rdzv_endpoint}", "--rdzv-id=cnnflow-train",
                 f"--rdzv-conf=is_host={str(node_rank == 0).lower()},"
                 f"join_timeout={seconds},read_timeout={seconds}"]
    args = torchrun.get_args_parser().parse_args([*argv, "-m", *module_args])
    if nnodes > 1 and node_rank == 0:
        _check_free_port(port)
    elif nnodes > 1 and not _answers(host, port, seconds):  # torchrun would say it in C++
        raise DistributedError(
            f"cannot reach the rendezvous at {host}:{port} within {seconds} s: start node 0 "
            "(--node-rank 0) first, check the host, the port and the firewall")
    # Each outcome below is said in one line (a failed worker says why itself): not again
    # by the agent's log, in its own format.
    agent_log = logging.getLogger("torch.distributed.elastic")
    level = agent_log.level
    agent_log.setLevel(logging.CRITICAL)
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode > 0:
            return failure.exitcode
        raise DistributedError(f"training process rank {rank} was killed "
                               f"({failure.signal_name()}); the others were stopped: out of "
                               "memory? see the system log") from None
    except RendezvousConnectionError as exc:
        if node_rank == 0:
            raise DistributedError(
                f"cannot host the rendezvous on port {port} of this machine "
                f"({_cause(exc)}): pick a free port in --rdzv-endpoint, the same on every "
                "node") from None
        raise DistributedError(
            f"cannot reach the rendezvous at {host}:{port} within {seconds} s: start node 0 "
            "(--node-rank 0) first, check the host, the port and the firewall") from None
    except RendezvousTimeoutError:
        raise DistributedError(
            f"the rendezvous at {host}:{port} did not gather {nnodes} nodes within {seconds} s:"
            f" start every node with --nnodes {nnodes} and --rdzv-endpoint {rdzv_endpoint}"
            ) from None
    except RendezvousError as exc:
        raise DistributedError(f"the rendezvous at {rdzv_endpoint} failed: "
                               f"{_cause(exc)}") from None
    finally:
        agent_log.setLevel(level)
    return 0


def _answers(host: str, port: int, seconds: float) -> bool:
    """Whether something accepts TCP connections at host:port within `seconds` (node 0's
    rendezvous store, started later than this node, is waited for)."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(left, 2.0))):
                return True
        except OSError:
            if time.monotonic() + 0.5 >= deadline:
                return False
            time.sleep(0.5)


def _check_free_port(port: int) -> None:
    """Node 0 hosts the rendezvous store on `port` of every interface: it must be free."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as exc:
            raise DistributedError(
                f"cannot host the rendezvous on port {port} of this machine "
                f"({exc.strerror or exc}): pick a free port in --rdzv-endpoint, the same on "
                "every node") from None


def _cause(exc: BaseException) -> str:
    """The innermost reason of a chained exception, as one line."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return one_line(exc)[:300] or type(exc).__name__


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


def agree(problem: str | None) -> None:
    """Fail the whole group on the first rank's problem (None: this rank is fine).

    Every rank must call it. Ranks that stopped on their own would leave the others waiting
    in their next collective; this way every rank raises the same GroupError together.
    """
    if world()[1] == 1:
        if problem:
            raise GroupError(problem)
        return
    problems: list[Any] = [None] * world()[1]
    dist.all_gather_object(problems, problem)
    first = next((p for p in problems if p), None)
    if first:
        raise GroupError(first)


def same_options(values: dict[str, Any]) -> None:
    """Every rank must run with rank 0's options (the machines were started separately)."""
    if world()[1] == 1:
        return
    theirs: dict[str, Any] = broadcast_object(values)  # type: ignore[assignment]
    differ = sorted(k for k in set(values) | set(theirs) if values.get(k) != theirs.get(k))
    agree(None if not differ else
          f"{node_name()} was started with "
          f"{', '.join(f'{k}={values.get(k)}' for k in differ)}, but rank 0 with "
          f"{', '.join(f'{k}={theirs.get(k)}' for k in differ)}: start every node with the "
          "same options")


def shared_splits(load: Callable[[], DatasetSplits], data: str) -> DatasetSplits:
    """Rank 0's split on every rank: rank 0 runs `load` (scans `data`) and broadcasts the
    manifest; the others find the same relative paths under their own `data`.

    No shared disk is needed and every rank trains on the same split. Each machine but rank
    0's checks that its copy has every file with the same bytes (sha1, hashed once per
    machine); a missing or different file is one line naming the file and the machine.
    """
    rank, size = world()
    if size == 1:
        return load()
    splits = None
    if rank == 0:
        try:
            splits = load()
            payload: Any = _manifest(splits)
        except Exception as exc:  # the others must not wait for a manifest
            broadcast_object(one_line(exc) or type(exc).__name__)
            raise
    payload = broadcast_object(None if rank else payload)
    if isinstance(payload, str):
        raise GroupError(f"rank 0 could not read the data: {payload}")
    if splits is not None:
        agree(None)
        return splits
    problem = None
    try:
        _, root = resolve_data(data)
        splits = _rebuild(payload, root)
        if env_local_rank() == 0:  # one check per machine, by its first process
            problem = _copy_problem(payload, splits)
    except CnnflowError as exc:
        problem = f"{node_name()}: {exc}"
    agree(problem)
    assert splits is not None
    return splits


def _manifest(splits: DatasetSplits) -> dict[str, Any]:
    """A split as relative paths: what travels to the other ranks."""
    sha1 = splits.content_hashes()
    return {"name": splits.name, "classes": list(splits.classes), "presplit": splits.presplit,
            "notes": list(splits.notes),
            "skipped": [(splits.relpath(p), why) for p, why in splits.skipped],
            "splits": {s: [(splits.relpath(p), label) for p, label in splits.split(s)]
                       for s in SPLITS},
            "sha1": {splits.relpath(p): sha1[p] for s in SPLITS for p, _ in splits.split(s)}}


def _rebuild(manifest: dict[str, Any], root: Path) -> DatasetSplits:
    def here(rel: str) -> str:
        return str(root.joinpath(*rel.split("/")))

    lists = {s: [(here(rel), label) for rel, label in manifest["splits"][s]] for s in SPLITS}
    return DatasetSplits(
        name=manifest["name"], root=root, classes=manifest["classes"], **lists,
        skipped=[(here(rel), why) for rel, why in manifest["skipped"]],
        presplit=manifest["presplit"], notes=manifest["notes"],
        hashes={here(rel): sha1 for rel, sha1 in manifest["sha1"].items()})


def _copy_problem(manifest: dict[str, Any], splits: DatasetSplits) -> str | None:
    """Why this machine's copy of the data is not rank 0's (None: it is): a file of the split
    it lacks, an image rank 0 did not see, or a file with other bytes."""
    expected = manifest["sha1"]
    paths = {rel: str(splits.root.joinpath(*rel.split("/"))) for rel in expected}
    missing = [rel for rel, path in paths.items() if not os.path.isfile(path)]
    if missing:
        return (f"{node_name()} lacks {len(missing)} of the {len(paths)} images of the split "
                f"(first: {paths[missing[0]]}): give every node the same data folder "
                "(a copy at its own --data path is fine)")
    seen = set(expected) | {rel for rel, _ in manifest["skipped"]}
    extra = [str(p) for p in list_images(splits.root).images()
             if splits.relpath(str(p)) not in seen]
    if extra:
        return (f"{node_name()} has {len(extra)} images that rank 0's data folder lacks "
                f"(first: {extra[0]}): give every node the same data folder")
    found = hash_files(list(paths.values()))
    differ = [rel for rel, path in paths.items() if found.get(path) != expected[rel]]
    if differ:
        return (f"{node_name()} has {len(differ)} images that differ from rank 0's "
                f"(first: {paths[differ[0]]}): give every node the same data folder")
    return None
