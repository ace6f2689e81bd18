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
  no_moe_sum         the MoE's final weighted-sum launch removed
  no_mla             the MLA decode (split kernel and merge) removed
  no_norm_quant      the norms stop quantizing for the FP8 GEMMs after them (each GEMM quantizes again)
  act_quant_in_gate_up[_stN]  moe_config.ACT_QUANT_IN_GATE_UP on (optionally gate_up at N stages)
  mla_stN            the MLA decode's default tiles at N stages
Results (H200, 2026-12-01): docs/perf/engine_v2lite.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def apply(variant: str) -> None:
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
    known = ("base", "no_moe_quant", "no_dense_quant", "no_quant", "no_moe_sum", "no_mla", "no_norm_quant")
    if variant not in known and not variant.startswith(("act_quant_in_gate_up", "mla_st")):
        raise SystemExit(f"unknown variant {variant!r}")


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
                                      gpu_memory_utilization=0.88, warmup_prefill=False)
    engine = EngineCore(config)
    build_s = time.perf_counter() - t0
    b64 = [run_batch(engine, 64, 1024, 96, seed=s)["decode_step_ms"] for s in (1, 2)]
    b1 = run_batch(engine, 1, 1024, 128, seed=3)["decode_step_ms"]
    return {"variant": variant, "dtype": dtype, "build_s": round(build_s, 1),
            "b64_step_ms": [round(t, 3) for t in b64], "b1_step_ms": round(b1, 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="base,no_quant,no_moe_sum,no_mla")
    p.add_argument("--dtypes", default="fp8,bf16")
    p.add_argument("--timeout-s", type=float, default=150.0, help="per variant and dtype")
    p.add_argument("--out", help="path prefix: writes PREFIX.json")
    p.add_argument("--one", nargs=2, metavar=("VARIANT", "DTYPE"), help=argparse.SUPPRESS)  # the child's side
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one)), flush=True)
        return 0
    rows = []
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
