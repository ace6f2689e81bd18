"""The small-M unquantized GEMM (kernels/gemv.py) against cuBLAS (F.linear) on one GPU, at decode
batch sizes on V2-Lite's and V3's dense projections: check the kernel against its torch reference,
time both against the weight-bytes roofline measured in the same run, optionally tune (--tune).

    PYTHONUNBUFFERED=1 python benchmarks/kernel_bench_dense.py --out $OUT [--tune]

Roofline of a case = bytes / copy bandwidth, with bytes = W (N x K bf16) + x read + y written and the
copy bandwidth of a large device-to-device copy (read + write counted) measured in this run. Times
are medians of CUDA-graph replays (decode runs in graphs) cycling over copies of W (>= 3x L2 in
all), so every call reads W from HBM. Correctness on fresh random inputs, every case: relative error
against gemv_ref < 1e-2 (bf16, with a bias), the same bits on a repeat (the fixed-order reduce), and
the layer's dispatch (gemv.linear) giving the kernel's result. Per model and M the sum over one
decode step's calls (SHAPES' counts) for cuBLAS, the kernel and the roofline.
--tune: BLOCK_N x BLOCK_K x SPLIT_K candidates per case; the best per shape and M go to
dense_gemv_<arch>.json in --out (moe_config.gemv_config reads that file from kernels/configs/).
--smoke: tiny shapes on CPU under TRITON_INTERPRET=1 in fp32, to check the script itself.
--router: instead, the router logits (kernels/router_gemm.py: bf16 x, fp32 W, fp32 out, one launch)
against what it replaces (x cast to fp32, then cuBLAS F.linear) at V2-Lite's and V3's gate shapes,
M = 1..64; writes kernels_router.json. Correctness: relative error < 1e-6 against the cast + GEMM.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
if "--smoke" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

from kernel_bench_attention import copy_bandwidth, git_commit, rel_err, time_us  # noqa: E402

from moeserve.kernels import gemv, moe_config  # noqa: E402
from moeserve.kernels.gemv import gemv_ref, gemv_triton  # noqa: E402

SHAPES = {  # model: [(projection, N, K, calls in one decode step)]
    # 27 layers: the first with a dense MLP, 26 MoE with 2 shared experts; q_proj + kv_a_proj merged
    "V2-Lite": [("q_proj+kv_a", 3648, 2048, 27), ("o_proj", 2048, 2048, 27), ("shared gate_up", 5632, 2048, 26),
                ("shared down", 2048, 2816, 26), ("dense gate_up", 21888, 2048, 1), ("dense down", 2048, 10944, 1),
                ("lm_head", 102400, 2048, 1)],
    # 61 layers: 3 with a dense MLP, 58 MoE with 1 shared expert; q_a_proj + kv_a_proj merged
    "V3": [("q_a+kv_a", 2112, 7168, 61), ("q_b", 24576, 1536, 61), ("o_proj", 7168, 16384, 61),
           ("shared gate_up", 4096, 7168, 58), ("shared down", 7168, 2048, 58), ("dense gate_up", 36864, 7168, 3),
           ("dense down", 7168, 18432, 3), ("lm_head", 129280, 7168, 1)],
}
TOKENS = [1, 2, 4, 8, 16]
ROUTER_SHAPES = {"V2-Lite": (64, 2048, 26), "V3": (256, 7168, 58)}  # experts, hidden, MoE layers
ROUTER_TOKENS = [1, 8, 16, 64]
ROUTER_CANDIDATES = [dict(BLOCK_T=t, BLOCK_E=e, BLOCK_K=k, num_warps=w)  # --router: the default first
                     for t, e, k, w in ((4, 1, 2048, 4), (4, 1, 1024, 4), (4, 1, 2048, 8), (1, 1, 2048, 4),
                                        (16, 1, 512, 4), (8, 2, 512, 4), (16, 2, 256, 4), (2, 4, 1024, 8))]
MAX_ERR = 1e-2
MAX_COPIES = 64


def weight_copies(n: int, k: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """Copies of a random W [n, k] spanning >= 3x L2, so a replay cycling over them reads HBM."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 1
    copies = max(1, min(MAX_COPIES, -(-3 * l2 // (n * k * dtype.itemsize))))
    return [(torch.randn(n, k, device=device) * k ** -0.5).to(dtype) for _ in range(copies)]


def candidates(k: int, smoke: bool) -> list[dict]:
    """BLOCK_N x BLOCK_K x SPLIT_K, each K range >= GEMV_MIN_STEPS steps (split 1 always)."""
    out = []
    for bn in (16, 32) if smoke else (16, 32, 64):
        for bk in (32,) if smoke else (128, 256):
            steps = -(-k // bk)
            for split in (1, 2, 4, 8):
                if split == 1 or split <= steps // moe_config.GEMV_MIN_STEPS:
                    out.append(dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, GROUP_SIZE_M=1, num_warps=4,
                                    num_stages=1 if smoke else 4, SPLIT_K=split))
    return out


def check(x: torch.Tensor, w: torch.Tensor, cfg: dict) -> dict:
    """Fresh inputs: the kernel (with a bias) against the reference, a repeat, the layer's dispatch."""
    bias = torch.randn(w.shape[0], device=w.device).to(w.dtype)
    out = gemv_triton(x, w, bias, cfg)
    row = {"err_vs_ref": rel_err(out, gemv_ref(x, w, bias)),
           "repeat_mismatch": int((gemv_triton(x, w, bias, cfg) != out).sum())}
    if x.is_cuda:  # the path Linear takes with the option on (on CPU it is F.linear)
        row["dispatch_mismatch"] = int((gemv.linear(x, w, bias) != gemv_triton(x, w, bias)).sum())
    row["ok"] = row["err_vs_ref"] < MAX_ERR and row["repeat_mismatch"] == 0 and not row.get("dispatch_mismatch")
    return row


def case(model, name, n, k, m, calls, ws, bw, smoke, tune_until) -> dict:
    device = ws[0].device
    xs = [torch.randn(m, k, device=device).to(ws[0].dtype) for _ in ws]
    cfg = moe_config.gemv_config(m, n, k, device)
    row = {"model": model, "name": name, "N": n, "K": k, "M": m, "calls": calls, "copies": len(ws), "config": cfg}
    row.update(check(xs[0], ws[0], cfg))
    row["t_cublas_us"] = time_us(lambda i: F.linear(xs[i], ws[i]), len(ws), smoke)
    row["t_gemv_us"] = time_us(lambda i: gemv_triton(xs[i], ws[i], None, cfg), len(ws), smoke)
    row["bytes"] = (n * k + m * k + m * n) * ws[0].element_size()
    row["roof_us"] = row["bytes"] / bw * 1e6
    row["bw_frac_cublas"] = row["roof_us"] / row["t_cublas_us"]
    row["bw_frac_gemv"] = row["roof_us"] / row["t_gemv_us"]
    row["gemv_over_cublas"] = row["t_gemv_us"] / row["t_cublas_us"]
    if time.time() < tune_until:
        tune(row, xs, ws, smoke, tune_until)
    return row


def tune(row, xs, ws, smoke, tune_until) -> None:
    best_t, best_cfg = row["t_gemv_us"], row["config"]
    for cfg in candidates(row["K"], smoke):
        if time.time() > tune_until:
            break
        try:
            if not check(xs[0], ws[0], cfg)["ok"]:
                print(f"  config {cfg}: wrong result, skipped")
                continue
            t = time_us(lambda i: gemv_triton(xs[i], ws[i], None, cfg), len(ws), smoke)
        except Exception as e:  # noqa: BLE001 - e.g. out of shared memory for big tiles
            print(f"  config {cfg}: {type(e).__name__}: {str(e)[:120]}")
            continue
        if t < best_t:
            best_t, best_cfg = t, cfg
    row["t_best_us"], row["best_config"] = best_t, best_cfg
    row["bw_frac_best"] = row["roof_us"] / best_t


def fmt_row(r) -> str:
    c = r["config"]
    best = f"{r['t_best_us']:.1f} ({r['bw_frac_best']:.2f})" if "t_best_us" in r else "-"
    return (f"| {r['model']} {r['name']} | {r['N']}x{r['K']} | {r['M']} | {r['t_cublas_us']:.1f} | "
            f"{r['t_gemv_us']:.1f} | {best} | {r['roof_us']:.1f} | {r['bw_frac_cublas']:.2f} | "
            f"{r['bw_frac_gemv']:.2f} | {r['gemv_over_cublas']:.2f} | {c['BLOCK_N']}x{c['BLOCK_K']} s{c['SPLIT_K']} | "
            f"{r['err_vs_ref']:.1e}{'' if r['ok'] else ' FAIL'} |")


def step_lines(rows) -> list[str]:
    """Per model and M: one decode step's calls of these projections, summed."""
    lines = []
    for model, shapes in SHAPES.items():
        for m in sorted({r["M"] for r in rows if r["model"] == model}):
            step = [r for r in rows if r["model"] == model and r["M"] == m]
            tot = {key: sum(r[key] * r["calls"] for r in step) for key in ("t_cublas_us", "t_gemv_us", "roof_us")}
            lines.append(f"{model} decode step at M={m}, {sum(r['calls'] for r in step)} calls of {len(step)}/"
                         f"{len(shapes)} shapes: cuBLAS {tot['t_cublas_us']:.0f} us, gemv {tot['t_gemv_us']:.0f} us, "
                         f"roofline {tot['roof_us']:.0f} us")
    return lines


def write_report(out, meta, rows, tuned):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "kernels_dense.json"), "w") as f:
        json.dump({**meta, "cases": rows}, f, indent=1)
    if tuned:
        with open(os.path.join(out, f"dense_gemv_{meta['arch']}.json"), "w") as f:
            json.dump(tuned, f, indent=1, sort_keys=True)
    done = [r for r in rows if "error" not in r]
    lines = [f"copy bandwidth {meta['copy_bandwidth_GBps']:.0f} GB/s (read + write); {meta['device']}, "
             f"{meta['sms']} SMs", *step_lines(done), "", "| projection | N x K | M | cuBLAS us | gemv us | tuned us (bw frac) | roofline us | cuBLAS bw frac "
             "| gemv bw frac | gemv / cuBLAS | gemv BLOCK_N x BLOCK_K, splits | rel err |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [fmt_row(r) for r in done]
    with open(os.path.join(out, "kernels_dense_table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return lines


def router_rows(bw: float, smoke: bool) -> list[dict]:
    """The router kernel against cast + F.linear, per gate shape and M (see the module docstring)."""
    from moeserve.kernels.router_gemm import default_router_tiles, router_logits_ref, router_logits_triton

    device = torch.device("cpu" if smoke else "cuda")
    rows = []
    for model, (e, h, calls) in ROUTER_SHAPES.items():
        ws = weight_copies(e, h, torch.float32, device)
        for m in ROUTER_TOKENS:
            xs = [torch.randn(m, h, device=device).to(torch.float32 if smoke else torch.bfloat16) for _ in ws]
            ref = router_logits_ref(xs[0], ws[0])
            row = {"model": model, "E": e, "H": h, "M": m, "calls": calls, "err_vs_ref": 0.0, "tiles": {},
                   "t_cast_cublas_us": time_us(lambda i: router_logits_ref(xs[i], ws[i]), len(ws), smoke),
                   "roof_us": (e * h * 4 + m * h * 2 + m * e * 4) / bw * 1e6}
            cands = [None] if smoke else ROUTER_CANDIDATES
            for tiles in cands:  # None: the default tiles (the interpreter's on CPU)
                tiles = tiles and dict(tiles, BLOCK_T=min(tiles["BLOCK_T"], m))
                name = json.dumps(tiles or default_router_tiles(m, e, h, not smoke), sort_keys=True)
                row["err_vs_ref"] = max(row["err_vs_ref"], rel_err(router_logits_triton(xs[0], ws[0], tiles), ref))
                row["tiles"][name] = time_us(lambda i: router_logits_triton(xs[i], ws[i], tiles), len(ws), smoke)
            row["ok"] = row["err_vs_ref"] < 1e-6
            row["t_triton_us"] = next(iter(row["tiles"].values()))  # the default
            row["best_tiles"], row["t_best_us"] = min(row["tiles"].items(), key=lambda kv: kv[1])
            row["triton_over_cublas"] = row["t_triton_us"] / row["t_cast_cublas_us"]
            print(f"| {model} router {e}x{h} | {m} | {row['t_cast_cublas_us']:.1f} | {row['t_triton_us']:.1f} | "
                  f"{row['t_best_us']:.1f} {row['best_tiles']} | {row['roof_us']:.1f} | {row['triton_over_cublas']:.2f} "
                  f"| {row['err_vs_ref']:.1e}{'' if row['ok'] else ' FAIL'} |")
            rows.append(row)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the interpreter, fp32")
    ap.add_argument("--tune", action="store_true", help="also time BLOCK_N x BLOCK_K x SPLIT_K candidates")
    ap.add_argument("--budget-s", type=float, default=400.0, help="stop tuning past this many seconds")
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--router", action="store_true", help="the router-logits kernel instead (see above)")
    args = ap.parse_args()
    t_start = time.time()
    if args.smoke:
        SHAPES.clear()
        SHAPES.update({"tiny": [("a", 40, 150, 2), ("b", 72, 96, 1)]})
        args.models, args.tokens = "tiny", "1,3"
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    bw = copy_bandwidth(args.smoke)
    import triton
    meta = {"device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(),
            "arch": moe_config.arch_tag(device), "sms": moe_config.num_sms(device),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(), "command": " ".join(sys.argv), "torch": torch.__version__,
            "triton": triton.__version__, "copy_bandwidth_GBps": bw / 1e9, "dtype": str(dtype)}
    print(json.dumps(meta))
    if args.router:
        if args.smoke:
            ROUTER_SHAPES.clear()
            ROUTER_SHAPES.update({"tiny": (6, 100, 2)})
            ROUTER_TOKENS[:] = [1, 3]
        print("| gate | M | cast + cuBLAS us | Triton us | best tiles us | roofline us | Triton / cuBLAS | rel err |")
        rows = router_rows(bw, args.smoke)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "kernels_router.json"), "w") as f:
            json.dump({**meta, "wall_s": time.time() - t_start, "cases": rows}, f, indent=1)
        sys.exit(0 if all(r["ok"] for r in rows) else 1)
    tune_until = t_start + args.budget_s if args.tune else 0.0
    rows, tuned = [], {}
    for model in args.models.split(","):
        for name, n, k, calls in SHAPES[model]:
            ws = weight_copies(n, k, dtype, device)
            for m in map(int, args.tokens.split(",")):
                torch.manual_seed(m)
                try:
                    row = case(model, name, n, k, m, calls, ws, bw, args.smoke, tune_until)
                except Exception as e:  # noqa: BLE001 - record and go on with the other cases
                    row = {"model": model, "name": name, "N": n, "K": k, "M": m, "ok": False,
                           "error": f"{type(e).__name__}: {str(e)[:300]}"}
                rows.append(row)
                if "best_config" in row:
                    tuned.setdefault(moe_config.dense_shape_key(n, k), {})[str(m)] = row["best_config"]
                print(fmt_row(row) if "error" not in row else json.dumps(row))
                write_report(args.out, meta, rows, tuned)
            del ws
            if not args.smoke:
                torch.cuda.empty_cache()
    meta["wall_s"] = time.time() - t_start
    lines = write_report(args.out, meta, rows, tuned)
    bad = [f"{r['model']} {r['name']} M={r['M']}" for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)}/{len(rows)} cases correct (rel err < {MAX_ERR}, repeat and dispatch bit-exact); "
          f"{meta['wall_s']:.0f} s" + (f"; FAILED: {bad}" if bad else ""))
    print("\n".join(lines))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
