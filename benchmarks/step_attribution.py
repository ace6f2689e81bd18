"""Where a V2-Lite decode step's time goes, by taking pieces out (GPU only).

Each variant runs in a fresh process: it changes one thing, builds the engine (dummy weights, CUDA
graphs, asynchronous scheduling), serves batch 64 twice and batch 1 once (ISL 1024, OSL 96/128) and
reports the median decode step. Two kinds of variant:
  - a launch removed, for an upper bound of what fusing it away could save; these compute WRONG
    outputs on purpose (a removed quant hands back zeros with unit scales, a removed MLA decode
    returns its query) and only the timing means anything;
  - a switch flipped (a config constant or a kernel tile), where the outputs stay right.

    PYTHONUNBUFFERED=1 python benchmarks/step_attribution.py --variants base,no_mla --dtypes fp8,bf16 --out $OUT/attr

Variants:
  base               the code as it is
  no_moe_quant       the fused MoE's activation quant launches removed (x's, the intermediate's)
  no_dense_quant     the dense FP8 GEMMs' activation quant launches removed (o_proj; q/kv_a's is in the norm)
  no_quant           both of the above
  no_moe_sum         the MoE's final weighted-sum launch removed (and not left to the next norm)
  moe_sum_launch     the MoE's weighted sum a launch of its own, not read by the next norm (fused_moe.ExpertRows)
  no_mla             the MLA decode (split kernel and merge) removed
  no_norm_quant      the norms stop quantizing for the FP8 GEMMs after them (each GEMM quantizes again)
  act_quant_in_gate_up[_stN]  moe_config.ACT_QUANT_IN_GATE_UP on (optionally gate_up at N stages)
  mla_stN            the MLA decode's default tiles at N stages
  mla_resN           MLA decode splits sized for N resident programs an SM (attention_triton.MLA_RESIDENT)
  down_no_wait       the fused MoE's down GEMM starts without waiting for its predecessor (gate_up, or in FP8
                     the intermediate's quant launch), on the grid-wide wait's launches (down_grid_wait): with
                     no_moe_quant, the most one launch for both GEMMs could overlap them
  down_grid_wait     the fused MoE's down GEMM waits for gate_up's whole grid, not per block of rows
                     (moe_config.DOWN_WAITS_PER_BLOCK off)
  act_quant_launch   FP8: the MoE's intermediate quantized by a launch of its own, not by gate_up's last tile of
                     each block (moe_config.ACT_QUANT_BY_LAST_TILE off; the down GEMM then waits for that launch's
                     whole grid too)
  kv_fp8             the engine's KV cache in e4m3 (--kv-cache-dtype fp8)
  pageN              the engine's KV cache in pages of N tokens (--block-size N; default 64 for MLA models)
  mla_tile_in_page0  MLA decode addresses every token's row through its block-table entry even where a tile
                     lies in one page (attention_triton.MLA_TILE_IN_PAGE off)
  fp8_scale_columns  the dense FP8 GEMM loads a weight scale a column and multiplies it in apart, as before
                     moe_config.DENSE_FP8_SCALE_PER_TILE (the fused MoE always does)
  no_dense           the layers' dense GEMMs (q/kv_a, o_proj, layer 0's MLP; not lm_head) launch nothing
  dense_mM_bnN_skS[_stT][_wW]  the dense FP8 GEMMs of 17-128 rows on BLOCK_M M, BLOCK_N N, SPLIT_K S (sum
                     in the GEMM), optionally T stages and W warps
  dense_attn_m...    as dense_m..., only for the attention's q/kv_a and o_proj GEMMs (N and K <= 4096; not layer
                     0's MLP)
  matvec_bN          MLA's per-head projections (kernels/head_matvec.py) in Triton up to batch N (default 16;
                     cuBLAS above)
  moe_stream[_early][_2l][_align][_pN]  the fused MoE at 17-128 tokens replaced by a launch that only
                     reads its expert weights (w13 and w2, all experts, each of N programs an SM (default 4) a
                     contiguous share of both, no compute, no align) after the routing: what a one-launch MoE
                     streaming its bytes perfectly could take a step to (a bound: no real kernel reads a better
                     pattern). _early: the stream starts before the launch's PDL wait (weights read while the
                     routing runs); _2l: w13 and w2 in two launches; _align: the real moe_align launch before
                     it
  moe_tileN          FP8 experts stored in tiles of N rows (moe_config.FP8_WEIGHT_TILE_ROWS; 0: row-major, as
                     loaded)
  moe_gu_..., moe_dn_...  the fused MoE's gate_up (gu) or down (dn) config at 17-128 tokens with keys forced:
                     bnN BLOCK_N, stS num_stages, wW num_warps, rR maxnreg (moe_dn_bn128_st6, moe_gu_r96)
A variant may join several with '+' (no_moe_quant+down_no_wait).
Results (H200, 2026-12-01): docs/perf/engine_v2lite.md.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


ENGINE_KWARGS: dict = {}  # EngineConfig arguments a variant sets (kv_fp8)


def _zero_quant(quant):
    """A stand-in for per_token_group_quant_fp8_triton that launches nothing: zeros and unit scales of the
    right shapes (made once per shape, by the real kernel, outside any graph capture's replays)."""
    made = {}

    def fake(x, group_size=128):
        key = (tuple(x.shape), x.device, group_size)
        if key not in made:
            q, s = quant(x, group_size)
            made[key] = (q.zero_(), s.fill_(1.0))
        return made[key]
    return fake


def _down_without_wait(fused_moe):
    """The down GEMM launched with PDL but compiled to skip griddepcontrol.wait (it still lets its
    successor launch early): it runs beside its predecessor and reads a half-written intermediate."""
    global gdc_launch_dependents, gdc_wait, tl  # a jitted function sees module globals, not closures
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def begin(PDL: tl.constexpr):
        if PDL:
            if PDL != 2:
                gdc_wait()
            gdc_launch_dependents()

    fused_moe.pdl_begin = begin
    launch, pdl_launch = fused_moe._launch_moe_gemm, fused_moe.pdl_launch
    signature = inspect.signature(launch)

    def launch_down_early(*args, **kwargs):
        gate_up = signature.bind(*args, **kwargs).arguments["gate_up"]
        fused_moe.pdl_launch = pdl_launch if gate_up else (lambda device: {"PDL": 2, "launch_pdl": True})
        try:
            return launch(*args, **kwargs)
        finally:
            fused_moe.pdl_launch = pdl_launch
    fused_moe._launch_moe_gemm = launch_down_early


def _stream_moe(fused_moe, variant: str):
    """fused_moe_triton at 17-128 tokens replaced by one streaming launch over w13 and w2 that returns
    zeros (the step computes wrong tokens); other sizes (batch 1, prefill) run the real kernels."""
    global gdc_launch_dependents, gdc_wait, tl  # a jitted function sees module globals, not closures
    import torch
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def stream(w13_ptr, n13, w2_ptr, n2, ids_ptr, sink_ptr, EARLY: tl.constexpr, BLOCK: tl.constexpr):
        # program p reads [p * chunk, (p + 1) * chunk) of w13 then of w2 (int32 words), xor-folds them
        # into sink[p] so nothing is optimized away; the routing's first id joins after the PDL wait
        pid = tl.program_id(0)
        progs = tl.num_programs(0)
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        if not EARLY:
            gdc_wait()
        gdc_launch_dependents()
        chunk13 = tl.cdiv(tl.cdiv(n13, progs), BLOCK) * BLOCK
        for i in range(pid * chunk13, tl.minimum((pid + 1) * chunk13, n13), BLOCK):
            offs = i + tl.arange(0, BLOCK)
            acc ^= tl.load(w13_ptr + offs, mask=offs < n13, other=0)
        chunk2 = tl.cdiv(tl.cdiv(n2, progs), BLOCK) * BLOCK
        for i in range(pid * chunk2, tl.minimum((pid + 1) * chunk2, n2), BLOCK):
            offs = i + tl.arange(0, BLOCK)
            acc ^= tl.load(w2_ptr + offs, mask=offs < n2, other=0)
        if EARLY:
            gdc_wait()
        tl.store(sink_ptr + pid, tl.xor_sum(acc, axis=0) + tl.load(ids_ptr))

    early, two_launches, align = "_early" in variant, "_2l" in variant, "_align" in variant
    per_sm = int(variant.split("_p")[1]) if "_p" in variant else 4
    real = fused_moe.fused_moe_triton
    made = {}

    def streamed(x, w13, w2, topk_weights, topk_ids, *args, sum_rows=True, **kwargs):
        tokens = (x if x is not None else kwargs["x_fp8"][0]).shape[0]
        if not 16 < tokens <= 128:
            return real(x, w13, w2, topk_weights, topk_ids, *args, sum_rows=sum_rows, **kwargs)
        hidden, top_k, device = w2.shape[1], topk_ids.shape[1], w2.device
        dtype = x.dtype if x is not None else kwargs["out_dtype"]
        key = (tokens, top_k, hidden, dtype)
        if key not in made:
            sm = torch.cuda.get_device_properties(device).multi_processor_count
            made[key] = (torch.zeros(tokens * top_k, hidden, dtype=dtype, device=device),
                         torch.zeros(tokens, hidden, dtype=dtype, device=device),
                         torch.zeros(per_sm * sm, dtype=torch.int32, device=device))
        rows, out, sink = made[key]
        if align:
            fused_moe.moe_align_block_size_triton(topk_ids.contiguous(), 16, w13.shape[0])
        words = [w.view(torch.uint8).view(-1).view(torch.int32) for w in (w13, w2)]
        parts = [(words[0], words[1])] if not two_launches else [(words[0], words[0][:0]), (words[1][:0], words[1])]
        for a, b in parts:
            stream[(sink.numel(),)](a, a.numel(), b, b.numel(), topk_ids, sink, EARLY=early, BLOCK=8192,
                                    num_warps=8, launch_pdl=True)
        return out if sum_rows else fused_moe.ExpertRows(rows, topk_ids.contiguous(), kwargs.get("addend"))
    fused_moe.fused_moe_triton = streamed


def _skip_dense(linear_mod):
    """Linear.forward returning a zeros tensor made once per shape (lm_head, vocab-wide, still runs)."""
    import torch
    made = {}
    for cls in (linear_mod.Linear, linear_mod.RowParallelLinear):
        forward = cls.forward

        def skipped(self, x, *args, _forward=forward, **kwargs):
            if self.out_features >= 32000:
                return _forward(self, x, *args, **kwargs)
            shape = (*x.shape[:-1], self.out_features)
            key = (shape, x.dtype, x.device)
            if key not in made:
                made[key] = torch.zeros(shape, dtype=x.dtype, device=x.device)
            return made[key]
        cls.forward = skipped


def _config_keys(spec: str) -> dict:
    """"m64_bn32_sk2_st6_w8_r96" -> BLOCK_M 64, BLOCK_N 32, SPLIT_K 2, num_stages 6, num_warps 8, maxnreg 96."""
    names = {"m": "BLOCK_M", "bn": "BLOCK_N", "sk": "SPLIT_K", "st": "num_stages", "w": "num_warps", "r": "maxnreg"}
    parts = [re.fullmatch(r"([a-z]+)(\d+)", part) for part in spec.split("_")]
    if not all(p and p[1] in names for p in parts):
        raise SystemExit(f"config keys {spec!r}: each part one of {sorted(names)} and a number")
    return {names[p[1]]: int(p[2]) for p in parts}


def apply(variant: str) -> None:
    if "+" in variant:
        for part in variant.split("+"):
            apply(part)
        return
    import moeserve.kernels.attention_triton as attention_triton
    import moeserve.kernels.fp8 as fp8
    import moeserve.kernels.fused_moe as fused_moe
    import moeserve.kernels.moe_config as moe_config
    import moeserve.layers.attention as attention
    from moeserve.layers.norm import RMSNorm

    if variant in ("no_moe_quant", "no_quant"):
        fused_moe.per_token_group_quant_fp8_triton = _zero_quant(fused_moe.per_token_group_quant_fp8_triton)
    if variant in ("no_dense_quant", "no_quant"):
        fp8.per_token_group_quant_fp8_triton = _zero_quant(fp8.per_token_group_quant_fp8_triton)
    if variant == "no_moe_sum":
        fused_moe.moe_sum = lambda y, topk_ids, out, addend=None: out
    if variant in ("moe_sum_launch", "no_moe_sum"):
        import moeserve.layers.moe as moe_layer
        moe_forward = moe_layer.MoE.forward
        moe_layer.MoE.forward = lambda self, x, x_fp8=None, sum_rows=True: moe_forward(self, x, x_fp8)
    if variant == "no_mla":
        attention.mla_decode = lambda q_latent, *args: q_latent
    if variant == "no_norm_quant":
        norm_residual = RMSNorm.norm_residual
        RMSNorm.norm_residual = lambda self, x, residual, fp8_group=0: norm_residual(self, x, residual, 0)
    if variant.startswith("act_quant_in_gate_up"):
        moe_config.ACT_QUANT_IN_GATE_UP = True
        if "_st" in variant:
            stages, tables = int(variant.rsplit("_st", 1)[1]), moe_config.moe_config
            moe_config.moe_config = lambda *a, **k: dict(tables(*a, **k), num_stages=stages)
    if variant.startswith("mla_st"):
        attention_triton.MLA_TILES = attention_triton.MLA_TILES[:3] + (int(variant[len("mla_st"):]),)
    if variant.startswith("mla_res"):
        attention_triton.MLA_RESIDENT = int(variant[len("mla_res"):])
    if variant in ("down_no_wait", "down_grid_wait"):
        moe_config.DOWN_WAITS_PER_BLOCK = False
    if variant in ("down_no_wait", "act_quant_launch"):
        moe_config.ACT_QUANT_BY_LAST_TILE = False
    if variant == "down_no_wait":
        _down_without_wait(fused_moe)
    if variant.startswith(("dense_m", "dense_attn_m")):
        attn_only = variant.startswith("dense_attn_")
        forced_keys = _config_keys(variant[len("dense_attn_" if attn_only else "dense_"):])
        tables = moe_config.dense_fp8_config

        def forced(m, n, k, device):
            cfg = tables(m, n, k, device)
            if 16 < m <= 128 and (not attn_only or max(n, k) <= 4096):
                cfg = dict(cfg, REDUCE_IN_GEMM=True, FUSE_QUANT=False, **forced_keys)
            return cfg
        moe_config.dense_fp8_config = forced
    if variant.startswith(("moe_gu_", "moe_dn_")):
        keys, moe_tables = _config_keys(variant[len("moe_gu_"):]), moe_config.moe_config

        def forced_moe(tokens, *args, **kwargs):
            cfg = moe_tables(tokens, *args, **kwargs)
            if 16 < tokens <= 128 and variant.startswith("moe_gu_"):
                cfg = dict(cfg, **keys)
            elif 16 < tokens <= 128:
                cfg = dict(cfg, down=dict(cfg.get("down", {}), **keys))
            return cfg
        moe_config.moe_config = forced_moe
    if variant.startswith("matvec_b"):
        import moeserve.kernels.head_matvec as head_matvec
        head_matvec.HEAD_MATVEC_MAX_BATCH = int(variant[len("matvec_b"):])
    if variant.startswith("moe_stream"):
        _stream_moe(fused_moe, variant)
    if variant.startswith("moe_tile"):
        moe_config.FP8_WEIGHT_TILE_ROWS = int(variant[len("moe_tile"):])
    if variant == "kv_fp8":
        ENGINE_KWARGS["kv_cache_dtype"] = "fp8"
    if variant.startswith("page"):
        ENGINE_KWARGS["block_size"] = int(variant[len("page"):])
    if variant == "mla_tile_in_page0":
        attention_triton.MLA_TILE_IN_PAGE = False
    if variant == "fp8_scale_columns":
        moe_config.DENSE_FP8_SCALE_PER_TILE = False
    if variant == "no_dense":
        import moeserve.layers.linear as linear
        _skip_dense(linear)
    known = ("base", "no_moe_quant", "no_dense_quant", "no_quant", "no_moe_sum", "no_mla", "no_norm_quant",
             "down_no_wait", "down_grid_wait", "act_quant_launch", "no_dense", "kv_fp8", "moe_sum_launch",
             "mla_tile_in_page0", "fp8_scale_columns")
    families = ("act_quant_in_gate_up", "mla_st", "mla_res", "dense_m", "dense_attn_m", "moe_gu_", "moe_dn_",
                "matvec_b", "moe_stream", "moe_tile", "page")
    if variant not in known and not variant.startswith(families):
        raise SystemExit(f"unknown variant {variant!r}")


def kernel_times(engine, batch: int = 64, steps: int = 5) -> dict:
    """GPU kernels of `steps` decode steps at `batch` (CUDA graphs as served): name -> [launches a step,
    us a step], largest first; the sum of kernel times counts overlapped (PDL) kernels twice."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from engine_bench import start_decoding

    names = start_decoding(engine, batch, 1024, max_tokens=steps + 40)
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    engine.abort_requests(names)
    rows = {}
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", 0) or getattr(ev, "self_cuda_time_total", 0)
        if us > 0:
            rows[ev.key[:80]] = [round(ev.count / steps, 2), round(us / steps, 1)]
    return dict(sorted(rows.items(), key=lambda kv: -kv[1][1]))


def run_one(variant: str, dtype: str) -> dict:
    """In this process: apply the variant, build the engine, time the decode steps."""
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    apply(variant)
    from engine_bench import run_batch, write_config

    from moeserve.config import EngineConfig
    from moeserve.engine.core import EngineCore

    t0 = time.perf_counter()
    config = EngineConfig.from_kwargs(write_config("v2-lite", dtype == "fp8"), dtype="bfloat16", device="cuda",
                                      load_format="dummy", max_num_seqs=64, max_num_batched_tokens=16384,
                                      max_model_len=1024 + 192, enable_prefix_caching=False,
                                      gpu_memory_utilization=0.88, warmup_prefill=False, **ENGINE_KWARGS)
    engine = EngineCore(config)
    build_s = time.perf_counter() - t0
    runs = [run_batch(engine, 64, 1024, 96, seed=s) for s in (1, 2)] + [run_batch(engine, 1, 1024, 128, seed=3)]
    # the greedy tokens' checksum: variants that only switch a layout or a launch order must match base's
    tokens_crc = zlib.crc32(json.dumps([r["tokens"] for r in runs]).encode())
    row = {"variant": variant, "dtype": dtype, "build_s": round(build_s, 1),
           "b64_step_ms": [round(r["decode_step_ms"], 3) for r in runs[:2]],
           "b1_step_ms": round(runs[2]["decode_step_ms"], 3), "tokens_crc": tokens_crc}
    if os.environ.get("STEP_KERNELS"):  # --kernels: where the GPU time of a batch-64 step goes
        row["b64_kernels_us"] = kernel_times(engine)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="base,no_quant,no_moe_sum,no_mla")
    p.add_argument("--dtypes", default="fp8,bf16")
    p.add_argument("--timeout-s", type=float, default=150.0, help="per variant and dtype")
    p.add_argument("--out", help="path prefix: writes PREFIX.json")
    p.add_argument("--kernels", action="store_true", help="also profile batch-64 steps: each kernel's time a step")
    p.add_argument("--one", nargs=2, metavar=("VARIANT", "DTYPE"), help=argparse.SUPPRESS)  # the child's side
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one)), flush=True)
        return 0
    rows = []
    if args.kernels:
        os.environ["STEP_KERNELS"] = "1"  # read by the children
    for variant in args.variants.split(","):
        for dtype in args.dtypes.split(","):
            try:
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", variant, dtype],
                                      capture_output=True, text=True, timeout=args.timeout_s)
                last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
                row = json.loads(last) if proc.returncode == 0 else {
                    "variant": variant, "dtype": dtype, "error": proc.stderr[-500:]}
            except subprocess.TimeoutExpired:
                row = {"variant": variant, "dtype": dtype, "error": f"timed out after {args.timeout_s} s"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        import torch

        report = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                  "command": " ".join(sys.argv), "rows": rows}
        with open(args.out + ".json", "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
