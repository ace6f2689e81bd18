"""A warp-specialized Gluon kernel for the fused MoE's FP8 GEMMs, measured against the Triton one (GPU only).

Measured and not adopted (docs/perf/kernels_moe.md, "Warp-specialized FP8 MoE GEMMs in Gluon"): this file
keeps the kernel and its probe so the measurement can be repeated and built on.

Why it was tried: at decode sizes the MoE's GEMMs stream weights (the whole layer's bytes once, a few
MACs a byte). fused_moe._moe_gemm_kernel streams bf16 weights at ~1.0x their bytes' time but FP8 ones at
~1.06x (gate_up) and ~1.16x (down), and tiles, stages, persistence, TMA loads and a swapped MMA had not
closed it; DeepGEMM's structure was the route left: one loader warp streams weight tiles by TMA into a
ring of shared-memory stages, across the work items a persistent program (one an SM) takes in turn,
while one warpgroup computes, so no program ever drains its pipeline.

What a program computes is the Triton kernel's align path, W8A8 with 128 x 128 block scales:
- the MMA is swapped: weights are its M side (BLOCK_N output columns; Hopper's warpgroup MMA needs 64+
  rows) and a block of 16 sorted (token, expert) pairs its N side;
- each K step of 128 (one scale group) is its own MMA, promoted into fp32 with the activation's per-row
  scale times the weight block's scale; the next step's MMA is issued before a step is promoted;
- a work item is (block of pairs, N tile); a program takes a contiguous run of items and copies a
  block's activation rows (all of K) into shared memory asynchronously, the next block's while the
  current one computes.
GATE_UP: out[pair, j] = silu(g) * u (two weight tiles a stage); else out[pair, j] = route_w[pair] *
(a[pair] @ w[e, j]). Knobs the probe varies: BLOCK_N, stages, warps, DIAG (1: the loader streams and
the compute partition only releases stages, the structure's streaming ceiling; 2: no scale loads),
and weights stored tile by tile (tile_weights: each [BLOCK_N, 128] tile contiguous).

The probe: V2-Lite's fused MoE shape as the engine runs it (64 routed experts top-6 + the 2 shared
experts as slots 64 and 65 of every token: E=66, top-8, hidden 2048, intermediate 1408), FP8 weights
with 128 x 128 block scales, activations quantized per 1 x 128. For each token count, gate_up and down
apart, each launch alone in a CUDA graph (median of replays): the Triton kernel with the tuned table's
tiles, and this kernel per variant, its output against the Triton one's on the same inputs (they differ
in fp32 summation order only). Roofline: the bytes a launch must move (the hit experts' weights and
scales, the activations, the output) over the copy bandwidth measured in the same run.

    PYTHONUNBUFFERED=1 python benchmarks/probe_moe_gemm_sm90.py [--tokens 8,64] \
        [--variants bn128,bn128_d1,bn128_tiled] [--out $OUT/probe.json]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from moeserve.kernels import fused_moe as fm  # noqa: E402
from moeserve.kernels import moe_config  # noqa: E402
from moeserve.kernels.fp8 import FP8_DTYPE, per_token_group_quant_fp8_triton  # noqa: E402
from moeserve.kernels.moe_align import moe_align_block_size_triton  # noqa: E402
from roofline import measure_copy_bandwidth  # noqa: E402

try:  # noqa: E402 - the kernel's imports
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import async_copy, fence_async_shared, mbarrier, tma
    from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    # the CTA barrier: thread_barrier in Triton 3.6 (the device's), barrier from 3.7 on (the CPU suite's 3.9)
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared  # renamed the same way
    _cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
except ImportError:  # a Triton without Gluon's Hopper API
    gluon = None

GROUP = 128  # the FP8 block scales' group: one K step, and the N tiles stay inside one group
BLOCK_M = 16  # pairs a block (moe_align's BLOCK_M): the MMA's N side


SMEM_BYTES = 200 * 1024  # what the rows and the ring may take (an H100/H200 block may have 227 KB)
ROW_PREFETCH_MAX_BYTES = 48 * 1024  # a block's rows up to this size are double-buffered (V2-Lite: 32 KB)


if gluon is not None:
    _GROUP = gl.constexpr(GROUP)
    _BLOCK_M = gl.constexpr(BLOCK_M)

    @gluon.jit
    def _loader(w_desc, block_expert_ptr, num_padded_ptr, w_bufs, wu_bufs, ready, empty, n_rows, n_half,
                GATE_UP: gl.constexpr, BLOCK_N: gl.constexpr, K_STEPS: gl.constexpr, TILED: gl.constexpr):
        """One warp: the weight tiles of this program's items, K step by K step, into the ring."""
        stages: gl.constexpr = w_bufs.type.shape[0]
        n_tiles = gl.cdiv(n_half, BLOCK_N)
        start, stop = _item_range(num_padded_ptr, n_tiles)
        nbytes: gl.constexpr = w_desc.block_type.nbytes * (2 if GATE_UP else 1)
        c = 0
        expert = gl.load(block_expert_ptr + start // n_tiles, mask=start < stop, other=0)
        for item in range(start, stop):
            # the next item's expert, loaded while this item's tiles are issued
            expert_next = gl.load(block_expert_ptr + (item + 1) // n_tiles, mask=item + 1 < stop, other=0)
            row = expert * n_rows + (item % n_tiles) * BLOCK_N
            for ks in range(K_STEPS):
                s = c % stages
                mbarrier.wait(empty.index(s), ((c // stages) & 1) ^ 1)  # a fresh barrier passes phase 1
                mbarrier.expect(ready.index(s), nbytes)
                if TILED:  # weights stored tile by tile: tile (row / BLOCK_N, ks) is BLOCK_N rows of 128 at
                    # row ((row / BLOCK_N) * K_STEPS + ks) * BLOCK_N
                    _tma_load(w_desc, [(row // BLOCK_N * K_STEPS + ks) * BLOCK_N, 0], ready.index(s),
                              w_bufs.index(s))
                    if GATE_UP:
                        _tma_load(w_desc, [((row + n_half) // BLOCK_N * K_STEPS + ks) * BLOCK_N, 0],
                                  ready.index(s), wu_bufs.index(s))
                else:
                    _tma_load(w_desc, [row, ks * _GROUP], ready.index(s), w_bufs.index(s))
                    if GATE_UP:  # the up rows sit n_half rows below the gate rows
                        _tma_load(w_desc, [row + n_half, ks * _GROUP], ready.index(s), wu_bufs.index(s))
                c += 1
            expert = expert_next

    @gluon.jit
    def _item_range(num_padded_ptr, n_tiles):
        """This program's contiguous run of work items (block of pairs, N tile)."""
        items = gl.load(num_padded_ptr) // _BLOCK_M * n_tiles
        per = gl.cdiv(items, gl.num_programs(0))
        start = gl.program_id(0) * per
        return start, gl.minimum(start + per, items)

    @gluon.jit
    def _compute(a_ptr, as_ptr, ws_ptr, out_ptr, route_w_ptr, sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
                 w_bufs, wu_bufs, ready, empty, a_smem,
                 num_pairs, n_half, k, a_row_div, stride_am, stride_asm, stride_wse, stride_wsn, stride_om,
                 GATE_UP: gl.constexpr, BLOCK_N: gl.constexpr, K_STEPS: gl.constexpr, ROW_BUFFERS: gl.constexpr,
                 DIAG: gl.constexpr, num_warps: gl.constexpr):
        """One warpgroup: per item, the MMA of each K step as its stage lands, promoted, then the epilogue."""
        stages: gl.constexpr = w_bufs.type.shape[0]
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, _BLOCK_M, 32])
        col_layout: gl.constexpr = gl.SliceLayout(0, acc_layout)  # one value a pair
        row_layout: gl.constexpr = gl.SliceLayout(1, acc_layout)  # one value an output column
        # activation rows: 16 B a thread along K
        a_layout: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [num_warps, 1], [1, 0])
        n_tiles = gl.cdiv(n_half, BLOCK_N)
        start, stop = _item_range(num_padded_ptr, n_tiles)
        zero = gl.zeros([BLOCK_N, _BLOCK_M], gl.float32, acc_layout)
        # A block's activation rows (all of K) are copied into shared memory asynchronously; with two
        # buffers (ROW_BUFFERS) the next block's copy is issued as soon as a block starts
        first_blk = start // n_tiles
        last_blk = (stop - 1) // n_tiles
        if start < stop:
            _copy_block_rows(a_ptr, sorted_ids_ptr, first_blk, num_pairs, k, a_row_div, stride_am, a_smem, 0,
                             K_STEPS, a_layout)
        c = 0
        loaded_block = -1
        if DIAG == 1:  # stream only
            for item in range(start, stop):
                for ks in range(K_STEPS):
                    s = c % stages
                    mbarrier.wait(ready.index(s), (c // stages) & 1)
                    mbarrier.arrive(empty.index(s), count=1)
                    c += 1
        else:
            for item in range(start, stop):
                blk = item // n_tiles
                nt = item % n_tiles
                expert = gl.load(block_expert_ptr + blk).to(gl.int64)
                buf = ((blk - first_blk) % ROW_BUFFERS) * K_STEPS
                if blk != loaded_block:
                    async_copy.wait_group(0)  # this block's rows have landed
                    if ROW_BUFFERS == 2:
                        if blk < last_blk:  # the next block's rows, into the other buffer, while this one computes
                            _copy_block_rows(a_ptr, sorted_ids_ptr, blk + 1, num_pairs, k, a_row_div, stride_am,
                                             a_smem, K_STEPS - buf, K_STEPS, a_layout)
                    elif item != start:  # one buffer: the rows are copied when their block starts
                        _copy_block_rows(a_ptr, sorted_ids_ptr, blk, num_pairs, k, a_row_div, stride_am, a_smem, 0,
                                         K_STEPS, a_layout)
                        async_copy.wait_group(0)
                    loaded_block = blk
                fence_async_shared()  # the rows' copies before the MMA's async-proxy reads
                _cta_barrier()
                # scales: the pairs' activation scales and the weight block's, each K step's loaded a step ahead
                pair = gl.load(sorted_ids_ptr + blk * _BLOCK_M + gl.arange(0, _BLOCK_M, col_layout))
                mask_m = pair < num_pairs
                as_rows = as_ptr + (pair // a_row_div).to(gl.int64) * stride_asm
                ws_gate = ws_ptr + expert * stride_wse + (nt * BLOCK_N // _GROUP) * stride_wsn
                ws_up = ws_ptr + expert * stride_wse + ((n_half + nt * BLOCK_N) // _GROUP) * stride_wsn
                a_s = gl.load(as_rows, mask=mask_m, other=0.0)
                w_s = gl.load(ws_gate)
                w_s_up = gl.load(ws_up) if GATE_UP else w_s
                # K steps: the MMA of step ks is issued before step ks - 1's result is promoted, so one MMA
                # is always in flight while the warpgroup scales and adds the one before
                s = c % stages
                mbarrier.wait(ready.index(s), (c // stages) & 1)
                a_t = a_smem.index(buf).permute((1, 0))  # [GROUP, BLOCK_M], K-major as FP8 MMAs need
                part = warpgroup_mma(w_bufs.index(s), a_t, zero, use_acc=False, is_async=True)
                if GATE_UP:
                    part_up = warpgroup_mma(wu_bufs.index(s), a_t, zero, use_acc=False, is_async=True)
                else:
                    part_up = part
                prev_s = s
                c += 1
                acc = zero
                acc_up = zero
                for ks in range(1, K_STEPS):
                    if DIAG == 2:
                        a_s_next = a_s
                        w_s_next = w_s
                        w_s_up_next = w_s_up
                    else:
                        a_s_next = gl.load(as_rows + ks, mask=mask_m, other=0.0)
                        w_s_next = gl.load(ws_gate + ks)
                        if GATE_UP:
                            w_s_up_next = gl.load(ws_up + ks)
                    s = c % stages
                    mbarrier.wait(ready.index(s), (c // stages) & 1)
                    a_t = a_smem.index(buf + ks).permute((1, 0))
                    nxt = warpgroup_mma(w_bufs.index(s), a_t, zero, use_acc=False, is_async=True)
                    if GATE_UP:
                        nxt_up = warpgroup_mma(wu_bufs.index(s), a_t, zero, use_acc=False, is_async=True)
                        done, done_up = warpgroup_mma_wait(2, deps=(part, part_up))
                        acc_up += done_up * (a_s * w_s_up)[None, :]
                        w_s_up = w_s_up_next
                    else:
                        nxt_up = nxt
                        done = warpgroup_mma_wait(1, deps=(part, ))
                    mbarrier.arrive(empty.index(prev_s), count=1)
                    acc += done * (a_s * w_s)[None, :]
                    a_s = a_s_next
                    w_s = w_s_next
                    part = nxt
                    part_up = nxt_up
                    prev_s = s
                    c += 1
                if GATE_UP:
                    done, done_up = warpgroup_mma_wait(0, deps=(part, part_up))
                    acc_up += done_up * (a_s * w_s_up)[None, :]
                else:
                    done = warpgroup_mma_wait(0, deps=(part, ))
                mbarrier.arrive(empty.index(prev_s), count=1)
                acc += done * (a_s * w_s)[None, :]
                _cta_barrier()  # every warp's MMAs have read the rows before the next block overwrites them
                offs_n = nt * BLOCK_N + gl.arange(0, BLOCK_N, row_layout)
                if GATE_UP:
                    acc = acc / (1.0 + gl.exp(-acc)) * acc_up
                else:
                    acc = acc * gl.load(route_w_ptr + pair, mask=mask_m, other=0.0)[None, :]
                out = out_ptr + pair.to(gl.int64)[None, :] * stride_om + offs_n[:, None]
                gl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[None, :] & (offs_n < n_half)[:, None])

    @gluon.jit
    def _copy_block_rows(a_ptr, sorted_ids_ptr, blk, num_pairs, k, a_row_div, stride_am, a_smem, first,
                         K_STEPS: gl.constexpr, a_layout: gl.constexpr):
        """Issue the asynchronous copies of block blk's activation rows into a_smem[first:first + K_STEPS]."""
        pair = gl.load(sorted_ids_ptr + blk * _BLOCK_M + gl.arange(0, _BLOCK_M, gl.SliceLayout(1, a_layout)))
        mask_m = pair < num_pairs
        rows = a_ptr + (pair // a_row_div).to(gl.int64)[:, None] * stride_am
        offs_k = gl.arange(0, _GROUP, gl.SliceLayout(0, a_layout))
        for ks in range(K_STEPS):
            kk = ks * _GROUP + offs_k
            _cp_async(a_smem.index(first + ks), rows + kk[None, :], mask=mask_m[:, None] & (kk < k)[None, :])
        async_copy.commit_group()

    @gluon.jit
    def _moe_gemm_sm90_kernel(w_desc, a_ptr, as_ptr, ws_ptr, out_ptr, route_w_ptr,
                              sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
                              num_pairs, n_rows, n_half, k, a_row_div,
                              stride_am, stride_asm, stride_wse, stride_wsn, stride_om,
                              GATE_UP: gl.constexpr, BLOCK_N: gl.constexpr, K_STEPS: gl.constexpr,
                              STAGES: gl.constexpr, ROW_BUFFERS: gl.constexpr, DIAG: gl.constexpr, TILED: gl.constexpr,
                              num_warps: gl.constexpr):
        w_layout: gl.constexpr = w_desc.layout
        w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_N, _GROUP], w_layout)
        wu_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES if GATE_UP else 1, BLOCK_N, _GROUP], w_layout)
        a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([_BLOCK_M, _GROUP], gl.float8e4nv)
        a_smem = gl.allocate_shared_memory(gl.float8e4nv, [ROW_BUFFERS * K_STEPS, _BLOCK_M, _GROUP], a_layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        gl.warp_specialize([
            (_compute, (a_ptr, as_ptr, ws_ptr, out_ptr, route_w_ptr, sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
                        w_bufs, wu_bufs, ready, empty, a_smem,
                        num_pairs, n_half, k, a_row_div, stride_am, stride_asm, stride_wse, stride_wsn, stride_om,
                        GATE_UP, BLOCK_N, K_STEPS, ROW_BUFFERS, DIAG, num_warps)),
            (_loader, (w_desc, block_expert_ptr, num_padded_ptr, w_bufs, wu_bufs, ready, empty, n_rows, n_half,
                       GATE_UP, BLOCK_N, K_STEPS, TILED)),
        ], [1], [40])


@functools.lru_cache(maxsize=64)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


_descs: dict = {}


def tile_weights(w: torch.Tensor, block_n: int) -> torch.Tensor:
    """w [E, rows, K] stored tile by tile: [E * rows / block_n * K_STEPS * block_n, 128], each [block_n, 128]
    tile 16 KB (block_n 128) contiguous, K zero-padded to whole tiles."""
    e, rows, k = w.shape
    k_steps = -(-k // GROUP)
    padded = torch.zeros(e, rows, k_steps * GROUP, dtype=w.dtype, device=w.device)
    padded[..., :k] = w
    return padded.view(e, rows // block_n, block_n, k_steps, GROUP).permute(0, 1, 3, 2, 4).contiguous().view(-1, GROUP)


def _weight_desc(w: torch.Tensor, block_n: int):
    """A TMA descriptor over w [E, rows, K] viewed [E * rows, K], tiles [block_n, 128]; cached (weights stay put)."""
    key = (w.data_ptr(), tuple(w.shape), block_n)
    desc = _descs.get(key)
    if desc is None:
        layout = gl.NVMMASharedLayout.get_default_for([block_n, GROUP], gl.float8e4nv)
        flat = w.view(-1, w.shape[-1])
        desc = TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [block_n, GROUP], layout)
        _descs[key] = desc
    return desc


def moe_gemm_sm90(a: torch.Tensor, a_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, out: torch.Tensor,
                  route_w: torch.Tensor | None, align, num_pairs: int, a_row_div: int, gate_up: bool,
                  block_n: int = 128, stages: int | None = None, grid: int | None = None, num_warps: int = 4, diag: int = 0,
                  w_tiled: torch.Tensor | None = None) -> None:
    """fused_moe's GEMM launch (align path, FP8 activations and weights, 128 x 128 block scales) on sm_90."""
    sorted_ids, block_expert, num_padded = align
    n_rows, k = w.shape[1], w.shape[2]
    n_half = n_rows // 2 if gate_up else n_rows
    k_steps = triton.cdiv(k, GROUP)
    # shared memory, under 227 KB: one or two blocks' rows (k_steps x 2 KB each) and the ring of stages
    row_buffers = 2 if k_steps * BLOCK_M * GROUP <= ROW_PREFETCH_MAX_BYTES else 1
    if stages is None:
        stage_bytes = block_n * GROUP * (2 if gate_up else 1)
        stages = max(2, min(8, (SMEM_BYTES - row_buffers * k_steps * BLOCK_M * GROUP) // stage_bytes))
    if grid is None:
        grid = _num_sms(a.device.index or 0)
    _moe_gemm_sm90_kernel[(grid,)](
        _weight_desc(w, block_n) if w_tiled is None else _weight_desc(w_tiled, block_n), a, a_scale, w_scale, out, route_w if route_w is not None else a_scale,
        sorted_ids, block_expert, num_padded, num_pairs, n_rows, n_half, k, a_row_div,
        a.stride(0), a_scale.stride(0), w_scale.stride(0), w_scale.stride(1), out.stride(0),
        GATE_UP=gate_up, BLOCK_N=block_n, K_STEPS=k_steps, STAGES=stages, ROW_BUFFERS=row_buffers, DIAG=diag, TILED=w_tiled is not None,
        num_warps=num_warps)


E, H, I, ROUTED, TOP_K, SHARED = 66, 2048, 1408, 64, 8, 2


class Watchdog:
    """Ends the process if a step takes longer than its deadline (a hung kernel cannot be interrupted)."""

    def __init__(self, seconds: float):
        self.seconds, self.label, self.t0 = seconds, "start", time.monotonic()
        threading.Thread(target=self._watch, daemon=True).start()

    def step(self, label: str):
        self.label, self.t0 = label, time.monotonic()

    def _watch(self):
        while True:
            time.sleep(1)
            if time.monotonic() - self.t0 > self.seconds:
                print(f"WATCHDOG: '{self.label}' ran past {self.seconds} s; exiting", flush=True)
                os._exit(3)


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()


def graph_us(fn, reps: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    return sorted(times)[len(times) // 2]


def make_weights(device):
    g = torch.Generator(device=device).manual_seed(0)
    w13 = (torch.randn(E, 2 * I, H, device=device, generator=g) * 0.5).to(FP8_DTYPE)
    w2 = (torch.randn(E, H, I, device=device, generator=g) * 0.5).to(FP8_DTYPE)
    w13s = torch.rand(E, 2 * I // 128, H // 128, device=device, generator=g) * 1e-2 + 5e-3
    w2s = torch.rand(E, H // 128, I // 128, device=device, generator=g) * 1e-2 + 5e-3
    return w13, w13s, w2, w2s


def make_routing(tokens, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    routed = torch.rand(tokens, ROUTED, device=device, generator=g).topk(TOP_K - SHARED, dim=1).indices
    shared = torch.arange(ROUTED, ROUTED + SHARED, device=device).expand(tokens, SHARED)
    ids = torch.cat([routed, shared], dim=1).to(torch.int32)
    weights = torch.rand(tokens, TOP_K, device=device, generator=g)
    return ids, weights


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", default="2,8,16,32,64,128")
    parser.add_argument("--variants", default="bn64,bn128",
                        help="Gluon launches to time: bnN BLOCK_N, then optional _stS stages, _wW warps, _dD "
                             "diagnostic (1 stream only, 2 no scale loads), _tiled (weights stored tile by tile)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device = torch.device("cuda")
    dog = Watchdog(90)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    gbps = measure_copy_bandwidth() / 1e9
    print(f"copy bandwidth {gbps:.0f} GB/s", flush=True)
    w13, w13s, w2, w2s = make_weights(device)
    block = (128, 128)
    rows = []
    tiled = {}
    variants = args.variants.split(",")
    for tokens in [int(t) for t in args.tokens.split(",")]:
        ids, weights = make_routing(tokens, device, tokens)
        pairs = tokens * TOP_K
        x = torch.randn(tokens, H, device=device, dtype=torch.bfloat16)
        a, a_s = per_token_group_quant_fp8_triton(x, 128)
        cfg = moe_config.moe_config(tokens, E, H, I, TOP_K, "fp8", device, SHARED)
        down_cfg = moe_config.down_config(cfg)
        align = moe_align_block_size_triton(ids, cfg["BLOCK_M"], E)
        route_w = weights.reshape(-1).contiguous()
        hit = torch.unique(ids).numel()
        act_ref = torch.empty(pairs, I, device=device, dtype=torch.bfloat16)
        y_ref = torch.empty(pairs, H, device=device, dtype=torch.bfloat16)
        gemms = {
            "gate_up": dict(bytes=hit * (2 * I * H + 2 * I * H // 128 // 128 * 4) + a.numel() + act_ref.numel() * 2,
                            triton=lambda: fm._launch_moe_gemm(a, a_s, w13, w13s, act_ref, None, align, pairs, TOP_K,
                                                               True, cfg, block)),
        }
        dog.step(f"triton gate_up T={tokens}")
        gemms["gate_up"]["triton"]()
        aq, aq_s = per_token_group_quant_fp8_triton(act_ref, 128)
        gemms["down"] = dict(bytes=hit * (H * I + H * I // 128 // 128 * 4) + aq.numel() + y_ref.numel() * 2,
                             triton=lambda: fm._launch_moe_gemm(aq, aq_s, w2, w2s, y_ref, route_w, align, pairs, 1,
                                                                False, down_cfg, block))
        gemms["down"]["triton"]()
        torch.cuda.synchronize()
        for name, gemm in gemms.items():
            roof = gemm["bytes"] / gbps / 1e3
            dog.step(f"time triton {name} T={tokens}")
            t_tri = graph_us(gemm["triton"])
            row = dict(tokens=tokens, gemm=name, roof_us=roof, triton_us=t_tri, triton_x=t_tri / roof,
                       triton_cfg=cfg if name == "gate_up" else down_cfg)
            ref = (act_ref if name == "gate_up" else y_ref).clone()
            for key in variants:
                knobs = {"bn": "block_n", "st": "stages", "w": "num_warps", "d": "diag"}
                kw = {knobs[p.rstrip("0123456789")]: int(p.lstrip("bnstwd")) for p in key.split("_") if p != "tiled"}
                if "tiled" in key:  # the weights stored tile by tile (tile_weights)
                    tkey = (name, kw["block_n"])
                    if tkey not in tiled:
                        tiled[tkey] = tile_weights(w13 if name == "gate_up" else w2, kw["block_n"])
                    kw["w_tiled"] = tiled[tkey]
                out = torch.full_like(ref, float("nan"))
                if name == "gate_up":
                    fn = lambda: moe_gemm_sm90(a, a_s, w13, w13s, out, None, align, pairs, TOP_K, True, **kw)
                else:
                    fn = lambda: moe_gemm_sm90(aq, aq_s, w2, w2s, out, route_w, align, pairs, 1, False, **kw)
                try:
                    dog.step(f"gluon {name} {key} T={tokens} first call")
                    fn()
                    torch.cuda.synchronize()
                    err = rel_err(out, ref)
                    dog.step(f"gluon {name} {key} T={tokens} timing")
                    t = graph_us(fn)
                    row[key] = dict(us=t, x=t / roof, vs_triton=t / t_tri, rel_err=err)
                except Exception as exc:  # a variant that does not compile or fit: recorded, the rest runs
                    row[key] = dict(error=f"{type(exc).__name__}: {str(exc)[:300]}")
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)

    print("\n| tokens | GEMM | roofline us | Triton us (x) | " + " | ".join(
        f"{key} us (x, rel err)" for key in variants) + " |")
    for row in rows:
        cells = []
        for key in variants:
            v = row[key]
            cells.append(v["error"][:40] if "error" in v else f"{v['us']:.1f} ({v['x']:.2f}, {v['rel_err']:.1e})")
        print(f"| {row['tokens']} | {row['gemm']} | {row['roof_us']:.1f} | {row['triton_us']:.1f} "
              f"({row['triton_x']:.2f}) | " + " | ".join(cells) + " |")
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                           git_commit=commit, command=" ".join(sys.argv), copy_GBps=gbps, rows=rows), f, indent=1,
                      default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
