"""TP/DP/EP groups, including an instance spread over two 'nodes' launched separately on localhost."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ep_launch import collect, start_ranks
from moeserve.distributed.dispatch import Dispatcher, Placement
from moeserve.distributed.ep_moe import ExpertParallelMoE
from moeserve.distributed.groups import (build_parallel_state, default_backend, free_port, group_ranks, rank_device,
                                         ranks_on_gpu)
from moeserve.kernels.fused_moe import fused_moe_ref


def test_group_layout():
    lists = group_ranks(8, tp=2, dp=4, ep=8)
    assert lists["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lists["dp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert lists["ep"] == [list(range(8))]
    assert group_ranks(4, tp=1, dp=4, ep=2)["ep"] == [[0, 1], [2, 3]]
    with pytest.raises(ValueError, match="must equal the world size"):
        group_ranks(8, tp=2, dp=2, ep=4)
    with pytest.raises(ValueError, match="must divide"):
        group_ranks(6, tp=1, dp=6, ep=4)


def _members(group):
    """The global ranks in `group`, learnt by talking through it."""
    size = dist.get_world_size(group)
    out = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
    dist.all_gather(out, torch.tensor([dist.get_rank()]), group=group)
    return [int(t) for t in out]


def _node_worker(rank, world):
    ps = build_parallel_state(tp=2, dp=2, timeout_s=30)
    out = {"rank": ps.rank, "tp": _members(ps.tp_group), "dp": _members(ps.dp_group), "ep": _members(ps.ep_group),
           "ranks": (ps.tp_rank, ps.dp_rank, ps.ep_rank)}
    # One expert-parallel MoE step over the EP group that spans both nodes.
    g = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(8, 16, 32, generator=g), torch.randn(8, 32, 8, generator=g)
    x = torch.randn(3 * rank, 32, generator=g)  # rank 0 has no tokens
    ids = torch.rand(x.shape[0], 8, generator=g).argsort(dim=1)[:, :2]
    w = torch.rand(x.shape[0], 2, generator=g)
    placement = Placement.contiguous(8, ps.ep)
    mine = placement.rank_experts(ps.ep_rank)
    layer = ExpertParallelMoE(Dispatcher(ps.ep_group, placement, 32, torch.float32, mode="ht"), placement,
                              w13[mine], w2[mine])
    y, ref = layer(x, ids, w), fused_moe_ref(x, w13, w2, w, ids)
    out["err"] = float((y - ref).abs().max()) if len(y) else 0.0
    return out


def test_backend_and_rank_devices():
    assert default_backend("cpu") == "gloo" and default_backend("cuda") == "nccl"
    assert default_backend("cuda", "gloo") == "gloo" and default_backend("cpu", "auto") == "gloo"
    with pytest.raises(ValueError, match="needs GPUs"):
        default_backend("cpu", "nccl")
    with pytest.raises(ValueError, match="use one of"):
        default_backend("cuda", "mpi")
    # One GPU a rank under NCCL; under gloo a node's ranks share its GPUs round-robin.
    assert [rank_device("cuda", r, "nccl", num_gpus=4).index for r in range(4)] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="local rank 2 needs GPU 2, but 2 are visible"):
        rank_device("cuda", 2, "nccl", num_gpus=2)
    assert [rank_device("cuda", r, "gloo", num_gpus=2).index for r in range(5)] == [0, 1, 0, 1, 0]
    assert [ranks_on_gpu(5, g, num_gpus=2) for g in range(2)] == [3, 2]
    assert ranks_on_gpu(2, 0, num_gpus=8) == 1
    assert rank_device("cpu", 3, "gloo") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        rank_device("cuda", 0, "gloo", num_gpus=0)


def test_two_nodes_tcp_rendezvous():
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    addr = f"127.0.0.1:{free_port()}"
    procs = []
    for node in (0, 1):  # two launches, one per "node", meeting at node 0's address
        p, _ = start_ranks(_node_worker, 4, nnodes=2, node_rank=node, addr=addr, ctx=ctx, results=results,
                           timeout_s=40)
        procs += p
    outs = collect(procs, results, 4, timeout_s=60)
    assert [o["rank"] for o in outs] == [0, 1, 2, 3]
    assert [o["tp"] for o in outs] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [o["dp"] for o in outs] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert all(o["ep"] == [0, 1, 2, 3] for o in outs)
    assert [o["ranks"] for o in outs] == [(0, 0, 0), (1, 0, 1), (0, 1, 2), (1, 1, 3)]
    assert all(o["err"] < 1e-4 for o in outs)
