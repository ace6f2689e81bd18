"""Probe (GPU only): the dense FP8 GEMM with one weight scale a tile (moe_config.DENSE_FP8_SCALE_PER_TILE)
against a scale a column, the code before.

Nsight Compute found the dense FP8 GEMM at 64 rows issue-bound, and of its ~255 instructions a warp a K step
16 were loads of a weight scale a column the thread holds, all of them the same value (BLOCK_N divides the
128-column scale block), and the promotion multiplied each accumulator element twice. One scalar load a tile
and the activation scales multiplied by it first take the compiled sm_90 loop from 203 to 144 instructions
(q/kv_a at 64 rows). This times both forms at V2-Lite's decode shapes, q/kv_a (N 3648) and o_proj (N 2048),
K 2048 (--models V3: also V3's q_a + kv_a, q_b and o_proj), at 1, 8, 64 and 128 rows with the tuned tiles,
activations quantized beforehand (as the engine's norm hands them over), from CUDA-graph replays over
rotating inputs (kernel_bench_moe's Timer), each against the plain-torch reference. (The same form in the
fused MoE, timed by versions of this probe that ran the whole V2-Lite MoE layer too: in both GEMMs 150.3 ->
156.2 us at 64 tokens, in the down GEMM alone 154.1 -> 157.7, so the MoE keeps a scale a column;
docs/perf/kernels_moe.md.)

    PYTHONUNBUFFERED=1 python benchmarks/probe_fp8_scale_per_tile.py [--models V2-Lite,V3] --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from kernel_bench_moe import BLOCK, Timer, rel_err  # noqa: E402

from moeserve.kernels import moe_config  # noqa: E402
from moeserve.kernels.fp8 import (block_fp8_matmul_ref, block_fp8_matmul_triton,  # noqa: E402
                                  per_token_group_quant_fp8_triton, quant_block_fp8_ref)

SHAPES = {"V2-Lite": {"q_kv_a": (3648, 2048), "o_proj": (2048, 2048)},
          "V3": {"q_a+kv_a": (2112, 7168), "q_b": (24576, 1536), "o_proj": (7168, 16384)}}
N_INPUTS = 4
TIMER = Timer(False)


def both_forms(fn) -> tuple[dict, torch.Tensor]:
    """fn(i) timed with a scale a column and with one a tile: us of each, their outputs' distance; and fn(0)'s
    output with one a tile."""
    row, outs = {}, {}
    for form, on in (("columns", False), ("tile", True)):
        moe_config.DENSE_FP8_SCALE_PER_TILE = on
        row[f"us_{form}"] = round(TIMER(fn, N_INPUTS), 2)
        outs[form] = fn(0)
    moe_config.DENSE_FP8_SCALE_PER_TILE = True
    row["tile_vs_columns"] = rel_err(outs["tile"], outs["columns"])
    row["tile_over_columns"] = round(row["us_tile"] / row["us_columns"], 3)
    return row, outs["tile"]


def dense_rows(dev, models: list[str]) -> list:
    rows = []
    for name, (n, k) in ((f"{model} {name}", nk) for model in models for name, nk in SHAPES[model].items()):
        w, ws = quant_block_fp8_ref((torch.randn(n, k, device=dev) * k ** -0.5).to(torch.bfloat16), BLOCK)
        for m in (1, 8, 64, 128):
            xs = [torch.randn(m, k, device=dev, dtype=torch.bfloat16) for _ in range(N_INPUTS)]
            xq = [per_token_group_quant_fp8_triton(x, BLOCK[1]) for x in xs]
            row, out = both_forms(lambda i: block_fp8_matmul_triton(xs[i], w, ws, BLOCK, x_fp8=xq[i]))
            ref = block_fp8_matmul_ref(xs[0], w, ws, BLOCK, xq[0])
            row.update(name=name, rows=m, err_vs_ref=rel_err(out, ref))
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--models", default="V2-Lite", help="of " + ",".join(SHAPES))
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    rows = dense_rows(dev, args.models.split(","))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "probe_fp8_scale_per_tile.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    print("| GEMM | rows | columns us | tile us | tile / columns | tile vs columns | vs ref |")
    for r in rows:
        print(f"| {r['name']} | {r['rows']} | {r['us_columns']} | {r['us_tile']} | "
              f"{r['tile_over_columns']} | {r['tile_vs_columns']:.1e} | {r['err_vs_ref']:.1e} |")


if __name__ == "__main__":
    main()
