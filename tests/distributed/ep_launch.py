"""Run a function on N gloo ranks in spawned processes, with a deadline on every wait."""

from __future__ import annotations

import queue
import traceback

import torch
import torch.multiprocessing as mp

from moeserve.distributed.groups import destroy, free_port, init_distributed


def _entry(fn, rank, world, addr, nnodes, node_rank, args, results, timeout_s):
    torch.set_num_threads(1)
    try:
        nproc = world // nnodes
        init_distributed(addr, rank, nproc, nnodes=nnodes, node_rank=node_rank, device="cpu", timeout_s=timeout_s)
        out = fn(node_rank * nproc + rank, world, *args)
        results.put((node_rank * nproc + rank, "ok", out))
    except BaseException:  # report any failure to the parent instead of hanging it
        results.put((node_rank * nproc + rank, "error", traceback.format_exc()))
    finally:
        destroy()


def start_ranks(fn, world: int, args=(), nnodes: int = 1, node_rank: int = 0, addr: str | None = None,
                timeout_s: float = 60.0, ctx=None, results=None):
    """Start the local ranks of one 'node'; returns (processes, results queue)."""
    ctx = ctx or mp.get_context("spawn")
    results = results if results is not None else ctx.Queue()
    addr = addr or f"127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_entry, args=(fn, r, world, addr, nnodes, node_rank, args, results, timeout_s),
                         daemon=True) for r in range(world // nnodes)]
    for p in procs:
        p.start()
    return procs, results


def collect(procs, results, world: int, timeout_s: float = 60.0) -> list:
    """Wait (with a deadline) for every rank's result; raise with the ranks' tracebacks on failure."""
    outs, errors = {}, []
    try:
        for _ in range(world):
            rank, status, value = results.get(timeout=timeout_s)
            if status == "ok":
                outs[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    except queue.Empty:
        errors.append(f"timed out after {timeout_s}s waiting for ranks {sorted(set(range(world)) - set(outs))}")
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if errors:
        raise RuntimeError("\n".join(errors))
    return [outs[r] for r in range(world)]


def run_ranks(fn, world: int, *args, timeout_s: float = 60.0) -> list:
    """fn(rank, world, *args) on `world` gloo ranks; returns the per-rank results in rank order."""
    procs, results = start_ranks(fn, world, args, timeout_s=timeout_s)
    return collect(procs, results, world, timeout_s)
