"""Fused MoE and FP8 block GEMM kernels on one GPU: check each against its torch reference, tune
block sizes (--tune), and time each against its roofline measured in the same run.

    PYTHONUNBUFFERED=1 python benchmarks/kernel_bench_moe.py --tune --out $OUT

Roofline of a case = max(bytes / copy bandwidth, FLOPs / matmul rate), with
- bytes: the weights of the experts actually hit (FP8 scales included) + x read + output written,
- FLOPs: 2 * (token, expert) pairs computed * (2*I*H + H*I) for MoE, 2*M*N*K for the GEMM,
- copy bandwidth: a large device-to-device copy, bytes read + written, and
- matmul rate: torch.matmul bf16 8192^3, torch._scaled_mm e4m3 8192^3 (W8A8 cases),
all measured in this run. Times are medians of CUDA-graph replays (decode runs in graphs);
inputs rotate over several routings / weight copies so that repeats do not hit in L2.
--smoke runs tiny shapes on CPU under TRITON_INTERPRET=1 to check the script itself.

V2-Lite-fused is V2-Lite as the engine runs it: its 2 shared experts fused as expert slots 64 and 65
(E=66, top-8: 6 random routed experts, then 64 and 65 with weight 1.0 in every token's row). --tune
tunes its gate_up and down GEMMs apart (tune_split) and writes the gate_up config with a "down"
sub-dict (moe_config.down_config) under the fused shape's key; its rows also time the config the
engine would take before (t_before_us). The decode batches of the CUDA-graph ladder:

    PYTHONUNBUFFERED=1 python benchmarks/kernel_bench_moe.py --models V2-Lite-fused \
        --tokens 1,2,4,8,16,32,64,128 --tune --no-dense --budget-s 540 --out $OUT

--fp8-gemm: the dense FP8 block GEMM at decode and prefill shapes instead (V2-Lite's and V3's
projections, M in 1, 8, 32, 64, 128, 4096): the previous kernel (separate quant launch + one program
per tile, with its configs), the current one (split-K + fused quant, the split summed in the GEMM,
configs from moe_config), bf16 cuBLAS (F.linear) on the same shapes and the bytes roofline; checks
every case against the bf16 reference on the GPU (rel. err < 3e-2), that it repeats bit for bit, and
that fusing the quant or moving the split's sum changes no bit; sums V2-Lite's 56 calls of one
decode step (--gemm-models V2-Lite for those alone); times the fused MoE's in-GEMM quant against
separate quant launches (V2-Lite FP8). Writes kernels_fp8_gemm.json (and with --tune
dense_fp8_<arch>.json) to --out.

A --tune table holds only the token counts tuned: merge it into configs/ entry by entry (a shape
replaced whole loses the counts not tuned, e.g. its prefill entry).

    PYTHONUNBUFFERED=1 python benchmarks/kernel_bench_moe.py --fp8-gemm --out $OUT

--align: moe_align_block_size alone at decode and prefill sizes (V2-Lite 64 experts top-6; 66
experts top-8, i.e. with 2 shared-expert slots; V3 256 experts top-8; BLOCK_M 16 and 64): the
one-launch path (a program per expert), the three-pass path and the dispatch, each from CUDA-graph
replays and checked bit for bit against the reference; the one launch also past its bound
(moe_align.one_launch, up to 8,192 pairs), to show where the two paths cross. Writes
kernels_align.json to --out. (The
MoE rows' t_align_us time the dispatch; t_align_3pass_us the three-pass path where it is not the one
dispatched.)

    PYTHONUNBUFFERED=1 python benchmarks/kernel_bench_moe.py --align --out $OUT
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if "--smoke" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

from moeserve.kernels import moe_config  # noqa: E402
from moeserve.kernels.fp8 import (FP8_DTYPE, block_fp8_matmul, block_fp8_matmul_ref,  # noqa: E402
                                  block_fp8_matmul_triton,
                                  dequant_block_fp8_ref, per_token_group_quant_fp8_ref,
                                  per_token_group_quant_fp8_triton)
from moeserve.kernels.fused_moe import (_launch_moe_gemm, can_tile_weights, fused_moe, fused_moe_ref,  # noqa: E402
                                        fused_moe_triton, fused_moe_w8a8_ref, tile_weights)
from moeserve.kernels import moe_align  # noqa: E402
from moeserve.kernels.moe_align import moe_align_block_size_ref, moe_align_block_size_triton  # noqa: E402

MODELS = {  # name: (E, H, I, top_k, routed experts: > E - S means only E - S are local, the rest -1,
    #                 S: shared experts fused as the last S of the E slots and of the top_k columns)
    "V2-Lite": (64, 2048, 1408, 6, 64, 0),
    "V2-Lite-fused": (66, 2048, 1408, 8, 64, 2),  # as the engine runs it (ModelConfig.fuse_shared_experts)
    "V3": (256, 7168, 2048, 8, 256, 0),
    "V3-EP8-local": (32, 7168, 2048, 8, 256, 0),
}
TOKENS = [1, 8, 64, 256, 2048, 8192]
DENSE_NK = [(2112, 7168), (24576, 1536), (4096, 7168), (7168, 2048), (7168, 16384)]
BLOCK = (128, 128)


def cfg(bm, bn, bk, g, w, s):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_SIZE_M=g, num_warps=w, num_stages=s)


def moe_candidates(rows_per_expert: float) -> list[dict]:
    if rows_per_expert <= 8:
        return [cfg(16, 64, 128, 1, 4, 4), cfg(16, 128, 128, 1, 4, 3), cfg(16, 32, 128, 1, 4, 5)]
    if rows_per_expert <= 48:
        return [cfg(16, 64, 128, 1, 4, 4), cfg(32, 64, 128, 1, 4, 4), cfg(64, 64, 128, 1, 4, 3)]
    return [cfg(64, 128, 64, 8, 4, 3), cfg(128, 64, 64, 8, 8, 3), cfg(128, 128, 64, 8, 8, 3),
            cfg(128, 64, 128, 8, 8, 3), cfg(128, 128, 64, 8, 8, 4), cfg(128, 128, 128, 8, 8, 2)]


def dense_candidates(m: int) -> list[dict]:
    if m <= 16:
        return [cfg(16, 64, 128, 1, 4, 4), cfg(16, 32, 128, 1, 4, 5), cfg(16, 16, 128, 1, 4, 6)]
    if m <= 256:
        return [cfg(64, 64, 128, 1, 4, 4), cfg(32, 64, 128, 1, 4, 4), cfg(64, 128, 128, 8, 4, 3)]
    return [cfg(128, 128, 128, 8, 8, 3), cfg(64, 128, 128, 8, 4, 4), cfg(128, 128, 128, 8, 8, 4)]


# ---- measuring --------------------------------------------------------------------------------

class Timer:
    """Median time per call of fn(i) (i cycles over the rotating inputs), from CUDA-graph replays."""

    def __init__(self, smoke: bool):
        self.smoke = smoke

    def __call__(self, fn, n_inputs: int, graph: bool = True) -> float:
        if self.smoke:
            t0 = time.perf_counter()
            fn(0)
            return (time.perf_counter() - t0) * 1e6
        for i in range(n_inputs):  # compile, warm
            fn(i)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(0)
        torch.cuda.synchronize()
        est = max(time.perf_counter() - t0, 1e-6)
        iters = max(n_inputs, min(200, int(3e-3 / est) // n_inputs * n_inputs))
        if graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn(0)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for i in range(iters):
                    fn(i % n_inputs)
            run = g.replay
        else:
            def run():
                for i in range(iters):
                    fn(i % n_inputs)
        run()
        times = []
        for _ in range(7):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) * 1e3 / iters)
        return statistics.median(times)


def ceilings(timer: Timer, device) -> dict:
    if timer.smoke:
        return {"copy_GBps": 10.0, "bf16_TFLOPs": 0.1, "fp8_TFLOPs": 0.1}
    src = torch.randint(0, 255, (4 << 30,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = timer(lambda i: dst.copy_(src), 1, graph=False)
    copy = 2 * src.numel() / t / 1e3  # GB/s, read + write
    del src, dst
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    t = timer(lambda i: torch.matmul(a, b), 1, graph=False)
    bf16 = 2 * n ** 3 / t / 1e6
    a8, b8 = a.to(FP8_DTYPE), b.to(FP8_DTYPE)
    one = torch.ones((), device=device)
    t = timer(lambda i: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16), 1,
              graph=False)
    fp8 = 2 * n ** 3 / t / 1e6
    return {"copy_GBps": copy, "bf16_TFLOPs": bf16, "fp8_TFLOPs": fp8}


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()


def roofline_us(nbytes: float, flops: float, ceil: dict, fp8_rate: bool) -> tuple[float, str]:
    t_mem = nbytes / (ceil["copy_GBps"] * 1e3)
    t_math = flops / ((ceil["fp8_TFLOPs"] if fp8_rate else ceil["bf16_TFLOPs"]) * 1e6)
    return (t_mem, "mem") if t_mem >= t_math else (t_math, "math")


# ---- MoE ----------------------------------------------------------------------------------------

def make_experts(e, h, i, fp8, device, smoke):
    """Random expert weights (~N(0, 1/fan_in) after dequantization), built in slices to bound memory."""
    if not fp8:
        w13 = torch.randn(e, 2 * i, h, device=device, dtype=torch.bfloat16).mul_(h ** -0.5)
        w2 = torch.randn(e, h, i, device=device, dtype=torch.bfloat16).mul_(i ** -0.5)
        return w13, w2, None, None
    bn, bk = BLOCK
    w13 = torch.empty(e, 2 * i, h, device=device, dtype=FP8_DTYPE)
    w2 = torch.empty(e, h, i, device=device, dtype=FP8_DTYPE)
    step = 1 if smoke else 16
    for s in range(0, e, step):
        w13[s:s + step] = torch.randn(w13[s:s + step].shape, device=device, dtype=torch.bfloat16).to(FP8_DTYPE)
        w2[s:s + step] = torch.randn(w2[s:s + step].shape, device=device, dtype=torch.bfloat16).to(FP8_DTYPE)
    s13 = torch.rand(e, -(-2 * i // bn), -(-h // bk), device=device).add_(0.5).mul_(h ** -0.5)
    s2 = torch.rand(e, -(-h // bn), -(-i // bk), device=device).add_(0.5).mul_(i ** -0.5)
    return w13, w2, s13, s2


def routing(tokens, e_local, e_routed, k, device, shared=0):
    """k - shared distinct random experts of e_routed (those past the e_local - shared local ones -1),
    then the shared slots e_local - shared .. e_local - 1 with weight 1.0, as kernels/routing.py appends them."""
    ids = torch.rand(tokens, e_routed, device=device).topk(k - shared, dim=1).indices
    ids = torch.where(ids < e_local - shared, ids, -1).to(torch.int32)
    weights = torch.softmax(torch.randn(tokens, k - shared, device=device), dim=-1)
    slots = torch.arange(e_local - shared, e_local, device=device, dtype=torch.int32).expand(tokens, shared)
    return torch.cat([weights, torch.ones(tokens, shared, device=device)], 1), torch.cat([ids, slots], 1)


def moe_case(name, tokens, variant, weights, timer, ceil, tune, tuned, smoke, device):
    """variant: bf16 | fp8 (W8A8) | fp8_w8a16. Returns a result row."""
    e, h, i, k, e_routed, shared = MODELS[name]
    w13, w2, s13, s2 = weights
    fp8 = s13 is not None
    act_fp8 = variant == "fp8"
    n_inputs = 1 if smoke else 4
    xs = [torch.randn(tokens, h, device=device, dtype=torch.bfloat16) for _ in range(n_inputs)]
    routes = [routing(tokens, e, e_routed, k, device, shared) for _ in range(n_inputs)]

    # correctness on fresh inputs first
    x, (rw, ids) = xs[0], routes[0]
    out = fused_moe_triton(x, w13, w2, rw, ids, s13, s2, BLOCK, act_fp8)
    row = {"model": name, "tokens": tokens, "variant": variant}
    row["err_vs_ref"] = rel_err(out, fused_moe_ref(x, w13, w2, rw, ids, s13, s2, BLOCK))
    if variant != "fp8_w8a16":  # the public name must dispatch to the kernel on CUDA
        row["dispatch_err"] = rel_err(fused_moe(x, w13, w2, rw, ids, s13, s2, BLOCK, num_fused_shared=shared), out)
    if act_fp8:
        row["err_vs_w8a8_ref"] = rel_err(out, fused_moe_w8a8_ref(x, w13, w2, rw, ids, s13, s2, BLOCK))
    if tokens <= 256:
        a_ref = moe_align_block_size_ref(ids, 16, e)
        a_out = moe_align_block_size_triton(ids, 16, e)
        row["align_mismatch"] = int(sum(int((p != q).sum()) for p, q in zip(a_ref, a_out)))

    def run_with(config):
        return lambda j: fused_moe_triton(xs[j], w13, w2, routes[j][0], routes[j][1], s13, s2, BLOCK, act_fp8,
                                          config)

    wdtype = "fp8" if fp8 else "bfloat16"
    key = moe_config.moe_shape_key(e, h, i, k, wdtype)
    valid_pairs = sum(int((r[1] >= 0).sum()) for r in routes) / n_inputs
    rows_per_expert = valid_pairs / e
    if tune and variant != "fp8_w8a16" and shared:
        config, row["t_gate_up_us"], row["t_down_us"], row["trials"] = tune_split(
            tokens, e, k, shared, weights, xs, routes, act_fp8, timer, smoke)
        row["n_trials"] = sum(len(t) for t in row["trials"].values())
        tuned.setdefault(key, {})[str(tokens)] = config
        row["t_us"] = timer(run_with(config), n_inputs)  # the whole layer, as the untuned rows time it
        before = moe_config.moe_config(tokens, e, h, i, k, wdtype, x.device, shared)  # what the engine runs now
        row["config_before"], row["t_before_us"] = before, timer(run_with(before), n_inputs)
    elif tune and variant != "fp8_w8a16":
        best = None
        for c in moe_candidates(rows_per_expert):
            try:
                t = timer(run_with(c), n_inputs)
            except Exception as ex:  # a config that does not compile or fit is skipped, not fatal
                print(f"  config {c} failed: {type(ex).__name__}: {str(ex)[:120]}")
                continue
            if best is None or t < best[0]:
                best = (t, c)
        row["t_us"], config = best
        tuned.setdefault(key, {})[str(tokens)] = config
    else:
        config = moe_config.moe_config(tokens, e, h, i, k, wdtype, x.device, shared)
        row["t_us"] = timer(run_with(config), n_inputs)
    # beside it, the per-block flags' switches (the bits equal): t_flags_<down waits per block>_<quant by
    # gate_up's last tile>_us, t_flags_False_False_us the grid-wide wait and the separate quant launch
    for wait, by_last in ((False, False), (True, False), (False, True), (True, True)):
        switched = dict(config, DOWN_WAITS_PER_BLOCK=wait, ACT_QUANT_BY_LAST_TILE=by_last)
        row[f"t_flags_{wait}_{by_last}_us"] = timer(run_with(switched), n_inputs)
        row.setdefault("flags_equal", True)
        row["flags_equal"] &= bool(torch.equal(run_with(switched)(0), run_with(config)(0)))
    row["config"] = config
    tile_n = moe_config.FP8_WEIGHT_TILE_ROWS
    if act_fp8 and can_tile_weights(w13, w2, tile_n, BLOCK):  # beside it, the weights in the engine's tiled layout
        t13, t2 = tile_weights(w13, tile_n, BLOCK[1]), tile_weights(w2, tile_n, BLOCK[1])

        def tiled(j):
            return fused_moe_triton(xs[j], t13, t2, routes[j][0], routes[j][1], s13, s2, BLOCK, True, config,
                                    w_tile_n=tile_n)
        row["t_tiled_us"] = timer(tiled, n_inputs)
        row["tiled_equal"] = bool(torch.equal(tiled(0), run_with(config)(0)))
        del t13, t2
    if tokens == 1 and not smoke:
        row["t_eager_us"] = timer(run_with(config), n_inputs, graph=False)
    row["t_align_us"] = timer(lambda j: moe_align_block_size_triton(routes[j][1], config["BLOCK_M"], e), n_inputs)
    if moe_align.one_launch(tokens * k, e):  # the dispatch ran one launch: the three beside it
        row["t_align_3pass_us"] = timer(lambda j: moe_align_block_size_triton(routes[j][1], config["BLOCK_M"], e,
                                                                              path="three_pass"), n_inputs)

    wbytes_expert = (w13[0].numel() + w2[0].numel()) * w13.element_size()
    if fp8:
        wbytes_expert += (s13[0].numel() + s2[0].numel()) * 4
    hit = sum(int(torch.unique(r[1][r[1] >= 0]).numel()) for r in routes) / n_inputs
    nbytes = hit * wbytes_expert + 2 * tokens * h * 2
    flops = 2 * valid_pairs * 3 * i * h
    row["roof_us"], row["bound"] = roofline_us(nbytes, flops, ceil, fp8_rate=act_fp8)
    row["ratio"] = row["t_us"] / row["roof_us"]
    row["experts_hit"] = hit
    return row


# ---- gate_up and down tuned apart (models with fused shared experts) ----------------------------
#
# The two GEMMs differ in shape (V2-Lite: gate_up N = I = 1408 with two accumulators, K = H = 2048;
# down N = H = 2048, K = I = 1408), so each gets its own tiles; only BLOCK_M is one for both (they
# walk the same moe_align blocks). Per token count and GEMM, at most MAX_TRIALS timed configs:
#  1. every tile shape (BLOCK_N x BLOCK_K) at the first row block, then the best 3 at the other row blocks;
#  2. the row block whose best gate_up + best down is least;
#  3. at that row block, 3/4/5 stages x 4/8 warps (and GROUP_SIZE_M 1 <-> 8 where an expert has
#     several row blocks) around each GEMM's best 2 configs, until MAX_TRIALS.

MAX_TRIALS = 24  # each ~0.1 s of graph replays, plus ~0.3-1 s to compile a config not compiled yet
SMEM_BYTES = 220 * 1024  # the H200 gives a block 227 KB


def smem_fits(c, gate_up, a_bytes, w_bytes) -> bool:
    """The pipeline's A tiles and W tiles (gate_up loads a gate and an up tile) fit in shared memory.
    An upper bound: sm_90 compiles of the candidates took 0.67-1.0 of it (Triton 3.9)."""
    per_stage = c["BLOCK_M"] * c["BLOCK_K"] * a_bytes + (2 if gate_up else 1) * c["BLOCK_K"] * c["BLOCK_N"] * w_bytes
    return c["num_stages"] * per_stage <= SMEM_BYTES


def block_m_candidates(busiest: float, rows_per_expert: float) -> list[int]:
    """16 (tl.dot's least) and the larger blocks that the busiest expert's rows fill; past decode
    sizes (routed experts' rows) the former candidates' 64 and 128."""
    if rows_per_expert > 48:
        return [64, 128]
    return [bm for bm in (16, 32, 64) if bm == 16 or bm <= busiest]


def tile_candidates(gate_up, bm, group, w_fp8, a_bytes, w_bytes) -> list[dict]:
    """Each BLOCK_N x BLOCK_K at 4 warps (8 from BLOCK_M 64), the deepest of 4 or 3 stages that fits.
    Wide N tiles make fewer programs (at 1 token gate_up has 8 experts x I / BLOCK_N of them for 132
    SMs), narrow ones more; FP8 K tiles stop at the 128 scale group (the launcher clamps them to it)."""
    decode = bm <= 32
    bns = (32, 64, 128, 256) if decode else (64, 128, 256)
    bks = (64, 128) if w_fp8 or not decode else (64, 128, 256)
    out = []
    for bn in bns:
        for bk in bks:
            fits = [c for c in (cfg(bm, bn, bk, group, 4 if decode else 8, s) for s in (4, 3))
                    if smem_fits(c, gate_up, a_bytes, w_bytes)]
            out += fits[:1]
    return out


def pipeline_variants(c, multi_block) -> list[dict]:
    out = [dict(c, num_stages=s, num_warps=w) for s in (3, 4, 5) for w in (4, 8)]
    if multi_block:  # grouped, the programs of one expert's row blocks run together and share its W tiles in L2
        out.append(dict(c, GROUP_SIZE_M=1 if c["GROUP_SIZE_M"] > 1 else 8))
    return out


def tune_split(tokens, e, k, shared, weights, xs, routes, act_fp8, timer, smoke):
    """A model with `shared` fused shared-expert slots -> (gate_up config with its "down" overrides,
    gate_up us, down us, {"gate_up": [config with its t_us], "down": [...]} of every config timed)."""
    w13, w2, s13, s2 = weights
    pairs, inter, hidden = tokens * k, w2.shape[2], w2.shape[1]
    n_inputs, dev, dt = len(xs), xs[0].device, xs[0].dtype
    rows_per_expert = tokens * (k - shared) / (e - shared)  # of a routed expert
    busiest = tokens  # a shared slot: every token
    a_bytes = 1 if act_fp8 else 2
    w_bytes = w13.element_size()
    limit = 3 if smoke else MAX_TRIALS

    # W8A8: each GEMM's input is quantized once here, outside the timed region: the quant launches
    # cost the same whatever the tiles. (The row's t_us, the whole fused_moe_triton, includes them.)
    def inputs(a):
        return per_token_group_quant_fp8_triton(a, BLOCK[1]) if act_fp8 else (a, None)

    gate_in = [inputs(x) for x in xs]
    down_in = [inputs(torch.randn(pairs, inter, device=dev, dtype=dt)) for _ in range(n_inputs)]
    act, y = torch.empty(pairs, inter, device=dev, dtype=dt), torch.empty(pairs, hidden, device=dev, dtype=dt)
    route_w = [r[0].reshape(-1).float().contiguous() for r in routes]
    bms = block_m_candidates(busiest, rows_per_expert)
    # GROUP_SIZE_M as the former candidates until step 3: then the decode rows' tiles (all at 1) are
    # compiled once for every token count (a compile costs ~0.3-1 s, more than a timing)
    group = 8 if rows_per_expert > 48 else 1
    aligns = {bm: [moe_align_block_size_triton(r[1], bm, e) for r in routes] for bm in bms}
    trials = {True: [], False: []}  # gate_up?: [(us, config)]

    def trial(gate_up, c):
        done = [tc[1] for tc in trials[gate_up]]
        if len(done) >= limit or c in done or not smem_fits(c, gate_up, a_bytes, w_bytes):
            return
        al = aligns[c["BLOCK_M"]]
        if gate_up:
            def fn(j):
                _launch_moe_gemm(*gate_in[j], w13, s13, act, None, al[j], pairs, k, True, c, BLOCK)
        else:
            def fn(j):
                _launch_moe_gemm(*down_in[j], w2, s2, y, route_w[j], al[j], pairs, 1, False, c, BLOCK)
        try:
            trials[gate_up].append((timer(fn, n_inputs), c))
        except Exception as ex:  # a config that does not compile or fit is skipped, not fatal
            print(f"  {'gate_up' if gate_up else 'down'} config {c} failed: {type(ex).__name__}: {str(ex)[:120]}")
            trials[gate_up].append((math.inf, c))

    def best(gate_up, bm, n=1):
        return sorted((tc for tc in trials[gate_up] if tc[1]["BLOCK_M"] == bm), key=lambda tc: tc[0])[:n]

    def least(gate_up, bm):
        return min((t for t, c in trials[gate_up] if c["BLOCK_M"] == bm), default=math.inf)

    for gate_up in (True, False):
        for c in tile_candidates(gate_up, bms[0], group, s13 is not None, a_bytes, w_bytes):
            trial(gate_up, c)
        for bm in bms[1:]:
            for _, c in best(gate_up, bms[0], 3):
                trial(gate_up, dict(c, BLOCK_M=bm))
    bm = min(bms, key=lambda bm: least(True, bm) + least(False, bm))
    for gate_up in (True, False):
        for _, c in best(gate_up, bm, 2):
            for v in pipeline_variants(c, busiest > bm):
                trial(gate_up, v)
    if math.isinf(least(True, bm) + least(False, bm)):
        raise RuntimeError(f"no config ran at BLOCK_M {bm}")
    (t_gate, c_gate), (t_down, c_down) = best(True, bm)[0], best(False, bm)[0]
    down = {key: c_down[key] for key in sorted(moe_config.DOWN_TILE_KEYS)}
    timed = {"gate_up" if g else "down": [dict(c, t_us=t) for t, c in trials[g]] for g in (True, False)}
    return dict(c_gate, down=down), t_gate, t_down, timed


# ---- dense FP8 -----------------------------------------------------------------------------------

def dense_case(n, k, m, timer, ceil, tune, tuned, smoke, device):
    copies = 1 if smoke else max(1, min(8, math.ceil(200e6 / (n * k))))
    ws = [torch.randn(n, k, device=device, dtype=torch.bfloat16).to(FP8_DTYPE) for _ in range(copies)]
    ss = [torch.rand(-(-n // BLOCK[0]), -(-k // BLOCK[1]), device=device).add_(0.5).mul_(k ** -0.5)
          for _ in range(copies)]
    xs = [torch.randn(m, k, device=device, dtype=torch.bfloat16) for _ in range(copies)]
    out = block_fp8_matmul_triton(xs[0], ws[0], ss[0], BLOCK)
    row = {"model": f"dense N={n} K={k}", "tokens": m, "variant": "fp8"}
    row["err_vs_w8a8_ref"] = rel_err(out, block_fp8_matmul_ref(xs[0], ws[0], ss[0], BLOCK))
    row["err_vs_ref"] = rel_err(out, xs[0].float() @ dequant_block_fp8_ref(ws[0], ss[0], BLOCK).t())
    row["dispatch_err"] = rel_err(block_fp8_matmul(xs[0], ws[0], ss[0], BLOCK), out)

    def run_with(config):
        return lambda j: block_fp8_matmul_triton(xs[j], ws[j], ss[j], BLOCK, config)

    if tune:
        best = None
        for c in dense_candidates(m):
            try:
                t = timer(run_with(c), copies)
            except Exception as ex:
                print(f"  config {c} failed: {type(ex).__name__}: {str(ex)[:120]}")
                continue
            if best is None or t < best[0]:
                best = (t, c)
        row["t_us"], config = best
        tuned.setdefault(moe_config.dense_shape_key(n, k), {})[str(m)] = config
    else:
        config = moe_config.dense_fp8_config(m, n, k, xs[0].device)
        row["t_us"] = timer(run_with(config), copies)
    row["config"] = config
    nbytes = n * k + ss[0].numel() * 4 + m * k * 2 + m * n * 2
    row["roof_us"], row["bound"] = roofline_us(nbytes, 2 * m * n * k, ceil, fp8_rate=True)
    row["ratio"] = row["t_us"] / row["roof_us"]
    return row


def quant_check(timer, ceil, device, smoke):
    m, k = (4, 256) if smoke else (4096, 7168)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16) * torch.rand(m, 1, device=device, dtype=torch.bfloat16)
    q, s = per_token_group_quant_fp8_triton(x, 128)
    q_ref, s_ref = per_token_group_quant_fp8_ref(x, 128)
    mism = int((q.view(torch.uint8) != q_ref.view(torch.uint8)).sum())
    t = timer(lambda j: per_token_group_quant_fp8_triton(x, 128), 1)
    nbytes = m * k * 3 + s.numel() * 4
    roof = nbytes / (ceil["copy_GBps"] * 1e3)
    return {"model": f"group quant {m}x{k}", "tokens": m, "variant": "bf16->fp8", "t_us": t, "roof_us": roof,
            "bound": "mem", "ratio": t / roof, "q_mismatch": mism, "scale_err": rel_err(s, s_ref),
            "err_vs_ref": rel_err(q.float() * s.repeat_interleave(128, 1), x.float())}


# ---- dense FP8 GEMM at decode shapes (--fp8-gemm) -------------------------------------------------

V2LITE_DENSE = [  # (name, N, K, calls per decode step) as the engine runs it: 27 layers, the first dense; q_proj
    # and kv_a_proj are one GEMM (MergedColumnLinear), kv_b_proj is absorbed (bf16 per-head kernels), and
    # the 2 shared experts run inside the fused MoE (ModelConfig.fuse_shared_experts)
    ("q_kv_a_proj", 3648, 2048, 27), ("o_proj", 2048, 2048, 27), ("dense gate_up", 21888, 2048, 1),
    ("dense down", 2048, 10944, 1)]
V3_DENSE = [("q_a+kv_a", 2112, 7168, 0), ("q_b", 24576, 1536, 0), ("shared gate_up", 4096, 7168, 0),
            ("shared down", 7168, 2048, 0), ("o_proj", 7168, 16384, 0)]
GEMM_M = [1, 8, 32, 64, 128, 4096]

try:
    import triton as _triton
    import triton.language as tl

    from moeserve.kernels.fp8 import _grouped_pid

    @_triton.jit(do_not_specialize=["stride_asm", "stride_bsn"])  # as the new kernel: fewer compiles
    def _old_block_fp8_matmul_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, m, n, k,
                                     stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
                                     GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,
                                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                     GROUP_SIZE_M: tl.constexpr):
        # The kernel as of commit 44b8295, kept here as the baseline: one program per output tile.
        pid = tl.program_id(0)
        num_pid_m, num_pid_n = tl.cdiv(m, BLOCK_M), tl.cdiv(n, BLOCK_N)
        pid_m, pid_n = _grouped_pid(pid, num_pid_m, num_pid_n, GROUP_SIZE_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m, mask_n = offs_m < m, offs_n < n
        a_rows = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am
        b_cols = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn
        as_rows = as_ptr + offs_m.to(tl.int64) * stride_asm
        bs_cols = bs_ptr + (offs_n // GROUP_N).to(tl.int64) * stride_bsn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            kk = k0 + offs_k
            a = tl.load(a_rows + kk[None, :], mask=mask_m[:, None] & (kk[None, :] < k), other=0.0)
            b = tl.load(b_cols + kk[:, None], mask=mask_n[None, :] & (kk[:, None] < k), other=0.0)
            a_s = tl.load(as_rows + k0 // GROUP_K, mask=mask_m, other=0.0)
            b_s = tl.load(bs_cols + k0 // GROUP_K, mask=mask_n, other=0.0)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
except ImportError:  # pragma: no cover
    _triton = None


def legacy_dense_config(m, n, k, device) -> dict:
    """The configs the previous kernel used: its H100-tuned table (V3 shapes), else its default."""
    table = moe_config.load_configs("block_fp8_legacy", moe_config.arch_tag(device)).get(
        moe_config.dense_shape_key(n, k))
    if table:
        return moe_config._nearest(table, m)
    if device.type == "cpu":
        return cfg(16, 32, 32, 1, 4, 1)
    if m <= 16:
        return cfg(16, 64, 128, 1, 4, 4)
    if m <= 128:
        return cfg(64, 64, 128, 1, 4, 4)
    return cfg(128, 128, 128, 8, 8, 3)


def old_block_fp8_matmul(x, w, w_scale, config):
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    xq, xs = per_token_group_quant_fp8_triton(x, BLOCK[1])
    c = dict(config)
    c["BLOCK_K"] = min(c["BLOCK_K"], BLOCK[1])
    grid = (_triton.cdiv(m, c["BLOCK_M"]) * _triton.cdiv(n, c["BLOCK_N"]),)
    _old_block_fp8_matmul_kernel[grid](xq, xs, w, w_scale, out, m, n, k, xq.stride(0), xs.stride(0), w.stride(0),
                                       w_scale.stride(0), out.stride(0), GROUP_N=BLOCK[0], GROUP_K=BLOCK[1], **c)
    return out


def splitk_candidates(m, n, k, default) -> list[dict]:
    """Decode sweep: BLOCK_N x SPLIT_K at the default's BLOCK_M and fusion, the split summed in the
    GEMM (REDUCE_IN_GEMM); gemm_case then tries dense_variants of the best two."""
    if m > moe_config.DECODE_MAX_M:
        return [default, cfg(128, 128, 128, 8, 8, 4) | dict(SPLIT_K=1, FUSE_QUANT=False)]
    groups = -(-k // BLOCK[1])
    out = [default]
    bms = [default["BLOCK_M"]] + ([128] if m > 64 else [])
    for bm in bms:
        for bn in (32, 64, 128):
            for split in (1, 2, 4, 8, 16):
                if split > groups:
                    continue
                c = dict(default, BLOCK_M=bm, BLOCK_N=bn, SPLIT_K=split, REDUCE_IN_GEMM=True)
                if c not in out:
                    out.append(c)
    return out


def dense_variants(c) -> list[dict]:
    """Around a good decode config: the split summed by a second launch instead, 8 warps, and the
    activation quant inside the GEMM or not."""
    out = [dict(c, num_warps=8), dict(c, FUSE_QUANT=not c.get("FUSE_QUANT", False))]
    if c.get("SPLIT_K", 1) > 1:
        out.append(dict(c, REDUCE_IN_GEMM=not c.get("REDUCE_IN_GEMM", False)))
    return out


def _rotating_inputs(n, k, device, smoke):
    l2 = 1 << 20 if smoke else torch.cuda.get_device_properties(device).L2_cache_size
    copies = 1 if smoke else max(2, min(96, math.ceil(3 * l2 / (n * k))))
    ws, ss, wbs = [], [], []
    for _ in range(copies):
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16).to(FP8_DTYPE)
        s = torch.rand(-(-n // BLOCK[0]), -(-k // BLOCK[1]), device=device).add_(0.5).mul_(k ** -0.5)
        ws.append(w)
        ss.append(s)
        wbs.append(dequant_block_fp8_ref(w, s, BLOCK, torch.bfloat16))
    return ws, ss, wbs, l2


def gemm_case(model, name, n, k, m, inputs, timer, ceil, tune, tuned, device, smoke) -> dict:
    ws, ss, wbs, l2 = inputs
    copies = len(ws)
    x_copies = 1 if smoke else max(1, min(copies, math.ceil(3 * l2 / (m * k * 2))))
    xs = [torch.randn(m, k, device=device, dtype=torch.bfloat16 if not smoke else torch.float32)
          * torch.rand(m, 1, device=device).add_(0.1).to(torch.bfloat16 if not smoke else torch.float32)
          for _ in range(x_copies)]
    wbs = wbs if not smoke else [w.float() for w in wbs]
    new_cfg = moe_config.dense_fp8_config(m, n, k, device)
    old_cfg = legacy_dense_config(m, n, k, device)
    row = {"model": model, "name": name, "N": n, "K": k, "M": m, "copies": copies, "new_config": new_cfg,
           "old_config": old_cfg}

    # correctness on the GPU: fresh inputs, against the bf16 reference and the W8A8 emulation
    x, w, s = xs[0], ws[0], ss[0]
    ref = x.float() @ dequant_block_fp8_ref(w, s, BLOCK).t()
    out = block_fp8_matmul_triton(x, w, s, BLOCK, new_cfg)
    row["err_new_vs_bf16_ref"] = rel_err(out, ref)
    row["err_old_vs_bf16_ref"] = rel_err(old_block_fp8_matmul(x, w, s, old_cfg), ref)
    row["err_new_vs_w8a8_ref"] = rel_err(out, block_fp8_matmul_ref(x, w, s, BLOCK))
    row["repeat_mismatch"] = int((block_fp8_matmul_triton(x, w, s, BLOCK, new_cfg) != out).sum())
    row["dispatch_mismatch"] = int((block_fp8_matmul(x, w, s, BLOCK) != out).sum())
    flipped = dict(new_cfg, FUSE_QUANT=not new_cfg.get("FUSE_QUANT", False), BLOCK_K=BLOCK[1])
    same = block_fp8_matmul_triton(x, w, s, BLOCK, dict(new_cfg, BLOCK_K=BLOCK[1]))
    row["fuse_flip_maxdiff"] = float((block_fp8_matmul_triton(x, w, s, BLOCK, flipped).float() - same.float())
                                     .abs().max())
    q, qs = per_token_group_quant_fp8_triton(x, BLOCK[1])
    q_ref, qs_ref = per_token_group_quant_fp8_ref(x, BLOCK[1])
    row["quant_value_mismatch"] = int((q.float() != q_ref.float()).sum())  # the separate quant vs torch
    row["quant_scale_err"] = rel_err(qs, qs_ref)
    # the split summed by the GEMM's last program (on a CUDA graph's replays too: the arrival counters
    # must be back at zero after every call) must equal the separate reduce pass bit for bit
    split4 = dict(new_cfg, SPLIT_K=4, REDUCE_IN_GEMM=True)
    out4 = block_fp8_matmul_triton(x, w, s, BLOCK, split4)
    row["reduce_flip_maxdiff"] = float((block_fp8_matmul_triton(x, w, s, BLOCK, dict(split4, REDUCE_IN_GEMM=False))
                                        .float() - out4.float()).abs().max())
    if not smoke:  # (the eager call above allocated the counters; a capture cannot)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            replayed = block_fp8_matmul_triton(x, w, s, BLOCK, split4)
        mism = 0
        for _ in range(3):
            graph.replay()
            mism += int((replayed != out4).sum())
        row["graph_replay_mismatch"] = mism
    row["ok"] = (row["err_new_vs_bf16_ref"] < 3e-2 and row["repeat_mismatch"] == 0 and row["fuse_flip_maxdiff"] == 0
                 and row["dispatch_mismatch"] == 0 and row["reduce_flip_maxdiff"] == 0
                 and row.get("graph_replay_mismatch", 0) == 0)
    del ref, out, same, out4

    def run_new(c):
        return lambda j: block_fp8_matmul_triton(xs[j % x_copies], ws[j], ss[j], BLOCK, c)

    row["t_old_us"] = timer(lambda j: old_block_fp8_matmul(xs[j % x_copies], ws[j], ss[j], old_cfg), copies)
    row["t_quant_us"] = timer(lambda j: per_token_group_quant_fp8_triton(xs[j % x_copies], BLOCK[1]), copies)
    row["t_bf16_us"] = timer(lambda j: torch.nn.functional.linear(xs[j % x_copies], wbs[j]), copies)
    row["t_new_us"] = timer(run_new(new_cfg), copies)
    if tune:
        trials = []

        def trial(c):
            if any(c == tc for _, tc in trials):
                return
            try:
                t = timer(run_new(c), copies)
            except Exception as ex:  # a config that does not compile or fit is skipped, not fatal
                print(f"  config {c} failed: {type(ex).__name__}: {str(ex)[:120]}")
                return
            trials.append((t, c))

        for c in splitk_candidates(m, n, k, new_cfg):
            trial(c)
        if m <= moe_config.DECODE_MAX_M:
            for _, c in sorted(trials, key=lambda tc: tc[0])[:2]:
                for v in dense_variants(c):
                    trial(v)
        row["trials"] = [{"t_us": t, **c} for t, c in trials]
        t_best, c_best = min(trials, key=lambda tc: tc[0])
        row["t_best_us"], row["best_config"] = t_best, c_best
        tuned.setdefault(moe_config.dense_shape_key(n, k), {})[str(m)] = c_best
    nbytes = n * k + s.numel() * 4 + m * k * 2 + m * n * 2
    row["roof_us"], row["bound"] = roofline_us(nbytes, 2 * m * n * k, ceil, fp8_rate=True)
    row["roof_bf16_us"], _ = roofline_us(2 * n * k + m * k * 2 + m * n * 2, 2 * m * n * k, ceil, fp8_rate=False)
    row["new_over_old"] = row["t_new_us"] / row["t_old_us"]
    row["new_over_bf16"] = row["t_new_us"] / row["t_bf16_us"]
    row["new_over_roof"] = row["t_new_us"] / row["roof_us"]
    return row


def moe_quant_case(tokens, weights, timer, device, smoke) -> dict:
    """V2-Lite FP8 fused MoE: activation quant inside the GEMMs vs two separate quant launches."""
    e, h, i, k, e_routed, _ = MODELS["V2-Lite"]
    w13, w2, s13, s2 = weights
    n_inputs = 1 if smoke else 4
    dt = torch.float32 if smoke else torch.bfloat16
    xs = [torch.randn(tokens, h, device=device, dtype=dt) for _ in range(n_inputs)]
    routes = [routing(tokens, e, e_routed, k, device) for _ in range(n_inputs)]
    base = moe_config.moe_config(tokens, e, h, i, k, "fp8", device)
    row = {"model": "V2-Lite MoE fp8", "M": tokens, "config": base,
           "default_fuse": bool(base.get("FUSE_QUANT", moe_config.moe_fuse_quant(tokens, e, k)))}
    x, (rw, ids) = xs[0], routes[0]
    fused = fused_moe_triton(x, w13, w2, rw, ids, s13, s2, BLOCK, True, dict(base, FUSE_QUANT=True))
    unfused = fused_moe_triton(x, w13, w2, rw, ids, s13, s2, BLOCK, True, dict(base, FUSE_QUANT=False))
    row["fused_vs_unfused_maxdiff"] = float((fused.float() - unfused.float()).abs().max())
    row["err_fused_vs_w8a8_ref"] = rel_err(fused, fused_moe_w8a8_ref(x, w13, w2, rw, ids, s13, s2, BLOCK))
    for tag, fuse in (("fused", True), ("separate", False)):
        c = dict(base, FUSE_QUANT=fuse)
        row[f"t_{tag}_us"] = timer(lambda j: fused_moe_triton(xs[j], w13, w2, routes[j][0], routes[j][1], s13, s2,
                                                              BLOCK, True, c), n_inputs)
    row["fused_over_separate"] = row["t_fused_us"] / row["t_separate_us"]
    return row


def fmt_gemm_row(r) -> str:
    c = r["new_config"]
    cs = f"{c['BLOCK_M']}x{c['BLOCK_N']} s{c.get('SPLIT_K', 1)}{' fq' if c.get('FUSE_QUANT') else ''}"
    best = f" (best {r['t_best_us']:.1f})" if "t_best_us" in r else ""
    return (f"| {r['model']} {r['name']} {r['N']}x{r['K']} | {r['M']} | {r['t_old_us']:.1f} | {r['t_new_us']:.1f}{best} "
            f"| {r['t_bf16_us']:.1f} | {r['roof_us']:.1f} | {r['new_over_old']:.2f} | {r['new_over_bf16']:.2f} | "
            f"{r['new_over_roof']:.2f} | {cs} | {r['err_new_vs_bf16_ref']:.1e}{'' if r['ok'] else ' FAIL'} |")


def fp8_gemm_main(args, timer, device, t_start):
    ceil = ceilings(timer, device)
    meta = {"device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(),
            "arch": moe_config.arch_tag(device) if not args.smoke else "cpu",
            "sms": moe_config.num_sms(device),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(), "command": " ".join(sys.argv), "torch": torch.__version__,
            "triton": _triton.__version__ if _triton else None, "ceilings": ceil}
    print(json.dumps(meta))
    groups = [(name, {"V2-Lite": V2LITE_DENSE, "V3": V3_DENSE}[name]) for name in args.gemm_models.split(",")]
    ms = [int(t) for t in args.tokens.split(",")] if args.tokens != ",".join(map(str, TOKENS)) else GEMM_M
    if args.smoke:
        groups = [("tiny", [("a", 96, 160, 2)])]
        ms = [1, 3]
        MODELS["V2-Lite"] = (4, 128, 128, 2, 4, 0)
    rows, moe_rows, tuned = [], [], {}

    def dump():
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kernels_fp8_gemm.json"), "w") as f:
            json.dump({**meta, "cases": rows, "moe_quant": moe_rows}, f, indent=1)
        if tuned:
            with open(os.path.join(args.out, f"dense_fp8_{meta['arch']}.json"), "w") as f:
                json.dump(tuned, f, indent=1, sort_keys=True)

    for model, shapes in groups:
        for name, n, k, calls in shapes:
            try:
                inputs = _rotating_inputs(n, k, device, args.smoke)
            except Exception as ex:
                print(f"FAILED inputs {model} {name}: {type(ex).__name__}: {str(ex)[:300]}")
                continue
            for m in ms:
                tune = args.tune and time.time() - t_start < args.budget_s
                try:
                    r = gemm_case(model, name, n, k, m, inputs, timer, ceil, tune, tuned, device, args.smoke)
                except Exception as ex:  # one failing case must not cost the rest of the run
                    print(f"FAILED {model} {name} M={m}: {type(ex).__name__}: {str(ex)[:300]}")
                    continue
                r["calls_per_step"] = calls
                rows.append(r)
                print(fmt_gemm_row(r), json.dumps({kk: r.get(kk) for kk in (
                    "err_new_vs_w8a8_ref", "t_quant_us", "fuse_flip_maxdiff", "repeat_mismatch", "quant_value_mismatch",
                    "reduce_flip_maxdiff", "graph_replay_mismatch", "best_config")}))
                dump()
            del inputs
            if not args.smoke:
                torch.cuda.empty_cache()
    if not args.no_moe_quant:
        try:
            weights = make_experts(*MODELS["V2-Lite"][:3], True, device, args.smoke)
            for t in ([2] if args.smoke else [1, 8, 64, 256]):
                r = moe_quant_case(t, weights, timer, device, args.smoke)
                moe_rows.append(r)
                print(json.dumps(r))
                dump()
            del weights
        except Exception as ex:
            print(f"FAILED moe quant: {type(ex).__name__}: {str(ex)[:300]}")
    meta["wall_s"] = time.time() - t_start
    dump()

    lines = [f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s, bf16 {ceil['bf16_TFLOPs']:.0f} TFLOP/s, fp8 "
             f"{ceil['fp8_TFLOPs']:.0f} TFLOP/s; {meta['device']}, {meta['sms']} SMs; {meta['wall_s']:.0f} s", "",
             "| shape N x K | M | old us (quant+GEMM) | new us | bf16 mm us | roofline us | new/old | new/bf16 | "
             "new/roof | new config | rel err vs bf16 ref |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [fmt_gemm_row(r) for r in rows]
    for m in ms:  # V2-Lite's dense GEMMs of one decode step
        step = [r for r in rows if r["model"] == "V2-Lite" and r["M"] == m]
        if len(step) == len(V2LITE_DENSE):
            tot = {key: sum(r[key] * r["calls_per_step"] for r in step) for key in
                   ("t_old_us", "t_new_us", "t_bf16_us", "roof_us")}
            lines.append(f"V2-Lite decode step at batch {m}, {sum(r['calls_per_step'] for r in step)} dense GEMM "
                         f"calls: old {tot['t_old_us']:.0f} us, new {tot['t_new_us']:.0f} us, bf16 "
                         f"{tot['t_bf16_us']:.0f} us, FP8 roofline {tot['roof_us']:.0f} us")
    for r in moe_rows:
        lines.append(f"V2-Lite fused MoE fp8 T={r['M']}: in-GEMM quant {r['t_fused_us']:.1f} us, separate "
                     f"{r['t_separate_us']:.1f} us (x{r['fused_over_separate']:.2f}), max diff "
                     f"{r['fused_vs_unfused_maxdiff']:g}, err vs W8A8 ref {r['err_fused_vs_w8a8_ref']:.1e}, "
                     f"default fuse {r['default_fuse']}")
    bad = [r for r in rows if not r["ok"]]
    lines.append(f"correctness: {len(rows) - len(bad)}/{len(rows)} GEMM cases ok"
                 + (": FAILED " + ", ".join(f"{r['name']} M={r['M']}" for r in bad) if bad else ""))
    with open(os.path.join(args.out, "kernels_fp8_gemm.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))


# ---- moe_align alone (--align) --------------------------------------------------------------------

ALIGN_SHAPES = [  # (name, local experts, top_k, experts routed over)
    ("V2-Lite", 64, 6, 64),
    ("V2-Lite+2 shared", 66, 8, 66),
    ("V3", 256, 8, 256),
]
ALIGN_TOKENS = [1, 8, 32, 64, 128, 256, 512, 1024, 8192]


def align_case(name, e, k, e_routed, tokens, block_m, timer, device, smoke) -> dict:
    n_inputs = 1 if smoke else 4
    ids = [routing(tokens, e, e_routed, k, device)[1] for _ in range(n_inputs)]
    pairs = tokens * k
    row = {"model": name, "experts": e, "top_k": k, "tokens": tokens, "pairs": pairs, "BLOCK_M": block_m,
           "one_launch_dispatched": moe_align.one_launch(pairs, e)}
    ref = moe_align_block_size_ref(ids[0], block_m, e)

    def mismatch(out) -> int:
        return int(sum(int((p != q).sum()) for p, q in zip(ref, out)))

    paths = {"three_pass": lambda j: moe_align_block_size_triton(ids[j], block_m, e, path="three_pass"),
             "dispatch": lambda j: moe_align_block_size_triton(ids[j], block_m, e)}
    if pairs <= 8192:  # past the bound too, to see the crossover
        paths["one_launch"] = lambda j: moe_align_block_size_triton(ids[j], block_m, e, path="one_launch")
    for path, fn in paths.items():
        row[f"{path}_mismatch"] = mismatch(fn(0))
        row[f"t_{path}_us"] = timer(fn, n_inputs)
    if "t_one_launch_us" in row:
        row["three_pass_over_one_launch"] = row["t_three_pass_us"] / row["t_one_launch_us"]
    return row


def fmt_align_row(r) -> str:
    def us(key):
        return f"{r[key]:.1f}" if key in r else "-"

    bad = sum(v for key, v in r.items() if key.endswith("_mismatch"))
    ratio = f"{r['three_pass_over_one_launch']:.2f}" if "three_pass_over_one_launch" in r else "-"
    return (f"| {r['model']} | {r['tokens']} | {r['pairs']} | {r['BLOCK_M']} | {us('t_one_launch_us')} | "
            f"{us('t_three_pass_us')} | {ratio} | {'one' if r['one_launch_dispatched'] else 'three'} "
            f"{us('t_dispatch_us')} | {bad} |")


def align_main(args, timer, device, t_start):
    os.makedirs(args.out, exist_ok=True)
    meta = {"device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(), "command": " ".join(sys.argv), "torch": torch.__version__,
            "one_launch_max_work": moe_align.ONE_LAUNCH_MAX_WORK}
    print(json.dumps(meta))
    shapes = [("tiny", 6, 3, 8)] if args.smoke else ALIGN_SHAPES
    token_list = [1, 5] if args.smoke else ALIGN_TOKENS
    rows = []
    for name, e, k, e_routed in shapes:
        for tokens in token_list:
            for block_m in ((16,) if args.smoke else (16, 64)):
                try:
                    r = align_case(name, e, k, e_routed, tokens, block_m, timer, device, args.smoke)
                except Exception as ex:  # one failing case must not cost the rest of the run
                    print(f"FAILED align {name} T={tokens} BLOCK_M={block_m}: {type(ex).__name__}: {str(ex)[:300]}")
                    continue
                rows.append(r)
                print(fmt_align_row(r))
                with open(os.path.join(args.out, "kernels_align.json"), "w") as f:
                    json.dump({**meta, "cases": rows}, f, indent=1)
    meta["wall_s"] = time.time() - t_start
    with open(os.path.join(args.out, "kernels_align.json"), "w") as f:
        json.dump({**meta, "cases": rows}, f, indent=1)
    lines = [f"moe_align_block_size, us per call (CUDA-graph replays); one launch up to "
             f"{moe_align.ONE_LAUNCH_MAX_WORK} experts x pairs; {meta['device']}; {meta['wall_s']:.0f} s", "",
             "| shape | T | pairs | BLOCK_M | one launch us | three-pass us | three / one | dispatch: path us | "
             "mismatching elements |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"] + [fmt_align_row(r) for r in rows]
    print("\n" + "\n".join(lines))


# ---- report ------------------------------------------------------------------------------------

def git_commit() -> str:
    if os.environ.get("GIT_COMMIT"):  # the device machine's copy of the tree has no .git
        return os.environ["GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def fmt_row(r) -> str:
    errs = f"{r.get('err_vs_ref', float('nan')):.1e}"
    if "err_vs_w8a8_ref" in r:
        errs += f" / {r['err_vs_w8a8_ref']:.1e}"
    return (f"| {r['model']} | {r['tokens']} | {r['variant']} | {r['t_us']:.1f} | {r['roof_us']:.1f} "
            f"({r['bound']}) | {r['ratio']:.2f} | {errs} |")


def write_report(out_dir, meta, rows, tuned_moe, tuned_dense):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "kernels_moe.json"), "w") as f:
        json.dump({**meta, "cases": rows}, f, indent=1)
    for kind, table in (("fused_moe", tuned_moe), ("block_fp8", tuned_dense)):
        if table:
            with open(os.path.join(out_dir, f"{kind}_{meta['arch']}.json"), "w") as f:
                json.dump(table, f, indent=1, sort_keys=True)
    lines = ["| case | T / M | variant | time us | roofline us | ratio | rel err vs ref (/ vs W8A8 ref) |",
             "| --- | --- | --- | --- | --- | --- | --- |"] + [fmt_row(r) for r in rows]
    with open(os.path.join(out_dir, "kernels_moe_table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", action="store_true", help="time candidate block sizes, keep the best, write configs")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the interpreter")
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop tuning (use defaults) past this")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--dtypes", default="bf16,fp8", help="MoE weight formats to run: bf16, fp8 or both")
    ap.add_argument("--fp8-gemm", action="store_true", help="dense FP8 GEMM old/new/bf16 at decode shapes (only)")
    ap.add_argument("--gemm-models", default="V2-Lite,V3", help="--fp8-gemm: the models whose GEMM shapes to run")
    ap.add_argument("--no-moe-quant", action="store_true", help="--fp8-gemm without the fused-MoE quant rows")
    ap.add_argument("--align", action="store_true", help="moe_align alone: one-launch vs three-pass path (only)")
    args = ap.parse_args()
    t_start = time.time()
    if args.align:
        return align_main(args, Timer(args.smoke), torch.device("cpu" if args.smoke else "cuda"), t_start)
    if args.fp8_gemm:
        device = torch.device("cpu" if args.smoke else "cuda")
        return fp8_gemm_main(args, Timer(args.smoke), device, t_start)
    if args.smoke and args.tokens == ",".join(map(str, TOKENS)):
        args.tokens = "1,3"  # the interpreter: 8192 tokens would take many minutes
    if args.smoke:
        MODELS.update({"V2-Lite": (4, 64, 32, 2, 4, 0), "V2-Lite-fused": (5, 64, 32, 3, 4, 1),
                       "V3": (8, 64, 64, 3, 8, 0), "V3-EP8-local": (2, 64, 64, 3, 8, 0)})
        DENSE_NK[:] = [(96, 128)]
        device = torch.device("cpu")
    else:
        device = torch.device("cuda")
    timer = Timer(args.smoke)
    ceil = ceilings(timer, device)
    meta = {"device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(),
            "arch": moe_config.arch_tag(device) if not args.smoke else "sm90",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(), "command": " ".join(sys.argv), "torch": torch.__version__,
            "ceilings": ceil}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    print(json.dumps(meta))
    rows, tuned_moe, tuned_dense = [], {}, {}

    def record(row):
        rows.append(row)
        extra = ("config", "t_tiled_us", "tiled_equal", "t_eager_us", "t_align_us", "t_align_3pass_us",
                 "align_mismatch", "q_mismatch", "dispatch_err", "t_gate_up_us", "t_down_us", "n_trials",
                 "t_before_us", "config_before")
        print(fmt_row(row), json.dumps({k: v for k, v in row.items() if k in extra}))
        write_report(args.out, meta, rows, tuned_moe, tuned_dense)

    def guarded(fn, label):
        try:
            record(fn())
        except Exception as ex:  # one failing case must not cost the rest of the run
            print(f"FAILED {label}: {type(ex).__name__}: {str(ex)[:300]}")
        torch.cuda.empty_cache() if not args.smoke else None

    guarded(lambda: quant_check(timer, ceil, device, args.smoke), "quant")
    tokens = [int(t) for t in args.tokens.split(",")]
    for name in args.models.split(","):
        e, h, i, k, _, _ = MODELS[name]
        for fp8 in [d == "fp8" for d in args.dtypes.split(",")]:
            weights = make_experts(e, h, i, fp8, device, args.smoke)
            variants = ["fp8", "fp8_w8a16"] if fp8 else ["bf16"]
            for t in tokens:
                for v in variants:
                    if v == "fp8_w8a16" and t not in (1, 64, 8192):
                        continue
                    tune = args.tune and time.time() - t_start < args.budget_s
                    guarded(lambda: moe_case(name, t, v, weights, timer, ceil, tune, tuned_moe, args.smoke, device),
                            f"{name} T={t} {v}")
            del weights
            if not args.smoke:
                torch.cuda.empty_cache()
    if not args.no_dense:
        for n, k in DENSE_NK:
            for m in tokens:
                tune = args.tune and time.time() - t_start < args.budget_s
                guarded(lambda: dense_case(n, k, m, timer, ceil, tune, tuned_dense, args.smoke, device),
                        f"dense {n}x{k} M={m}")
    meta["wall_s"] = time.time() - t_start
    lines = write_report(args.out, meta, rows, tuned_moe, tuned_dense)
    print(f"\nceilings: copy {ceil['copy_GBps']:.0f} GB/s, bf16 {ceil['bf16_TFLOPs']:.0f} TFLOP/s, "
          f"fp8 {ceil['fp8_TFLOPs']:.0f} TFLOP/s; {meta['device']}; {meta['wall_s']:.0f} s")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
