"""Probe (GPU only): cuBLASLt's DeepSeek-style blockwise FP8 GEMM (torch._scaled_mm with 1x128 activation
and 128x128 weight scales, CUDA 12.9+) against moeserve's split-K Triton FP8 GEMM and a bf16 torch.mm, at
the decode shapes of V2-Lite and V3, M = 1, 8, 64. Each timing includes the activation quant launch.

    PYTHONUNBUFFERED=1 python benchmarks/probe_fp8_cublas.py   # writes $OUT/probe_fp8_cublas.json

Result (H200, 2026-12-01, docs/perf/kernels_moe.md): cuBLAS rejects M = 1 and K not a multiple of 128,
and is 1.1-2.0x slower than the Triton kernel at M = 8 and 64 except on lm_head: not adopted."""

from __future__ import annotations

import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from kernel_bench_attention import rel_err, time_us  # noqa: E402

from moeserve.kernels.fp8 import (block_fp8_matmul_ref, block_fp8_matmul_triton,  # noqa: E402
                                  per_token_group_quant_fp8_triton, quant_block_fp8_ref)

SHAPES = {"q_kv_a": (3648, 2048), "o_proj": (2048, 2048), "dense_gate_up": (21888, 2048), "dense_down": (2048, 10944),
          "lm_head": (102400, 2048), "v3_q_b": (24576, 1536), "v3_o": (7168, 16384), "v3_qkv_a": (2112, 7168)}


def main():
    torch.manual_seed(0)
    dev = "cuda"
    print(torch.__version__, torch.version.cuda)
    rows = []
    for name, (n, k) in SHAPES.items():
        w = (torch.randn(n, k, device=dev) * k ** -0.5).to(torch.bfloat16)
        wq, ws = quant_block_fp8_ref(w)
        nb, kb = ws.shape
        l4 = -(-kb // 4) * 4  # cuBLAS wants the weight scales' K blocks padded to a multiple of 4
        ws_pad = torch.zeros(nb, l4, device=dev, dtype=torch.float32)
        ws_pad[:, :kb] = ws
        sb = ws_pad.t()  # [L4, N/128], stride [1, L4]
        for m in (1, 8, 64):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = block_fp8_matmul_ref(x, wq, ws)

            def cublas():
                a, a_s = per_token_group_quant_fp8_triton(x, 128)
                sa = a_s.t().contiguous().t()  # [M, K/128], stride [1, M]
                return torch._scaled_mm(a, wq.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)

            row = dict(name=name, n=n, k=k, m=m)
            try:
                row["err_cublas"] = rel_err(cublas(), ref)
                row["t_cublas"] = time_us(lambda i: cublas(), 1, False)
            except Exception as e:  # noqa: BLE001 - what cuBLAS refuses is the result
                row["cublas_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            row["err_ours"] = rel_err(block_fp8_matmul_triton(x, wq, ws), ref)
            row["t_ours"] = time_us(lambda i: block_fp8_matmul_triton(x, wq, ws), 1, False)
            row["t_bf16"] = time_us(lambda i: torch.mm(x, w.t()), 1, False)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("| shape | M | ours us | cublas fp8 us | bf16 mm us | cublas/ours | err ours | err cublas |")
    for r in rows:
        t_cublas = r.get("t_cublas", float("nan"))
        print(f"| {r['name']} {r['n']}x{r['k']} | {r['m']} | {r['t_ours']:.2f} | {t_cublas:.2f} | {r['t_bf16']:.2f} | "
              f"{t_cublas / r['t_ours']:.2f} | {r['err_ours']:.1e} | {r.get('err_cublas', float('nan')):.1e} "
              f"{r.get('cublas_error', '')}")
    out = os.environ.get("OUT", "bench_out")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "probe_fp8_cublas.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
