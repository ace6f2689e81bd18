"""Process groups for one serving instance: tensor (TP), attention data (DP) and expert (EP) parallelism.

An instance has world = dp * tp ranks, possibly spread over nnodes machines
(global rank = node_rank * nproc_per_node + local_rank). Rank layout:

    rank = dp_rank * tp + tp_rank

so a TP group is tp consecutive ranks (one node's NVLink domain when tp <= GPUs per node)
and a DP group holds the ranks with the same tp_rank. EP groups are ep consecutive ranks;
with DP attention + EP, ep = dp * tp and the one EP group spans the whole instance.

Every collective gets a deadline: the process groups are created with `timeout`, which gloo
applies to each collective and NCCL's watchdog enforces.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0


@dataclass
class ParallelState:
    """Who this process is and the groups it talks through. Groups are None when of size 1."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device
    tp: int
    dp: int
    ep: int
    tp_rank: int
    dp_rank: int
    ep_rank: int
    tp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    ep_group: dist.ProcessGroup | None
    timeout: timedelta
    ep_runtime: object = None  # moeserve.distributed.ep_moe.EPRuntime when ep > 1 (set by the worker)


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def free_port(span: int = 1) -> int:
    """A port nothing listens on, with the span - 1 ports after it free too when this returns: a
    multi-node instance binds its sockets at dist_init_addr's port + 1, + 2, ... (engine/procs.py),
    and a parallel test run once had one of those taken ("Address already in use")."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + span <= 65536 and all(_bindable(port + i) for i in range(1, span)):
            return port
    raise RuntimeError(f"no {span} consecutive free ports found")


BACKENDS = ("auto", "nccl", "gloo")


def device_type(device: str | torch.device | None = None) -> str:
    """"cuda" or "cpu": the device's type; None and "auto" mean a GPU where one is visible."""
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def default_backend(device: str | torch.device | None = None, backend: str = "auto") -> str:
    """The process-group backend: `backend` unless "auto", which is NCCL on GPUs and gloo on CPU.
    gloo on GPUs stages every collective through host memory (torch's gloo CUDA work): slow, but
    it lets ranks share a GPU, which NCCL refuses (rank_device)."""
    if backend not in BACKENDS:
        raise ValueError(f"dist backend {backend!r}: use one of {BACKENDS}")
    if device_type(device) != "cuda":
        if backend == "nccl":
            raise ValueError("the nccl backend needs GPUs; on CPU use gloo (or auto)")
        return "gloo"
    return "nccl" if backend == "auto" else backend


def rank_device(device: str | torch.device, local_rank: int, backend: str, num_gpus: int | None = None
                ) -> torch.device:
    """The device of a node's local_rank-th rank: cpu, or GPU local_rank. Ranks outnumbering the GPUs
    share them round-robin (GPU local_rank % num_gpus) only under gloo: NCCL runs one rank a GPU."""
    if torch.device(device).type != "cuda":
        return torch.device("cpu")
    num_gpus = torch.cuda.device_count() if num_gpus is None else num_gpus
    if num_gpus < 1:
        raise ValueError("device='cuda' was asked for but no CUDA GPU is visible")
    if local_rank >= num_gpus and backend != "gloo":
        raise ValueError(f"local rank {local_rank} needs GPU {local_rank}, but {num_gpus} are visible: run at most "
                         f"{num_gpus} ranks a node (dist_backend 'gloo' lets ranks share GPUs, for checks, not speed)")
    return torch.device("cuda", local_rank % num_gpus)


def ranks_on_gpu(ranks_per_node: int, gpu: int, num_gpus: int | None = None) -> int:
    """How many of a node's ranks rank_device puts on GPU `gpu` (more than one only under gloo)."""
    num_gpus = torch.cuda.device_count() if num_gpus is None else num_gpus
    return len(range(gpu, ranks_per_node, num_gpus))


def init_distributed(init_addr: str, local_rank: int, nproc_per_node: int, nnodes: int = 1, node_rank: int = 0,
                     device: str | torch.device | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                     backend: str = "auto") -> torch.device:
    """Join the instance's default process group through TCP rendezvous at init_addr ("host:port").

    Rank 0 (node 0, local rank 0) hosts the rendezvous store; every node passes the same address.
    Returns this rank's device (rank_device: cuda:local_rank on GPUs, cpu with gloo on CPU).
    """
    backend = default_backend(device, backend)
    rank = node_rank * nproc_per_node + local_rank
    world = nnodes * nproc_per_node
    dev = rank_device(device_type(device), local_rank, backend)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=f"tcp://{init_addr}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    return dev


def init_from_env(device: str | torch.device | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join through torchrun's environment (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK)."""
    backend = default_backend(device)
    dev = rank_device(device_type(device), int(os.environ.get("LOCAL_RANK", 0)), backend)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout_s))
    return dev


def group_ranks(world: int, tp: int, dp: int, ep: int) -> dict[str, list[list[int]]]:
    """The rank lists of every TP, DP and EP group (pure arithmetic, the same on every rank)."""
    if tp * dp != world:
        raise ValueError(f"tp * dp = {tp} * {dp} must equal the world size {world}")
    if ep < 1 or world % ep:
        raise ValueError(f"ep = {ep} must divide the world size {world}")
    return {
        "tp": [list(range(d * tp, (d + 1) * tp)) for d in range(dp)],
        "dp": [list(range(t, world, tp)) for t in range(tp)],
        "ep": [list(range(g * ep, (g + 1) * ep)) for g in range(world // ep)],
    }


def _new_groups(lists: list[list[int]], rank: int, timeout: timedelta) -> dist.ProcessGroup | None:
    """Every rank must create every group (torch.distributed's rule); keep the one holding `rank`."""
    mine = None
    for ranks in lists:
        if len(ranks) == 1:
            continue
        group = dist.group.WORLD if len(ranks) == dist.get_world_size() else dist.new_group(ranks, timeout=timeout)
        if rank in ranks:
            mine = group
    return mine


def build_parallel_state(tp: int = 1, dp: int = 1, ep: int | None = None, device: torch.device | None = None,
                         local_rank: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> ParallelState:
    """After init_distributed: build the TP/DP/EP groups. ep defaults to dp * tp (DP attention + EP).

    A group of one rank is None: callers skip communication for it (it does NOT mean WORLD here).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    ep = tp * dp if ep is None else ep
    lists = group_ranks(world, tp, dp, ep)
    timeout = timedelta(seconds=timeout_s)
    groups = {name: _new_groups(lists[name], rank, timeout) for name in ("tp", "dp", "ep")}
    backend = dist.get_backend()
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    return ParallelState(
        rank=rank, world_size=world, local_rank=local_rank, backend=backend, device=device, tp=tp, dp=dp, ep=ep,
        tp_rank=rank % tp, dp_rank=rank // tp, ep_rank=rank % ep,
        tp_group=groups["tp"], dp_group=groups["dp"], ep_group=groups["ep"], timeout=timeout)


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# The process-wide state of a rank, set once by the worker before it builds the model (the
# layers read it the way vLLM's layers read their parallel groups). None: a single process.
_STATE: ParallelState | None = None


def set_parallel_state(state: ParallelState | None) -> None:
    global _STATE
    _STATE = state


def get_parallel_state() -> ParallelState | None:
    return _STATE
