"""Data-parallel attention with expert-parallel MoE: one engine-core process per rank.

Each rank has its own scheduler, KV cache and requests (attention is data parallel), while
its MoE layers hold only its share of the experts and exchange tokens with every other rank
(expert parallel). So every rank must run every forward together: before each step the ranks
agree, in one all_reduce over a CPU (gloo) group, on the largest number of tokens any rank
scheduled and on whether to stop. A rank with nothing scheduled while others work runs a
one-token dummy batch (into the scratch KV block), so the MoE collectives always match.

Ranks are numbered node_rank * ranks_per_node + local rank; on GPU a rank uses cuda:local rank.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from moeserve.config import EngineConfig, ModelConfig, resolve_dtype
from moeserve.distributed.dispatch import resolve_mode
from moeserve.distributed.ep_moe import EPRuntime
from moeserve.distributed.groups import (ParallelState, build_parallel_state, default_backend, init_distributed,
                                         set_parallel_state)
from moeserve.models.loader import check_tensor_parallel

log = logging.getLogger(__name__)


def wire_codecs(config: EngineConfig, model_config: ModelConfig) -> tuple[str, str]:
    """The dispatch and combine codecs; "auto" follows the checkpoint's weight format."""
    auto = "fp8" if model_config.quant_method == "fp8" else "none"
    p = config.parallel
    dispatch = auto if p.dispatch_dtype == "auto" else p.dispatch_dtype
    combine = auto if p.combine_dtype == "auto" else p.combine_dtype
    if combine == "mxfp4":
        raise ValueError("mxfp4 is a dispatch format; combine with none or fp8")
    return dispatch, combine


def validate_parallel(config: EngineConfig, model_config: ModelConfig) -> None:
    """Clear errors up front, before any rank process starts."""
    p = config.parallel
    if p.tp > 1:
        check_tensor_parallel(model_config, p.tp)
    if p.ep == 1:
        return
    if not model_config.n_routed_experts:
        raise ValueError("expert parallelism needs a MoE model")
    slots = model_config.n_routed_experts + p.num_redundant_experts
    if slots % p.ep:
        raise ValueError(f"{model_config.n_routed_experts} experts + {p.num_redundant_experts} redundant slots do not "
                         f"split evenly over {p.ep} expert-parallel ranks; choose --num-redundant-experts to make them")
    wire_codecs(config, model_config)


@dataclass
class DPCoordinator:
    """The per-step agreement between ranks (one small all_reduce on a CPU group)."""

    group: dist.ProcessGroup | None
    rank: int
    world_size: int

    def sync(self, num_tokens: int, stop: bool, graphable: bool = False) -> tuple[int, bool, bool]:
        """-> (max tokens scheduled on any rank, whether any rank asked to stop, whether every rank
        can run this step from a CUDA graph)."""
        t = torch.tensor([num_tokens, int(stop), int(not graphable)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t[0]), bool(t[1]), not bool(t[2])


def setup_rank(config: EngineConfig, model_config: ModelConfig, rank: int) -> DPCoordinator | None:
    """Join the instance's process groups and set up this rank's expert parallelism; call before
    the model is built. Returns None for a single-rank engine (or ep == 1: independent replicas)."""
    p = config.parallel
    if p.world_size == 1 or p.ep == 1:
        return None
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    local_rank = rank % p.ranks_per_node
    node_rank = rank // p.ranks_per_node
    backend = default_backend(device)
    dev = init_distributed(p.dist_init_addr, local_rank, p.ranks_per_node, p.nnodes, node_rank, device,
                           p.dist_timeout_s)
    state: ParallelState = build_parallel_state(tp=p.tp, dp=p.dp, ep=p.ep, device=dev, local_rank=local_rank,
                                                timeout_s=p.dist_timeout_s)
    # Control messages go over gloo even when the data goes over NCCL: they are host values.
    ctrl = dist.new_group(backend="gloo", timeout=timedelta(seconds=p.dist_timeout_s)) if backend == "nccl" else None
    dispatch, combine = wire_codecs(config, model_config)
    mode = None if p.dispatch_backend == "auto" else p.dispatch_backend
    # Forced low-latency: its fixed buffers must hold the largest step (prefill chunks included).
    capacity = p.ll_capacity or (config.scheduler.max_num_batched_tokens if resolve_mode(mode) == "ll" else None)
    state.ep_runtime = EPRuntime(
        state.ep_group, p.ep, model_config.n_routed_experts, model_config.hidden_size,
        resolve_dtype(config.dtype, model_config), dev, dispatch, combine, mode, p.ll_threshold, capacity,
        p.num_redundant_experts, p.eplb_interval, p.eplb_window)
    set_parallel_state(state)
    log.info("rank %d/%d on %s: ep %d, dispatch %s, combine %s, %d expert slots here", rank, p.world_size, dev,
             p.ep, dispatch, combine, state.ep_runtime.placement.slots_per_rank)
    return DPCoordinator(ctrl, rank, p.world_size)


def teardown_rank() -> None:
    set_parallel_state(None)
    if dist.is_initialized():
        dist.destroy_process_group()
