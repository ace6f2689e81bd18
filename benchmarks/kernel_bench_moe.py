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
from moeserve.kernels.fused_moe import fused_moe, fused_moe_ref, fused_moe_triton, fused_moe_w8a8_ref  # noqa: E402
from moeserve.kernels.moe_align import moe_align_block_size_ref, moe_align_block_size_triton  # noqa: E402

MODELS = {  # name: (E, H, I, top_k, experts routed over: > E means only E are local, the rest -1)
    "V2-Lite": (64, 2048, 1408, 6, 64),
    "V3": (256, 7168, 2048, 8, 256),
    "V3-EP8-local": (32, 7168, 2048, 8, 256),
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


def routing(tokens, e_local, e_routed, k, device):
    ids = torch.rand(tokens, e_routed, device=device).topk(k, dim=1).indices
    ids = torch.where(ids < e_local, ids, -1).to(torch.int32)
    weights = torch.softmax(torch.randn(tokens, k, device=device), dim=-1)
    return weights, ids


def moe_case(name, tokens, variant, weights, timer, ceil, tune, tuned, smoke, device):
    """variant: bf16 | fp8 (W8A8) | fp8_w8a16. Returns a result row."""
    e, h, i, k, e_routed = MODELS[name]
    w13, w2, s13, s2 = weights
    fp8 = s13 is not None
    act_fp8 = variant == "fp8"
    n_inputs = 1 if smoke else 4
    xs = [torch.randn(tokens, h, device=device, dtype=torch.bfloat16) for _ in range(n_inputs)]
    routes = [routing(tokens, e, e_routed, k, device) for _ in range(n_inputs)]

    # correctness on fresh inputs first
    x, (rw, ids) = xs[0], routes[0]
    out = fused_moe_triton(x, w13, w2, rw, ids, s13, s2, BLOCK, act_fp8)
    row = {"model": name, "tokens": tokens, "variant": variant}
    row["err_vs_ref"] = rel_err(out, fused_moe_ref(x, w13, w2, rw, ids, s13, s2, BLOCK))
    if variant != "fp8_w8a16":  # the public name must dispatch to the kernel on CUDA
        row["dispatch_err"] = rel_err(fused_moe(x, w13, w2, rw, ids, s13, s2, BLOCK), out)
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
    if tune and variant != "fp8_w8a16":
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
        config = moe_config.moe_config(tokens, e, h, i, k, wdtype, x.device)
        row["t_us"] = timer(run_with(config), n_inputs)
    row["config"] = config
    if tokens == 1 and not smoke:
        row["t_eager_us"] = timer(run_with(config), n_inputs, graph=False)
    row["t_align_us"] = timer(lambda j: moe_align_block_size_triton(routes[j][1], config["BLOCK_M"], e), n_inputs)

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
    args = ap.parse_args()
    t_start = time.time()
    if args.smoke:
        MODELS.update({"V2-Lite": (4, 64, 32, 2, 4), "V3": (8, 64, 64, 3, 8), "V3-EP8-local": (2, 64, 64, 3, 8)})
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
        extra = ("config", "t_eager_us", "t_align_us", "align_mismatch", "q_mismatch", "dispatch_err")
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
        e, h, i, k, _ = MODELS[name]
        for fp8 in (False, True):
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
