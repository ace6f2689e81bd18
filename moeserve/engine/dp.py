"""Data-parallel attention with expert-parallel MoE: one engine core per data-parallel group.

Each data-parallel group has its own scheduler, KV cache and requests (attention is data
parallel), while its MoE layers hold only their share of the experts and exchange tokens with
every other rank (expert parallel). So every group must run every forward together: before each
step the groups' engine cores agree, in one all_reduce over a CPU (gloo) group, on the largest
number of tokens any group scheduled and on whether to stop. A group with nothing scheduled
while others work runs a one-token dummy batch (into the scratch KV block), so the MoE
collectives always match.

A group is one rank, or tp ranks: the group's rank 0 runs the engine core and sends each step,
dummy batches included, to its tp - 1 workers (engine/tp.py), which join the forward.

Ranks are numbered node_rank * ranks_per_node + local rank (= dp_rank * tp + tp_rank); on GPU a
rank uses cuda:local rank (groups.rank_device; under dist_backend "gloo" ranks may share GPUs).
`setup_rank` joins every rank, engine core or worker, to its groups.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from moeserve.config import EngineConfig, ModelConfig, ParallelConfig, resolve_dtype
from moeserve.distributed.dispatch import resolve_ll_transport, resolve_mode
from moeserve.distributed.ep_moe import EPRuntime
from moeserve.distributed.groups import (ParallelState, build_parallel_state, default_backend, device_type,
                                         group_ranks, init_distributed, rank_device, set_parallel_state)
from moeserve.engine.tp import TPChannel
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


def forced_dispatch_mode(p: ParallelConfig) -> str | None:
    """The dispatch kernel the flag forces ("ht" or "ll"), or None for "auto" (chosen per step by load)."""
    return None if p.dispatch_backend == "auto" else p.dispatch_backend


def validate_parallel(config: EngineConfig, model_config: ModelConfig) -> None:
    """Clear errors up front, before any rank process starts."""
    p = config.parallel
    on_gpu = device_type(config.device) == "cuda"
    if on_gpu and default_backend("cuda", p.dist_backend) == "gloo" and not config.enforce_eager:
        # gloo's collectives wait on the host: nothing a CUDA graph could capture
        if p.tp > 1:
            raise ValueError("tensor parallelism over gloo on GPUs cannot capture its all_reduces in CUDA graphs: "
                             "set enforce_eager (or use nccl)")
        if p.ep > 1 and resolve_mode(forced_dispatch_mode(p)) != "ht" and resolve_ll_transport(p.ll_transport) != "peer":
            raise ValueError("expert parallelism over gloo on GPUs captures its decode dispatch in CUDA graphs only "
                             "with ll_transport 'peer' (no collective inside): set it, or enforce_eager")
    if on_gpu and p.world_size > 1:
        rank_device("cuda", p.ranks_per_node - 1, default_backend("cuda", p.dist_backend))  # enough GPUs?
    if p.tp > 1:
        check_tensor_parallel(config.model_build_config(model_config), p.tp, expert_parallel=p.ep > 1)
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
    """The per-step agreement between the data-parallel groups' engine cores (one small all_reduce
    on a CPU group of them; none when there is one group)."""

    group: dist.ProcessGroup | None
    size: int

    def sync(self, num_tokens: int, stop: bool, graphable: bool = False) -> tuple[int, bool, bool]:
        """-> (max tokens scheduled on any group, whether any group asked to stop, whether every
        group can run this step from a CUDA graph)."""
        if self.size == 1:
            return num_tokens, stop, graphable
        t = torch.tensor([num_tokens, int(stop), int(not graphable)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t[0]), bool(t[1]), not bool(t[2])


@dataclass
class RankLinks:
    """How a rank's engine talks to the other ranks: `coordinator` on each data-parallel group's
    engine core when the groups step in lockstep (ep > 1); `tp_channel` inside a TP group."""

    coordinator: DPCoordinator | None = None
    tp_channel: TPChannel | None = None


def eplb_layout(p: ParallelConfig, model_config: ModelConfig) -> tuple[int, int]:
    """(nodes, expert groups) for the load balancer. Hierarchical when the instance spans several
    nodes and the model routes each token to a few expert groups (DeepSeek's n_group/topk_group):
    whole groups stay on one node, with their copies, so a token still reaches at most topk_group
    groups' nodes. Otherwise (one node, or no groups to keep together) one global placement."""
    if p.nnodes > 1 and model_config.n_group > 1 and model_config.n_group % p.nnodes == 0:
        return p.nnodes, model_config.n_group
    return 1, 1


def _control_groups(lists: list[list[int]], rank: int, backend: str, data_group, timeout: timedelta):
    """This rank's group among `lists` for host-valued control messages: the data group itself on
    gloo, else a gloo group (every rank creates every one, in the same order)."""
    if backend == "gloo":
        return data_group
    mine = None
    for ranks in lists:
        group = dist.new_group(ranks, backend="gloo", timeout=timeout)
        if rank in ranks:
            mine = group
    return mine


def setup_rank(config: EngineConfig, model_config: ModelConfig, rank: int) -> RankLinks:
    """Join the instance's process groups, set up this rank's expert parallelism and its control
    channels; call before the model is built (every rank: engine cores and TP workers alike).
    Nothing to join for a single rank, or for independent replicas (dp > 1, tp = ep = 1)."""
    p = config.parallel
    device = device_type(config.device)
    local_rank = rank % p.ranks_per_node
    node_rank = rank // p.ranks_per_node
    backend = default_backend(device, p.dist_backend)
    if device == "cuda" and p.world_size > 1:  # each rank on its GPU, replicas too (the runner takes the current)
        torch.cuda.set_device(rank_device(device, local_rank, backend))
    if p.tp == 1 and p.ep == 1:
        return RankLinks()
    dev = init_distributed(p.dist_init_addr, local_rank, p.ranks_per_node, p.nnodes, node_rank, device,
                           p.dist_timeout_s, backend)
    state: ParallelState = build_parallel_state(tp=p.tp, dp=p.dp, ep=p.ep, device=dev, local_rank=local_rank,
                                                timeout_s=p.dist_timeout_s)
    # Control messages go over gloo even when the data goes over NCCL: they are host values.
    timeout = timedelta(seconds=p.dist_timeout_s)
    lists = group_ranks(p.world_size, p.tp, p.dp, p.ep)
    links = RankLinks()
    if p.tp > 1:
        group = _control_groups(lists["tp"], rank, backend, state.tp_group, timeout)
        # Steps go over the control group (host values); sampled tokens over the data group (device).
        links.tp_channel = TPChannel(group, state.tp_rank, p.tp, data_group=state.tp_group)
    if p.ep > 1:
        # The groups' engine cores (TP rank 0 of each) agree on every step; with one group alone
        # there is nobody to agree with (tp > 1, dp = 1: the TP ranks follow their rank 0 anyway).
        leaders = lists["dp"][0]
        group = _control_groups([leaders], rank, backend, state.dp_group, timeout) if p.dp > 1 else None
        if state.tp_rank == 0:
            links.coordinator = DPCoordinator(group, p.dp)
        dispatch, combine = wire_codecs(config, model_config)
        mode = forced_dispatch_mode(p)
        # Forced low-latency: its fixed buffers must hold the largest step's share per rank
        # (prefill chunks included).
        forced = -(-config.scheduler.max_num_batched_tokens // p.tp) if resolve_mode(mode) == "ll" else None
        state.ep_runtime = EPRuntime(
            state.ep_group, p.ep, model_config.n_routed_experts, model_config.hidden_size,
            resolve_dtype(config.dtype, model_config), dev, dispatch, combine, mode, p.ll_threshold,
            p.ll_capacity or forced, p.num_redundant_experts, p.eplb_interval, p.eplb_window, tp=p.tp,
            eplb_layout=eplb_layout(p, model_config), ll_transport=p.ll_transport, peer_timeout_s=p.dist_timeout_s)
    set_parallel_state(state)
    log.info("rank %d/%d on %s: dp rank %d, tp rank %d/%d, ep %d%s", rank, p.world_size, dev, state.dp_rank,
             state.tp_rank, p.tp, p.ep, "" if state.ep_runtime is None else
             f" (dispatch {state.ep_runtime.dispatcher.dispatch_codec.name}, combine "
             f"{state.ep_runtime.dispatcher.combine_codec.name}, low-latency transport "
             f"{state.ep_runtime.dispatcher.ll_transport}, {state.ep_runtime.placement.slots_per_rank} "
             f"expert slots here)")
    return links


def teardown_rank() -> None:
    set_parallel_state(None)
    if dist.is_initialized():
        dist.destroy_process_group()
