"""Peer memory (moeserve/distributed/peer_memory.py) on 2 gloo ranks in separate processes: what one
rank stores into another's buffer is there after the barrier, the shared-memory names are gone
once every rank has mapped them, release() unmaps the peers, ranks on different hosts are refused, and the device barrier
kernel (run by the Triton interpreter over the processes' shared buffers) meets, counts its
epochs, and gives up at its deadline with an error the host raises instead of hanging.
The dispatch/combine built on it: test_ep_moe.py and test_wire_kernels.py ("llp")."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ep_launch import run_ranks  # noqa: E402
from tests.helpers import interpreter_results as run_interpreted  # noqa: E402
from tests.helpers import print_interpreter_cases  # noqa: E402


def _stores(rank, world, kernel):
    from moeserve.distributed.peer_memory import PeerBuffers

    pb = PeerBuffers(dist.group.WORLD, {"a": 40, "b": 1000}, "cpu", timeout_s=60.0)
    for r, view in enumerate(pb.peer_views("b")):
        view.view(torch.int32)[rank * 10:(rank + 1) * 10] = 1000 * rank + 10 * r + torch.arange(10, dtype=torch.int32)
    pb.barrier(kernel)
    got = pb.local("b").view(torch.int32)[:10 * world].tolist()
    out = {"got": got, "epoch": None, "timeout": None, "offsets": pb.offsets}
    if kernel:
        for _ in range(3):
            pb.barrier(True)
        pb.check()  # no timeout so far
        out["epoch"] = int(pb.epoch[0])
        short = PeerBuffers(dist.group.WORLD, {"a": 8}, "cpu", timeout_s=1.0)
        if rank == 0:  # rank 1 never arrives at this one
            short.barrier(True)
            try:
                short.check()
            except RuntimeError as e:
                out["timeout"] = f"{type(e).__name__}: {e}"
        dist.barrier()
    pb.release()  # a collective: afterwards this rank maps only its own buffer
    out["mapped_after_release"] = [p.data_ptr() == pb.buffer.data_ptr() for p in pb.peers]
    return out


def _check_stores(results, world, kernel):
    for rank, r in enumerate(results):
        assert r["got"] == [1000 * src + 10 * rank + i for src in range(world) for i in range(10)]
        assert r["offsets"] == {"a": (256, 40), "b": (512, 1000)}  # flags first, 256-byte aligned regions
        assert r["mapped_after_release"] == [True]
    if kernel:
        assert [r["epoch"] for r in results] == [4, 4]
        assert "PeerTimeout: rank 0: a peer barrier waited more than 1s for rank 1" in results[0]["timeout"]
        assert results[1]["timeout"] is None


def _shared_names() -> set[str]:
    from moeserve.distributed.peer_memory import _shm_dir

    return {n for n in os.listdir(_shm_dir()) if n.startswith("moeserve-peer-")}


def test_stores_are_visible_after_the_host_barrier():
    before = _shared_names()
    _check_stores(run_ranks(_stores, 2, False, timeout_s=60), 2, kernel=False)
    assert _shared_names() <= before  # every rank removed its file's name once all had mapped it


def _two_hosts(rank, world):
    from moeserve.distributed.peer_memory import PeerBuffers

    if rank == 1:  # as if this rank ran on another machine
        socket.gethostname = lambda: "other-host"
    try:
        PeerBuffers(dist.group.WORLD, {"a": 8}, "cpu")
    except ValueError as e:
        return str(e)
    return None


def test_ranks_on_two_hosts_are_refused():
    for message in run_ranks(_two_hosts, 2, timeout_s=60):
        assert message and "one host" in message and "other-host" in message


def test_dispatcher_settings_are_checked():
    from moeserve.distributed.dispatch import Dispatcher, Placement

    placement = Placement.contiguous(8, 1)
    with pytest.raises(ValueError, match="ll_transport"):
        Dispatcher(None, placement, 64, ll_transport="nvlink")
    with pytest.raises(ValueError, match="peer transport has none"):
        Dispatcher(None, placement, 64, ll_transport="peer", ll_chunks=2)
    d = Dispatcher(None, placement, 64, ll_transport="peer")  # one rank: nothing to map, plain copies
    assert not d.uses_peer_memory


def _interpreter_cases() -> dict:
    results = run_ranks(_stores, 2, True, timeout_s=300)
    try:
        _check_stores(results, 2, kernel=True)
        return {"barrier_kernel": True}
    except AssertionError as e:
        return {"barrier_kernel": False, "why": str(e)[:2000], "results": str(results)[:2000]}


def test_barrier_kernel_meets_counts_and_times_out():
    results = run_interpreted(__file__, timeout_s=400)
    assert results.pop("barrier_kernel"), results


if __name__ == "__main__":
    print_interpreter_cases(_interpreter_cases)
