"""Attention kernels on one GPU: paged decode (split-KV Triton: MLA absorbed, GQA) and varlen prefill
(one Triton launch for all sequences: GQA over the paged cache, MLA's expanded form over packed
K/V). Check each against its torch reference, optionally tune its block sizes (--tune), and time it
against the roofline measured in the same run.

    PYTHONUNBUFFERED=1 python benchmarks/kernel_bench_attention.py --out $OUT [--tune] [--kernels prefill]

Roofline of a case = bytes / copy bandwidth, with bytes = the KV cache rows the batch reads
(every sequence's seq_len tokens; MLA: L + R per token, GQA: K and V of every KV head) + q read +
output written, and the copy bandwidth of a large device-to-device copy (read + write counted)
measured in this run. Times are medians of CUDA-graph replays (decode runs in graphs); every
replay reads a different set of pages of a large shuffled page pool so repeats do not hit in L2.
Variants: bf16 cache and float8_e4m3fn cache (q bf16 in both); error vs the reference must be
< 1e-2 (relative Frobenius norm). --smoke runs tiny shapes on CPU under TRITON_INTERPRET=1
(fp16 q: bf16 is wrong in the interpreter) to check the script itself.

Prefill rows (`batch` sequences of `seq` = prefix + new tokens; the new tokens are the queries):
Qwen3-MoE GQA (32 q / 4 KV heads, dim 128) reading the paged cache (page size as for decode), and
V2-Lite/V3 MLA expanded (16/128 heads, qk 192 = 128 + 64, v 128) reading packed K/V, v a strided
view beside k_nope as kv_b_proj leaves it. Roofline = max(FLOPs / bf16 matmul rate, bytes / copy
bandwidth), both measured in this run (matmul: one 8192^3 bf16 torch.matmul), with FLOPs = the
causal (query, key) pairs x heads x 2 (qk + v dims) and bytes = q + K/V + output. Times are eager
(prefill runs outside CUDA graphs): medians of back-to-back calls timed with events, so host-side
work counts wherever the GPU waits for it. The Triton call gets one memo per input set, as a step's
layers share one (its launch table is built once per step). `sdpa us` is the former GPU path:
per-sequence gathers from the cache (GQA) and one SDPA call per sequence. The reference check
runs in fp32 on the first heads only (whole KV groups) where all heads' scores would not fit in
~2 GB.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
if "--smoke" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

from moeserve.kernels.attention import (mla_decode_ref, paged_decode_ref, varlen_attention_ref,  # noqa: E402
                                        varlen_attention_sdpa)
from moeserve.kernels.attention_triton import (mla_decode_triton, paged_decode_triton,  # noqa: E402
                                               paged_prefill_triton, varlen_attention_triton)
from moeserve.layers.attention import gather_sequence  # noqa: E402

MLA_MODELS = {"V2-Lite": 16, "V3": 128}  # query heads; latent 512 + rope 64 in both
GQA_MODELS = {"Qwen3-MoE": (32, 4, 128)}  # (query heads, KV heads, head dim)
LATENT, ROPE = 512, 64
BATCHES = [1, 32, 64, 128]
SEQS = [1024, 2048, 4096]
POOL_BYTES = 1 << 30  # page pool per case: replays rotate over disjoint page sets in it
MAX_ERR = 1e-2

MLA_CANDIDATES = [{},  # the tiles mla_decode_tiles picks for the case first
                  dict(block_h=16, block_n=32, num_warps=4, num_stages=2),
                  dict(block_h=16, block_n=16, num_warps=4, num_stages=2),
                  dict(block_h=16, block_n=64, num_warps=4, num_stages=2),
                  dict(block_h=16, block_n=32, num_warps=8, num_stages=2),
                  dict(block_h=16, block_n=64, num_warps=8, num_stages=2),
                  dict(block_h=16, block_n=32, num_warps=4, num_stages=3),
                  dict(block_h=16, block_n=32, num_warps=4, num_stages=1),
                  dict(block_h=32, block_n=32, num_warps=8, num_stages=2),
                  dict(block_h=32, block_n=16, num_warps=4, num_stages=2),
                  dict(block_h=64, block_n=16, num_warps=8, num_stages=2),
                  dict(block_h=64, block_n=64, num_warps=8, num_stages=2)]
GQA_CANDIDATES = [dict(block_n=64, num_warps=4, num_stages=2),  # the default first
                  dict(block_n=32, num_warps=4, num_stages=2),
                  dict(block_n=128, num_warps=4, num_stages=2),
                  dict(block_n=64, num_warps=8, num_stages=2),
                  dict(block_n=128, num_warps=8, num_stages=2),
                  dict(block_n=64, num_warps=4, num_stages=3),
                  dict(block_n=32, num_warps=4, num_stages=3),
                  dict(block_n=128, num_warps=4, num_stages=3),
                  dict(block_n=16, num_warps=4, num_stages=4)]
SPLIT_SCALES = [0.5, 2.0]  # tried on the best block config: fewer / more splits than the default
PREFILL_SHAPES = [(32, 128), (8, 1024), (1, 4096)]  # (sequences, new tokens each)
MLA_QK, MLA_NOPE, MLA_V = 192, 128, 128  # expanded MLA head dims (V2-Lite and V3 alike)
PREFILL_CANDIDATES = [dict(block_m=64, block_n=64, num_warps=4, num_stages=2),  # the default first
                      dict(block_m=128, block_n=64, num_warps=8, num_stages=2),
                      dict(block_m=128, block_n=64, num_warps=4, num_stages=2),
                      dict(block_m=128, block_n=32, num_warps=8, num_stages=3),
                      dict(block_m=64, block_n=64, num_warps=4, num_stages=3),
                      dict(block_m=64, block_n=32, num_warps=4, num_stages=3),
                      dict(block_m=64, block_n=128, num_warps=8, num_stages=2),
                      dict(block_m=128, block_n=128, num_warps=8, num_stages=2),
                      dict(block_m=32, block_n=64, num_warps=4, num_stages=2)]
REF_SCORE_BYTES = 2 << 30  # fp32 scores the reference may hold at once; past it, check fewer heads


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()


# ---- inputs ---------------------------------------------------------------------------------------

class PagedInputs:
    """A shuffled pool of pages and n_sets block tables over disjoint pages of it; the slots past
    seq_len in each sequence's last page hold NaN (the kernel must never load them)."""

    def __init__(self, batch, seq, page_size, row_shape, dtype, device, n_caches=1, max_sets=8):
        blocks_per_seq = -(-seq // page_size)
        pages_per_set = batch * blocks_per_seq
        page_bytes = page_size * math.prod(row_shape) * torch.tensor([], dtype=dtype).element_size() * n_caches
        self.n_sets = max(1, min(max_sets, POOL_BYTES // max(pages_per_set * page_bytes, 1)))
        perm = torch.randperm(pages_per_set * self.n_sets, device=device)
        self.tables = [perm[i * pages_per_set:(i + 1) * pages_per_set].view(batch, blocks_per_seq).to(torch.int32)
                       for i in range(self.n_sets)]
        self.caches = []
        for _ in range(n_caches):
            pool = torch.randn(perm.numel(), page_size, *row_shape, device=device)
            if seq % page_size:
                for table in self.tables:
                    pool[table[:, -1].long(), seq % page_size:] = float("nan")
            self.caches.append(pool.to(dtype))
        self.seq_lens = torch.full((batch,), seq, dtype=torch.int32, device=device)


# ---- measuring ------------------------------------------------------------------------------------

def time_us(fn, n_inputs: int, smoke: bool) -> float:
    """Median time per call of fn(i) (i cycling over the inputs), from CUDA-graph replays."""
    if smoke:
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
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn(0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(iters):
            fn(i % n_inputs)
    graph.replay()
    times = []
    for _ in range(7):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / iters)
    return statistics.median(times)


def copy_bandwidth(smoke: bool) -> float:
    if smoke:
        return 1e9
    from roofline import measure_copy_bandwidth
    return measure_copy_bandwidth("cuda")


def time_eager_us(fn, smoke: bool) -> float:
    """Median time per call of back-to-back eager calls (events around a loop): where the host is
    slower than the GPU, the GPU waits and the host's time is what gets measured."""
    if smoke:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    fn()  # compile, warm
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    iters = max(2, min(100, int(0.02 / max(time.perf_counter() - t0, 1e-6))))
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / iters)
    return statistics.median(times)


def matmul_tflops(smoke: bool) -> float:
    """bf16 matmul rate (FLOP/s) of one large torch.matmul: the compute ceiling for prefill."""
    if smoke:
        return 1e11
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = time_eager_us(lambda: torch.matmul(a, b), smoke)
    return 2 * n ** 3 / (t * 1e-6)


# ---- cases ----------------------------------------------------------------------------------------

def mla_case(model, heads, batch, seq, cache_dtype, q_dtype, page_size, device):
    inp = PagedInputs(batch, seq, page_size, (LATENT + ROPE,), cache_dtype, device)
    qs = [torch.randn(batch, heads, LATENT + ROPE, device=device).to(q_dtype) for _ in range(inp.n_sets)]
    scale = (128 + ROPE) ** -0.5  # DeepSeek's qk_head_dim scale

    def run(i, **cfg):
        return mla_decode_triton(qs[i][..., :LATENT], qs[i][..., LATENT:], inp.caches[0], inp.tables[i],
                                 inp.seq_lens, scale, **cfg)

    ref = mla_decode_ref(qs[0][..., :LATENT], qs[0][..., LATENT:], inp.caches[0], inp.tables[0], inp.seq_lens, scale)
    elem = inp.caches[0].element_size()
    q_bytes = batch * heads * (LATENT + ROPE) * qs[0].element_size() + batch * heads * LATENT * qs[0].element_size()
    kv_bytes = batch * seq * (LATENT + ROPE) * elem
    return dict(model=model, kernel="mla_decode", heads=heads), run, ref, inp.n_sets, kv_bytes + q_bytes


def gqa_case(model, shape, batch, seq, cache_dtype, q_dtype, page_size, device):
    heads, kv_heads, head_dim = shape
    inp = PagedInputs(batch, seq, page_size, (kv_heads, head_dim), cache_dtype, device, n_caches=2)
    qs = [torch.randn(batch, heads, head_dim, device=device).to(q_dtype) for _ in range(inp.n_sets)]
    scale = head_dim ** -0.5

    def run(i, **cfg):
        return paged_decode_triton(qs[i], inp.caches[0], inp.caches[1], inp.tables[i], inp.seq_lens, scale, **cfg)

    ref = paged_decode_ref(qs[0], inp.caches[0], inp.caches[1], inp.tables[0], inp.seq_lens, scale)
    elem = inp.caches[0].element_size()
    q_bytes = 2 * batch * heads * head_dim * qs[0].element_size()
    kv_bytes = 2 * batch * seq * kv_heads * head_dim * elem
    return dict(model=model, kernel="paged_decode", heads=heads), run, ref, inp.n_sets, kv_bytes + q_bytes


def causal_pairs(q_len: int, k_len: int) -> int:
    """(query, key) pairs a sequence attends: query i of q_len (position k_len - q_len + i) sees i + prefix + 1."""
    return q_len * (k_len - q_len) + q_len * (q_len + 1) // 2


def ref_head_count(heads, kv_heads, q_len, k_len):
    """Query heads (whole KV groups) whose fp32 scores fit in REF_SCORE_BYTES."""
    group = heads // kv_heads
    return group * max(1, min(kv_heads, REF_SCORE_BYTES // (group * q_len * k_len * 4)))


def prefill_case(model, n_seq, q_len, prefix, cache_name, cache_dtype, q_dtype, page_size, device):
    """(row, run(memo, **cfg), sdpa(), ref_check(out) -> rel err, flops, bytes)."""
    k_len = prefix + q_len
    gqa = model in GQA_MODELS
    if gqa:
        heads, kv_heads, head_dim = GQA_MODELS[model]
        qk_dim = v_dim = head_dim
    else:
        heads = kv_heads = MLA_MODELS[model]
        qk_dim, v_dim = MLA_QK, MLA_V
    q_lens, k_lens = [q_len] * n_seq, [k_len] * n_seq
    cu_q = [i * q_len for i in range(n_seq + 1)]
    cu_k = [i * k_len for i in range(n_seq + 1)]
    q = torch.randn(n_seq * q_len, heads, qk_dim, device=device).to(q_dtype)
    scale = qk_dim ** -0.5
    k = torch.randn(n_seq * k_len, kv_heads, qk_dim, device=device)
    if gqa:  # the packed K/V scattered into a shuffled page pool; NaN in the slots no sequence uses
        v = torch.randn_like(k)
        blocks = -(-k_len // page_size)
        perm = torch.randperm(n_seq * blocks + 3, device=device)
        tables = perm[:n_seq * blocks].view(n_seq, blocks).to(torch.int32)
        pos = torch.arange(k_len, device=device)
        slots = (tables[:, pos // page_size].long() * page_size + pos % page_size).flatten()
        caches = []
        for x in (k, v):
            pool = torch.full((perm.numel(), page_size, kv_heads, qk_dim), float("nan"), device=device)
            pool.view(-1, kv_heads, qk_dim)[slots] = x
            caches.append(pool.to(cache_dtype))
        k, v = k.to(cache_dtype), v.to(cache_dtype)  # what the reference reads: the cache's values

        def run(memo, **cfg):
            return paged_prefill_triton(q, caches[0], caches[1], tables, q_lens, k_lens, scale, memo, **cfg)

        def sdpa():  # the former layer code: per-sequence gathers, one SDPA call per sequence
            keys = torch.cat([gather_sequence(caches[0], tables[b], k_len) for b in range(n_seq)])
            vals = torch.cat([gather_sequence(caches[1], tables[b], k_len) for b in range(n_seq)])
            return varlen_attention_sdpa(q, keys.to(q_dtype), vals.to(q_dtype), cu_q, cu_k, scale)
    else:  # kv_b_proj's output [T, H, nope + v] split in place, k = [k_nope | k_pe] as the layer builds it
        k = k.to(q_dtype)
        v = torch.randn(n_seq * k_len, heads, MLA_NOPE + v_dim, device=device).to(q_dtype)[..., MLA_NOPE:]

        def run(memo, **cfg):
            return varlen_attention_triton(q, k, v, cu_q, cu_k, scale, memo, **cfg)

        def sdpa():
            return varlen_attention_sdpa(q, k, v, cu_q, cu_k, scale)

    hs = ref_head_count(heads, kv_heads, q_len, k_len)
    cs = hs // (heads // kv_heads)

    def ref_check(out):
        ref = varlen_attention_ref(q[:, :hs], k[:, :cs], v[:, :cs], cu_q, cu_k, scale)
        return rel_err(out[:, :hs], ref) if torch.isfinite(out).all() else float("inf")

    flops = n_seq * causal_pairs(q_len, k_len) * heads * 2 * (qk_dim + v_dim)
    elem = q.element_size()
    kv_bytes = n_seq * k_len * kv_heads * (qk_dim * k.element_size() + v_dim * v.element_size())
    nbytes = q.numel() * elem + kv_bytes + n_seq * q_len * heads * v_dim * elem
    row = dict(model=model, kernel="prefill_paged" if gqa else "prefill_mla_packed", heads=heads, batch=n_seq,
               seq=f"{prefix}+{q_len}", cache=cache_name if gqa else "packed", ref_heads=hs)
    return row, run, sdpa, ref_check, flops, nbytes


def measure_prefill(row, run, sdpa, ref_check, flops, nbytes, bw, tflops, smoke, tune, deadline):
    memo = {}
    row["err_vs_ref"] = ref_check(run(memo))
    row["ok"] = row["err_vs_ref"] < MAX_ERR
    row["t_us"] = time_eager_us(lambda: run(memo), smoke)
    row["t_sdpa_us"] = time_eager_us(sdpa, smoke)
    t_math, t_mem = flops / tflops * 1e6, nbytes / bw * 1e6
    row.update(flops=flops, bytes=nbytes, roof_us=max(t_math, t_mem), bound="math" if t_math >= t_mem else "mem")
    row["ratio"] = row["t_us"] / row["roof_us"]
    if not tune:
        return row
    best_t, best_cfg = row["t_us"], {"default": True}
    for cfg in PREFILL_CANDIDATES[1:]:
        if time.time() > deadline:
            break
        try:
            memo_c = {}
            if ref_check(run(memo_c, **cfg)) >= MAX_ERR:
                print(f"  config {cfg}: wrong result, skipped")
                continue
            t = time_eager_us(lambda: run(memo_c, **cfg), smoke)
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for big tiles
            print(f"  config {cfg}: {type(e).__name__}: {str(e)[:120]}")
            continue
        if t < best_t:
            best_t, best_cfg = t, cfg
    row["t_tuned_us"], row["tuned_config"] = best_t, best_cfg
    row["ratio_tuned"] = best_t / row["roof_us"]
    return row


def default_splits(row, batch, cfg, smoke):
    from moeserve.kernels.attention_triton import MLA_RESIDENT, _sm_count, choose_num_splits, mla_decode_tiles
    sms = _sm_count(torch.device("cpu" if smoke else "cuda"))
    if row["kernel"] == "mla_decode":
        block_h = cfg.get("block_h") or mla_decode_tiles(row["heads"], batch)[0]
        return choose_num_splits(batch, -(-row["heads"] // max(16, min(block_h, row["heads"]))), sms,
                                 resident=MLA_RESIDENT)
    return choose_num_splits(batch, GQA_MODELS[row["model"]][1], sms)


def measure(row, run, ref, n_sets, nbytes, bw, smoke, tune, deadline, batch):
    out = run(0)
    row["err_vs_ref"] = rel_err(out, ref) if torch.isfinite(out).all() else float("inf")
    row["ok"] = row["err_vs_ref"] < MAX_ERR
    row["t_us"] = time_us(lambda i: run(i), n_sets, smoke)
    row["roof_us"] = nbytes / bw * 1e6
    row["bytes"] = nbytes
    row["ratio"] = row["t_us"] / row["roof_us"]
    if not tune or time.time() > deadline:
        return row
    cands = MLA_CANDIDATES if row["kernel"] == "mla_decode" else GQA_CANDIDATES
    best_t, best_cfg = row["t_us"], {"default": True}
    for cfg in cands[1:]:
        if time.time() > deadline:
            break
        if cfg.get("block_h", 16) > max(16, row["heads"]):
            continue
        best_t, best_cfg = try_config(run, cfg, ref, n_sets, smoke, best_t, best_cfg)
    base = {k: v for k, v in best_cfg.items() if k != "default"}
    splits = default_splits(row, batch, base, smoke)
    for s in SPLIT_SCALES:
        n = max(1, int(splits * s))
        if n != splits and time.time() < deadline:
            best_t, best_cfg = try_config(run, {**base, "num_splits": n}, ref, n_sets, smoke, best_t, best_cfg)
    row["t_tuned_us"], row["tuned_config"] = best_t, best_cfg
    row["ratio_tuned"] = best_t / row["roof_us"]
    return row


def try_config(run, cfg, ref, n_sets, smoke, best_t, best_cfg):
    try:
        if rel_err(run(0, **cfg), ref) >= MAX_ERR:
            print(f"  config {cfg}: wrong result, skipped")
            return best_t, best_cfg
        t = time_us(lambda i: run(i, **cfg), n_sets, smoke)
    except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for big tiles
        print(f"  config {cfg}: {type(e).__name__}: {str(e)[:120]}")
        return best_t, best_cfg
    return (t, cfg) if t < best_t else (best_t, best_cfg)


# ---- report ---------------------------------------------------------------------------------------

def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip() or os.environ.get("GIT_COMMIT", "unknown")
    except OSError:
        return os.environ.get("GIT_COMMIT", "unknown")


def fmt_row(r) -> str:
    tuned = f"{r['t_tuned_us']:.1f} ({r['ratio_tuned']:.2f})" if "t_tuned_us" in r else "-"
    sdpa = f"{r['t_sdpa_us']:.1f}" if "t_sdpa_us" in r else "-"
    return (f"| {r['kernel']} | {r['model']} | {r['cache']} | {r['batch']} | {r['seq']} | {r['t_us']:.1f} | "
            f"{r['roof_us']:.1f} | {r['ratio']:.2f} | {tuned} | {r['err_vs_ref']:.1e} | {sdpa} |")


def write_report(out, meta, rows):
    path = out if out.endswith(".json") else os.path.join(out, "kernels_attention.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({**meta, "cases": rows}, f, indent=1)
    lines = ["| kernel | model | cache | batch | seq | time us | roofline us | ratio | tuned us (ratio) | rel err "
             "| sdpa us |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"] + [fmt_row(r) for r in rows]
    with open(path[:-len(".json")] + "_table.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="a .json file or a directory")
    ap.add_argument("--tune", action="store_true", help="also time candidate block sizes / split counts")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the interpreter")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop tuning past this many seconds")
    ap.add_argument("--models", default=",".join(list(MLA_MODELS) + list(GQA_MODELS)))
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--seqs", default=",".join(map(str, SEQS)))
    ap.add_argument("--page-size", type=int, default=64)
    ap.add_argument("--kernels", default="decode,prefill", help="decode, prefill or both")
    args = ap.parse_args()
    t_start = time.time()
    if args.smoke:
        global POOL_BYTES, LATENT, ROPE, PREFILL_SHAPES, MLA_QK, MLA_NOPE, MLA_V
        POOL_BYTES, LATENT, ROPE = 1 << 20, 64, 32
        MLA_MODELS.update({"V2-Lite": 16, "V3": 20})
        GQA_MODELS.update({"Qwen3-MoE": (8, 2, 32)})
        args.batches, args.seqs, args.page_size = "1,3", "33,80", 16
        PREFILL_SHAPES, MLA_QK, MLA_NOPE, MLA_V = [(3, 20), (1, 40)], 48, 32, 32
    if args.smoke:  # one thread, like the test workers it runs beside
        torch.set_num_threads(1)
    device = torch.device("cpu" if args.smoke else "cuda")
    q_dtype = torch.float16 if args.smoke else torch.bfloat16
    kernels = set(args.kernels.split(","))
    bw = copy_bandwidth(args.smoke)
    tflops = matmul_tflops(args.smoke) if "prefill" in kernels else float("nan")
    meta = {"device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(), "command": " ".join(sys.argv), "torch": torch.__version__,
            "copy_bandwidth_GBps": bw / 1e9, "bf16_matmul_TFLOPs": tflops / 1e12, "page_size": args.page_size,
            "q_dtype": str(q_dtype)}
    import triton
    meta["triton"] = triton.__version__
    print(json.dumps(meta))
    rows = []
    deadline = t_start + args.budget_s
    for model in args.models.split(",") if "decode" in kernels else []:
        for batch in map(int, args.batches.split(",")):
            for seq in map(int, args.seqs.split(",")):
                for cache_name, cache_dtype in (("bf16" if not args.smoke else "fp16", q_dtype),
                                                ("fp8", torch.float8_e4m3fn)):
                    torch.manual_seed(batch * 7919 + seq)
                    if model in MLA_MODELS:
                        case = mla_case(model, MLA_MODELS[model], batch, seq, cache_dtype, q_dtype, args.page_size,
                                        device)
                    else:
                        case = gqa_case(model, GQA_MODELS[model], batch, seq, cache_dtype, q_dtype, args.page_size,
                                        device)
                    row, run, ref, n_sets, nbytes = case
                    row.update(batch=batch, seq=seq, cache=cache_name)
                    try:
                        measure(row, run, ref, n_sets, nbytes, bw, args.smoke, args.tune, deadline, batch)
                    except Exception as e:  # noqa: BLE001 - record and go on with the other cases
                        row.update(error=f"{type(e).__name__}: {str(e)[:300]}", ok=False, t_us=float("nan"),
                                   roof_us=nbytes / bw * 1e6, ratio=float("nan"), err_vs_ref=float("nan"))
                    rows.append(row)
                    print(fmt_row(row), json.dumps({k: row[k] for k in ("tuned_config", "error") if k in row}))
                    write_report(args.out, meta, rows)
                    del case, run, ref
                    if not args.smoke:
                        torch.cuda.empty_cache()
    for model in args.models.split(",") if "prefill" in kernels else []:
        for n_seq, q_len in PREFILL_SHAPES:
            for prefix in (0, q_len):  # the second chunk of a chunked prefill: as many tokens cached as new
                caches = [("bf16" if not args.smoke else "fp16", q_dtype)]
                if model in GQA_MODELS:
                    caches.append(("fp8", torch.float8_e4m3fn))
                for cache_name, cache_dtype in caches:
                    torch.manual_seed(n_seq * 7919 + q_len + prefix)
                    row, run, sdpa, ref_check, flops, nbytes = prefill_case(
                        model, n_seq, q_len, prefix, cache_name, cache_dtype, q_dtype, args.page_size, device)
                    try:
                        measure_prefill(row, run, sdpa, ref_check, flops, nbytes, bw, tflops, args.smoke, args.tune,
                                        deadline)
                    except Exception as e:  # noqa: BLE001 - record and go on with the other cases
                        row.update(error=f"{type(e).__name__}: {str(e)[:300]}", ok=False, t_us=float("nan"),
                                   roof_us=float("nan"), ratio=float("nan"), err_vs_ref=float("nan"))
                    rows.append(row)
                    print(fmt_row(row), json.dumps({k: row[k] for k in ("tuned_config", "error") if k in row}))
                    write_report(args.out, meta, rows)
                    del run, sdpa, ref_check
                    if not args.smoke:
                        torch.cuda.empty_cache()
    lines = write_report(args.out, meta, rows)
    bad = [f"{r['kernel']} {r['model']} {r['cache']} B={r['batch']} S={r['seq']}" for r in rows if not r["ok"]]
    print(f"\n{len(rows) - len(bad)}/{len(rows)} cases within {MAX_ERR} of the reference; "
          f"{time.time() - t_start:.0f} s" + (f"; FAILED: {bad}" if bad else ""))
    print(f"ceilings: copy {bw / 1e9:.0f} GB/s" + (f", bf16 matmul {tflops / 1e12:.0f} TFLOP/s" if "prefill" in kernels
                                                   else ""))
    print("\n".join(lines))  # the table last
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
