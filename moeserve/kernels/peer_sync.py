"""A device-side barrier over peer memory: every rank of a group (one host) waits on the GPU, inside
the stream (and inside a CUDA graph), until every other rank has reached the same point of its
own stream. What it orders: each rank's stores into its peers' buffers made before the barrier
are visible to those peers after it (kernel boundary + a system-scope release / acquire).

Protocol: rank i keeps a local arrival count (epoch, int64, never reset: no reset race, and it
cannot wrap in practice). Arriving, it adds one and stores the new value, with release semantics,
into slot i of every rank's flags (an int64 [R] array in that rank's peer buffer); then it polls
its own flags, with acquire semantics, until every slot holds at least that value. All ranks pass
the same barriers in the same order, so their counts agree.

Every wait has a deadline: past `timeout_ns` the kernel stops waiting, stores 1 + the rank it
waited for in `status` and returns; the host reads `status` (PeerBuffers.check) and raises. On
the GPU the clock is %globaltimer; under the Triton interpreter (CPU tests) inline PTX does not
run, so there time is counted as INTERPRETER_SPIN_NS per poll.
"""

from __future__ import annotations

import torch

from moeserve.kernels.fp8 import triton

if triton is not None:
    import triton.language as tl

    INTERPRETER_SPIN_NS = tl.constexpr(500_000)  # a poll under the interpreter: ~0.7 ms measured on a CPU

    @triton.jit
    def clock_ns(polls, FAST: tl.constexpr):
        # FAST (CUDA; named as the other kernels' GPU-only switch): the GPU's nanosecond clock.
        if FAST:
            return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                             pack=1)
        else:
            return polls * INTERPRETER_SPIN_NS

    @triton.jit
    def _peer_barrier_kernel(flag_ptrs, epoch_ptr, status_ptr, rank, timeout_ns, R: tl.constexpr,
                             FAST: tl.constexpr):
        e = tl.load(epoch_ptr) + 1
        tl.store(epoch_ptr, e)
        for r in range(0, R):
            peer_flags = tl.load(flag_ptrs + r).to(tl.pointer_type(tl.int64))
            tl.atomic_xchg(peer_flags + rank, e, sem="release", scope="sys")
        mine = tl.load(flag_ptrs + rank).to(tl.pointer_type(tl.int64))
        polls = tl.full([], 0, tl.int64)
        start = clock_ns(polls, FAST)
        late = -1
        for r in range(0, R):
            seen = tl.atomic_add(mine + r, 0, sem="acquire", scope="sys")
            while (seen < e) & (late < 0):
                polls += 1
                if clock_ns(polls, FAST) - start > timeout_ns:
                    late = r
                seen = tl.atomic_add(mine + r, 0, sem="acquire", scope="sys")
        if late >= 0:
            tl.store(status_ptr, late + 1)


def peer_barrier(flag_ptrs: torch.Tensor, epoch: torch.Tensor, status: torch.Tensor, rank: int,
                 timeout_s: float) -> None:
    """One barrier over the len(flag_ptrs) ranks whose flags arrays are at these addresses (int64
    [R], this process's mappings); epoch: this rank's int64 [1] count; status: int64 [1], set to
    1 + a late rank on timeout (left alone otherwise)."""
    _peer_barrier_kernel[(1,)](flag_ptrs, epoch, status, rank, int(timeout_s * 1e9), R=flag_ptrs.numel(),
                               FAST=flag_ptrs.is_cuda, num_warps=1)
