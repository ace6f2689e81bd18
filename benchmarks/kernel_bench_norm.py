"""RMSNorm, fused residual-add + RMSNorm and rotary (q and k in one launch) on one GPU: check each
Triton kernel against its torch reference in bf16 and time both against the memory roofline
measured in the same run.

    PYTHONUNBUFFERED=1 python benchmarks/kernel_bench_norm.py --out $OUT

Roofline of a case = bytes / copy bandwidth, with bytes = what the kernel must read and write
(rmsnorm: x + out + weight; fused: x, residual, out, residual' + weight; rotary: the rope part of
q and k, read and written, + positions and their cos/sin rows) and the copy bandwidth of a large
device-to-device copy (read + write counted) measured in this run. Times are medians of CUDA-graph
replays (decode runs in graphs) cycling over several input sets, so that large cases do not hit
in L2; at small T every kernel is launch-latency bound and the ratio says how far from the
roofline that leaves it. Error vs the reference must be < 1e-2 (relative Frobenius norm).
--smoke runs tiny shapes on CPU under TRITON_INTERPRET=1 in fp32 to check the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
if "--smoke" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

from kernel_bench_attention import copy_bandwidth, git_commit, rel_err, time_us  # noqa: E402

from moeserve.kernels.rmsnorm import (fused_add_rmsnorm_ref, fused_add_rmsnorm_triton, rmsnorm_ref,  # noqa: E402
                                      rmsnorm_triton)
from moeserve.kernels.rotary import apply_rotary_ref, rotary_qk_triton  # noqa: E402

# name: hidden, q heads, k heads, nope dim (rope part of q is q[..., nope:]), rope dim, interleaved,
# per-head q/k norm (Qwen3)
MODELS = {
    "V2-Lite": dict(hidden=2048, q_heads=16, k_heads=1, nope=128, rope=64, interleaved=True, head_norm=False),
    "V3": dict(hidden=7168, q_heads=128, k_heads=1, nope=128, rope=64, interleaved=True, head_norm=False),
    "Qwen3-30B-A3B": dict(hidden=2048, q_heads=32, k_heads=4, nope=0, rope=128, interleaved=False, head_norm=True),
}
TOKENS = [1, 64, 256, 4096]
SET_BYTES = 256 << 20  # input sets per case: enough to cycle through well past L2
MAX_ERR = 1e-2
EPS = 1e-6


def input_sets(nbytes_per_set: int, make, device: torch.device) -> list:
    n = 1 if device.type == "cpu" else max(2, min(8, SET_BYTES // max(nbytes_per_set, 1)))
    return [make() for _ in range(n)]


def norm_case(cfg, t, fused, heads, dtype, device):
    """rmsnorm over [t, hidden], or the per-head q norm over [t, q_heads, head_dim] when heads."""
    shape = (t, cfg["q_heads"], cfg["rope"]) if heads else (t, cfg["hidden"])
    n = shape[-1]
    elem = torch.tensor([], dtype=dtype).element_size()
    numel = t * (cfg["q_heads"] * n if heads else n)
    nbytes = (4 if fused else 2) * numel * elem + n * elem
    weight = (1 + 0.1 * torch.randn(n, device=device)).to(dtype)
    sets = input_sets(nbytes, lambda: [torch.randn(shape, device=device).to(dtype) for _ in range(1 + fused)], device)
    if fused:
        def run(i):
            return fused_add_rmsnorm_triton(*sets[i % len(sets)], weight, EPS)

        def ref(i):
            return fused_add_rmsnorm_ref(*sets[i % len(sets)], weight, EPS)
    else:
        def run(i):
            return rmsnorm_triton(sets[i % len(sets)][0], weight, EPS)

        def ref(i):
            return rmsnorm_ref(sets[i % len(sets)][0], weight, EPS)
    kernel = "fused_add_rmsnorm" if fused else "rmsnorm"
    return dict(kernel=kernel, shape="x".join(map(str, shape[1:]))), run, ref, len(sets), nbytes


def rotary_case(cfg, t, dtype, device):
    hq, hk, nope, rope = cfg["q_heads"], cfg["k_heads"], cfg["nope"], cfg["rope"]
    elem = torch.tensor([], dtype=dtype).element_size()
    nbytes = 2 * t * (hq + hk) * rope * elem + t * (8 + rope * 4)  # q, k in and out; positions, cos/sin rows
    cache = torch.randn(8192, rope, device=device)  # fp32, as RotaryEmbedding keeps it
    interleaved = cfg["interleaved"]

    def make():
        q = torch.randn(t, hq, nope + rope, device=device).to(dtype)[..., nope:]  # as the models pass it
        k = torch.randn(t, hk, rope, device=device).to(dtype)
        return q, k, torch.randint(0, cache.shape[0], (t,), device=device)

    sets = input_sets(nbytes, make, device)

    def run(i):
        q, k, pos = sets[i % len(sets)]
        return rotary_qk_triton(q, k, pos, cache, interleaved)

    def ref(i):
        q, k, pos = sets[i % len(sets)]
        return apply_rotary_ref(q, pos, cache, interleaved), apply_rotary_ref(k, pos, cache, interleaved)

    row = dict(kernel="rotary_qk", shape=f"q{hq}+k{hk}x{rope}" + (" il" if interleaved else ""))
    return row, run, ref, len(sets), nbytes


def measure(row, run, ref, n_sets, nbytes, bw, smoke):
    out, expect = run(0), ref(0)
    if isinstance(out, torch.Tensor):
        out, expect = (out,), (expect,)
    row["err_vs_ref"] = max(rel_err(o, r) if torch.isfinite(o).all() else float("inf") for o, r in zip(out, expect))
    row["ok"] = row["err_vs_ref"] < MAX_ERR
    row["t_us"] = time_us(run, n_sets, smoke)
    row["t_ref_us"] = time_us(ref, n_sets, smoke)
    row["roof_us"] = nbytes / bw * 1e6
    row["bytes"] = nbytes
    row["ratio"] = row["t_us"] / row["roof_us"]
    row["speedup_vs_ref"] = row["t_ref_us"] / row["t_us"]
    return row


def fmt_row(r) -> str:
    return (f"| {r['kernel']} | {r['model']} | {r['shape']} | {r['T']} | {r['t_us']:.2f} | {r['t_ref_us']:.2f} | "
            f"{r['speedup_vs_ref']:.1f} | {r['roof_us']:.2f} | {r['ratio']:.2f} | {r['err_vs_ref']:.1e} |")


def write_report(out, meta, rows):
    path = out if out.endswith(".json") else os.path.join(out, "kernels_norm.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({**meta, "cases": rows}, f, indent=1)
    lines = ["| kernel | model | row shape | T | triton us | torch ref us | speedup | roofline us | ratio | rel err |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [fmt_row(r) for r in rows if "error" not in r]
    with open(path[:-len(".json")] + "_table.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="a .json file or a directory")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the interpreter, fp32")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    args = ap.parse_args()
    t_start = time.time()
    if args.smoke:
        MODELS.update({"V2-Lite": dict(MODELS["V2-Lite"], hidden=96, q_heads=4, nope=16, rope=16),
                       "V3": dict(MODELS["V3"], hidden=200, q_heads=20, nope=8, rope=32),
                       "Qwen3-30B-A3B": dict(MODELS["Qwen3-30B-A3B"], hidden=64, q_heads=4, k_heads=2, rope=32)})
        args.tokens = "1,3"
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    bw = copy_bandwidth(args.smoke)
    import triton
    meta = {"device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(), "command": " ".join(sys.argv), "torch": torch.__version__,
            "triton": triton.__version__, "copy_bandwidth_GBps": bw / 1e9, "dtype": str(dtype)}
    print(json.dumps(meta))
    rows = []
    for model in args.models.split(","):
        cfg = MODELS[model]
        for t in map(int, args.tokens.split(",")):
            torch.manual_seed(t)
            cases = [lambda: norm_case(cfg, t, False, False, dtype, device),
                     lambda: norm_case(cfg, t, True, False, dtype, device),
                     lambda: rotary_case(cfg, t, dtype, device)]
            if cfg["head_norm"]:
                cases.append(lambda: norm_case(cfg, t, False, True, dtype, device))
            for make in cases:
                row, run, ref, n_sets, nbytes = make()
                row.update(model=model, T=t)
                try:
                    measure(row, run, ref, n_sets, nbytes, bw, args.smoke)
                except Exception as e:  # noqa: BLE001 - record and go on with the other cases
                    row.update(error=f"{type(e).__name__}: {str(e)[:300]}", ok=False)
                rows.append(row)
                print(fmt_row(row) if "error" not in row else json.dumps(row))
                write_report(args.out, meta, rows)
                del run, ref
            if not args.smoke:
                torch.cuda.empty_cache()
    lines = write_report(args.out, meta, rows)
    bad = [f"{r['kernel']} {r['model']} {r['shape']} T={r['T']}" for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)}/{len(rows)} cases within {MAX_ERR} of the reference; "
          f"{time.time() - t_start:.0f} s" + (f"; FAILED: {bad}" if bad else ""))
    print("\n".join(lines))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
