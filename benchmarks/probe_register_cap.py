"""Probe (GPU only): the fused MoE's two GEMMs with a cap on registers a thread (config key "maxnreg").

Nsight Compute (benchmarks/ncu_probe.py, H200) found the FP8 GEMMs' programs limited to 4 (gate_up,
128 registers a thread) and 3 (down, 142) an SM by registers, with shared memory for more; bf16's
by shared memory. Fewer registers a thread let more programs share an SM, so more weight tiles are
in flight; past some cap ptxas spills and the loop slows. This times the V2-Lite fused shape (E=66,
top-8, FP8 in the engine's tiled layout, and bf16) at each cap for gate_up, then for down, then at
the best pair, from CUDA-graph replays over rotating routings (kernel_bench_moe's Timer), with
registers and spills of each compile and the outputs compared with the uncapped run bit for bit.

    PYTHONUNBUFFERED=1 python benchmarks/probe_register_cap.py --tokens 64 --caps 128,112,96,80,72,64 --out $OUT
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

from kernel_bench_moe import BLOCK, Timer, make_experts, routing  # noqa: E402

from moeserve.kernels import fused_moe, moe_config  # noqa: E402

E, H, I, K, SHARED = 66, 2048, 1408, 8, 2
N_INPUTS = 4


def compiled_registers() -> list:
    """Record (registers a thread, spilled bytes) of each _moe_gemm_kernel launch into the returned list."""
    seen = []
    kernel = fused_moe._moe_gemm_kernel
    run = kernel.run

    def recording(*args, **kwargs):
        compiled = run(*args, **kwargs)
        seen.append((compiled.n_regs, compiled.n_spills))
        return compiled
    kernel.run = recording
    return seen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="64")
    ap.add_argument("--caps", default="128,112,96,80,72,64")
    ap.add_argument("--dtypes", default="fp8,bf16")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    timer, seen, rows = Timer(False), compiled_registers(), []
    caps = [int(c) for c in args.caps.split(",")]
    tile_n = moe_config.FP8_WEIGHT_TILE_ROWS
    for dtype in args.dtypes.split(","):
        fp8 = dtype == "fp8"
        w13, w2, s13, s2 = make_experts(E, H, I, fp8, dev, False)
        if fp8:
            w13, w2 = fused_moe.tile_weights(w13, tile_n, BLOCK[1]), fused_moe.tile_weights(w2, tile_n, BLOCK[1])
        for tokens in (int(t) for t in args.tokens.split(",")):
            xs = [torch.randn(tokens, H, device=dev, dtype=torch.bfloat16) for _ in range(N_INPUTS)]
            routes = [routing(tokens, E, 64, K, dev, SHARED) for _ in range(N_INPUTS)]
            table = moe_config.moe_config(tokens, E, H, I, K, "fp8" if fp8 else "bfloat16", dev, SHARED)

            def run_with(cfg):
                return lambda j: fused_moe.fused_moe_triton(xs[j], w13, w2, routes[j][0], routes[j][1], s13, s2,
                                                            BLOCK, fp8, cfg, num_fused_shared=SHARED,
                                                            w_tile_n=tile_n if fp8 else 0)

            def measure(gate_up_cap, down_cap):
                cfg = dict(table, down=dict(table.get("down", {})))
                if gate_up_cap:
                    cfg["maxnreg"] = gate_up_cap
                cfg["down"]["maxnreg"] = down_cap or 0  # 0: none (else down inherits gate_up's cap)
                del seen[:]
                out = run_with(cfg)(0)
                regs = list(seen[-2:])
                row = dict(dtype=dtype, tokens=tokens, gate_up_cap=gate_up_cap, down_cap=down_cap,
                           regs_spills=regs, t_us=timer(run_with(cfg), N_INPUTS),
                           equal=bool(torch.equal(out, base_out)))
                rows.append(row)
                print(f"{dtype} T={tokens} gate_up cap {gate_up_cap} down cap {down_cap}: {row['t_us']:.1f} us, "
                      f"regs/spills {regs}, equal {row['equal']}", flush=True)
                return row["t_us"]

            base_out = run_with(table)(0)
            base = measure(None, None)
            best_gu = min([(base, None)] + [(measure(c, None), c) for c in caps])
            best_dn = min([(base, None)] + [(measure(None, c), c) for c in caps])
            if best_gu[1] and best_dn[1]:
                measure(best_gu[1], best_dn[1])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "probe_register_cap.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
