"""Probe (GPU only, under Nsight Compute): the kernels of a V2-Lite batch-64 decode step that set the
FP8 / bf16 ratio, each launched once between cudaProfilerStart/Stop, so `ncu --profile-from-start off`
reads their hardware counters (DRAM bytes and throughput, occupancy and what limits it, warp stall
reasons) with FP8 and bf16 side by side:

  - one fused MoE layer (64 routed experts top-6 + 2 fused shared slots, 64 tokens): FP8 in the
    engine's tiled layout, and bf16; each is moe_align, gate_up, down and the sum;
  - the dense projections at 64 rows: q/kv_a (N 3648) with its input already quantized (the norm does
    it in the engine) and o_proj (N 2048, its quant launch first) in FP8, and both through cuBLAS bf16;
  - with --kernels mla instead: one layer's MLA decode at batch 64 (split kernel and merge), pages of
    --page-size tokens.

    ncu --clock-control none --profile-from-start off --set full -o $OUT/probe python benchmarks/ncu_probe.py
    ncu --import $OUT/probe.ncu-rep --csv --page details > $OUT/probe.csv

`python benchmarks/ncu_probe.py --summary probe.csv` then prints one line a kernel from that CSV.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

TOKENS = 64
BLOCK = (128, 128)
DENSE = {"q_kv_a": (3648, 2048), "o_proj": (2048, 2048)}

# ncu metric name -> column of the summary (the details page names them by section; these are
# the names `--page details --csv` prints under "Metric Name")
SUMMARY = [("Duration", "us"), ("DRAM Throughput", "dram%"), ("Memory Throughput", "mem GB/s"),
           ("Registers Per Thread", "regs"), ("Dynamic Shared Memory Per Block", "smem"),
           ("Achieved Occupancy", "occ%"), ("Theoretical Occupancy", "theo%"),
           ("Block Limit Registers", "lim_reg"), ("Block Limit Shared Mem", "lim_smem"),
           ("Grid Size", "grid"), ("Waves Per SM", "waves"), ("Issued Warp Per Scheduler", "issue"),
           ("Warp Cycles Per Issued Instruction", "cyc/inst")]


def mla_steps(page_size: int) -> list:
    """MLA decode of one V2-Lite layer at batch 64, 1,088 cached tokens a sequence (bf16 cache, pages of
    page_size tokens): the split kernel and the merge, as the engine's batch-64 steps run them."""
    from kernel_bench_attention import mla_case

    _, run, _, _, _ = mla_case("V2-Lite", 16, TOKENS, 1088, torch.bfloat16, torch.bfloat16, page_size,
                               torch.device("cuda"))
    return [(f"mla decode b64 x 1088, pages of {page_size}", lambda: run(0))]


def run_kernels(which: str, page_size: int) -> None:
    if which == "mla":
        return profile(mla_steps(page_size))
    from kernel_bench_moe import make_experts, routing

    from moeserve.kernels import moe_config
    from moeserve.kernels.fp8 import block_fp8_matmul_triton, per_token_group_quant_fp8_triton, quant_block_fp8_ref
    from moeserve.kernels.fused_moe import fused_moe_triton, tile_weights

    torch.manual_seed(0)
    dev = torch.device("cuda")
    e, h, i, k, shared = 66, 2048, 1408, 8, 2
    x = torch.randn(TOKENS, h, device=dev, dtype=torch.bfloat16)
    rw, ids = routing(TOKENS, e, 64, k, dev, shared)
    tile_n = moe_config.FP8_WEIGHT_TILE_ROWS
    w13, w2, s13, s2 = make_experts(e, h, i, True, dev, False)
    t13, t2 = tile_weights(w13, tile_n, BLOCK[1]), tile_weights(w2, tile_n, BLOCK[1])
    del w13, w2
    b13, b2, _, _ = make_experts(e, h, i, False, dev, False)
    dense = {}
    for name, (n, kk) in DENSE.items():
        w = (torch.randn(n, kk, device=dev) * kk ** -0.5).to(torch.bfloat16)
        dense[name] = (w, *quant_block_fp8_ref(w, BLOCK))
    xq = per_token_group_quant_fp8_triton(x, BLOCK[1])

    steps = [
        ("moe fp8 (tiled)", lambda: fused_moe_triton(x, t13, t2, rw, ids, s13, s2, BLOCK, True,
                                                      num_fused_shared=shared, w_tile_n=tile_n)),
        ("moe bf16", lambda: fused_moe_triton(x, b13, b2, rw, ids, None, None, BLOCK, False,
                                              num_fused_shared=shared)),
        ("q_kv_a fp8", lambda: block_fp8_matmul_triton(x, dense["q_kv_a"][1], dense["q_kv_a"][2], BLOCK,
                                                       x_fp8=xq)),
        ("o_proj fp8 (+ quant)", lambda: block_fp8_matmul_triton(x, dense["o_proj"][1], dense["o_proj"][2], BLOCK)),
        ("q_kv_a bf16", lambda: torch.nn.functional.linear(x, dense["q_kv_a"][0])),
        ("o_proj bf16", lambda: torch.nn.functional.linear(x, dense["o_proj"][0])),
    ]
    profile(steps)


def profile(steps: list) -> None:
    for _ in range(3):  # compile and warm up outside the profiled range
        for _, fn in steps:
            fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    for name, fn in steps:
        print(f"launching: {name}", flush=True)
        fn()
        torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def summarize(path: str) -> None:
    rows: dict[tuple[str, str], dict[str, str]] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            key = (r["ID"], r["Kernel Name"])
            rows.setdefault(key, {})[r["Metric Name"]] = f'{r["Metric Value"]} {r.get("Metric Unit", "")}'.strip()
    print("| id | kernel | " + " | ".join(col for _, col in SUMMARY) + " |")
    for (kid, name), m in rows.items():
        print(f"| {kid} | {name[:40]} | " + " | ".join(m.get(metric, "-") for metric, _ in SUMMARY) + " |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--summary", help="print a line a kernel from an `ncu --csv --page details` file")
    ap.add_argument("--kernels", default="moe_dense", choices=["moe_dense", "mla"],
                    help="the MoE and dense GEMMs (FP8 and bf16), or the MLA decode")
    ap.add_argument("--page-size", type=int, default=64, help="--kernels mla: the KV cache's page size")
    args = ap.parse_args()
    if args.summary:
        summarize(args.summary)
    else:
        run_kernels(args.kernels, args.page_size)
