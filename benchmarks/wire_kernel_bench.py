"""The expert-parallel wire row kernels alone (moeserve/kernels/wire_codecs.py) on one GPU, no
collectives: route, encode_rows (none / fp8 / mxfp4; with and without routing metadata; the
high-throughput layout of slots, the low-latency layout of a fixed capacity per rank, and the plain
one-row-per-token encode of the expert outputs), decode_rows and combine_rows, at DeepSeek-V3
shapes (hidden 7168, 256 experts, top-8), 2 and 8 destination ranks, 128 and 4096 tokens.

    PYTHONUNBUFFERED=1 python benchmarks/wire_kernel_bench.py --out $OUT [--tune]

Each case: the bytes the kernel must read and write (its inputs once, its outputs once; masked rows
are not read), the median time of CUDA-graph replays cycling over input sets (so that 4096-token
cases do not hit in L2), achieved GB/s and the ratio to the same run's copy roofline (a large
device-to-device torch copy, read + write counted). Before timing, each case's output is compared
with the torch reference run on the CPU (bf16, the first CHECK_TOKENS tokens' rows): bytes for
encode and route, values for decode and combine (decode into FP8 experts' input: bytes). --tune times candidate (values per program,
warps) of each kernel and the fp8 fast paths on and off at 4096 tokens, 2 ranks, and prints the
best exact one. --smoke: tiny shapes on CPU under TRITON_INTERPRET=1 in fp32, to check the script.
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

from kernel_bench_attention import copy_bandwidth, git_commit, time_us  # noqa: E402

from moeserve.distributed.dispatch import Placement  # noqa: E402
from moeserve.kernels import wire_codecs as wc  # noqa: E402

CHECK_TOKENS = 128
SET_BYTES = 256 << 20
TUNE_CANDIDATES = [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (8192, 8), (8192, 16)]
TUNE_CASES = [("encode", "mxfp4", "ll", True), ("encode", "fp8", "plain", False), ("encode", "none", "ht", True),
              ("decode", "mxfp4", "ht", True), ("combine", "fp8", "ll", True), ("combine", "none", "ht", True),
              ("combine", "mxfp4", "ll", True)]


class Setup:
    """Routing of T tokens over R ranks (experts contiguous per rank, rank 0's view), and the row maps."""

    def __init__(self, t, r, args, device):
        g = torch.Generator().manual_seed(1000 * t + r)
        self.t, self.r, self.k, self.h = t, r, args.topk, args.hidden
        self.ids = torch.rand(t, args.experts, generator=g).argsort(dim=1)[:, :args.topk]
        self.placement = Placement.contiguous(args.experts, r)
        self.table = (self.placement.replica_slots(), self.placement.replica_count())
        self.dest, self.local, self.hit = wc.route_ref(self.ids, *self.table, 0, self.placement.slots_per_rank, r,
                                                       with_hit=True)
        self.weights = torch.rand(t, args.topk, generator=g)
        self.slots = torch.where(self.hit, self.hit.view(-1).cumsum(0).view(r, t).to(torch.int32) - 1, -1)
        self.n_ht = int(self.hit.sum())
        self.device = device

    def dev(self, *ts):
        return [x.to(self.device) for x in ts]


def n_sets(nbytes: int, device) -> int:
    return 1 if device.type == "cpu" else max(2, min(8, SET_BYTES // max(nbytes, 1)))


def row_bytes(kind, h, dtype, k):
    return wc.payload_bytes(kind, h, dtype) + 8 * k


def route_case(s: Setup, dtype):
    ids, rs, rc = s.dev(s.ids, *s.table)
    nbytes = s.t * s.k * (8 + 16) + s.r * s.t + rs.numel() * 8 + rc.numel() * 8

    def run(i):
        return wc.route_triton(ids, rs, rc, 0, s.placement.slots_per_rank, s.r, with_hit=True)

    def check(out):
        n = min(s.t, CHECK_TOKENS)
        ref = wc.route_ref(s.ids[:n], *s.table, 0, s.placement.slots_per_rank, s.r, with_hit=True)
        return all(torch.equal(a[..., :n].cpu() if a.dim() == 2 and a.shape[0] == s.r else a[:n].cpu(), b)
                   for a, b in zip(out, ref))

    return dict(op="route", kind="-", layout="-", meta=True), run, check, nbytes, 1


def encode_case(s: Setup, kind, layout, meta, dtype):
    """layout: 'ht' (slots), 'll' (cap = T per rank), 'plain' (the expert outputs: one row each, no routing)."""
    h, k = s.h, (s.k if meta else 0)
    rb = row_bytes(kind, h, dtype, k)
    if layout == "plain":
        t, num_rows, row_map = s.n_ht, s.n_ht, dict(cap=s.n_ht)
    elif layout == "ht":
        t, num_rows, row_map = s.t, s.n_ht, dict(slots=s.slots)
    else:
        t, num_rows, row_map = s.t, s.r * s.t, dict(cap=s.t)
    g = torch.Generator().manual_seed(t + k)
    x_cpu = (torch.randn(t, h, generator=g) * torch.logspace(-3, 3, t)[:, None]).to(dtype)
    meta_kw = dict(dest=s.dest, local=s.local, weights=s.weights) if meta else {}
    nbytes = t * h * dtype.itemsize + num_rows * rb + (s.t * s.k * 20 if meta else 0) + \
        (s.r * s.t * 4 if layout == "ht" else 0)
    sets = [(torch.randn(t, h, device=s.device).to(dtype),
             torch.empty(num_rows, rb, dtype=torch.uint8, device=s.device)) for _ in range(n_sets(nbytes, s.device))]
    sets[0] = (x_cpu.to(s.device), sets[0][1])
    dev_map = {key: v.to(s.device) for key, v in row_map.items() if torch.is_tensor(v)}
    dev_map.update({key: v for key, v in row_map.items() if not torch.is_tensor(v)})
    dev_meta = {key: v.to(s.device) for key, v in meta_kw.items()}

    def run(i):
        x, out = sets[i % len(sets)]
        return wc.encode_rows_triton(x, kind, dtype, num_rows, **dev_map, **dev_meta, out=out)

    def check(out):
        n = min(t, CHECK_TOKENS)
        out = out.cpu()
        if layout == "plain":
            return torch.equal(out[:n], wc.encode_ref(kind, x_cpu[:n], dtype))
        sub_meta = {key: v[:n] for key, v in meta_kw.items()}
        if layout == "ht":
            ref = wc.encode_rows_ref(x_cpu[:n], kind, dtype, num_rows, slots=s.slots[:, :n], **sub_meta,
                                     out=torch.zeros(num_rows, rb, dtype=torch.uint8))
            rows = s.slots[:, :n][s.slots[:, :n] >= 0].long()
        else:
            rows = (torch.arange(s.r)[:, None] * s.t + torch.arange(n)[None]).view(-1)
            if not meta:  # every rank's row carries the token
                return torch.equal(out[rows], wc.encode_ref(kind, x_cpu[:n], dtype).repeat(s.r, 1))
            ref = wc.encode_rows_ref(x_cpu[:n], kind, dtype, num_rows, cap=s.t, **sub_meta,
                                     out=torch.zeros(num_rows, rb, dtype=torch.uint8))
        return torch.equal(out[rows], ref[rows])

    return dict(op="encode", kind=kind, layout=layout, meta=meta), run, check, nbytes, len(sets)


def received_rows(s: Setup, kind, dtype) -> torch.Tensor:
    """The rows a rank receives (as many as the ht dispatch sends), with their metadata, on the CPU."""
    h, k, n = s.h, s.k, s.n_ht
    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, h, generator=g) * torch.logspace(-3, 3, n)[:, None]).to(dtype)
    ids = torch.randint(-1, 16, (n, k), generator=g).to(torch.int32)
    w = torch.rand(n, k, generator=g)
    return torch.cat([wc.encode_ref(kind, x, dtype), ids.view(torch.uint8).view(n, 4 * k),
                      w.view(torch.uint8).view(n, 4 * k)], dim=1)


def decode_case(s: Setup, kind, dtype):
    """The received rows decoded to the activation dtype, with their metadata."""
    h, k, n = s.h, s.k, s.n_ht
    rb = row_bytes(kind, h, dtype, k)
    rows_cpu = received_rows(s, kind, dtype)
    payload = kind != wc.RAW
    nbytes = n * ((rb if payload else 8 * k) + (h * dtype.itemsize if payload else 0) + 12 * k)
    sets = []
    for i in range(n_sets(nbytes, s.device)):
        rows = rows_cpu.to(s.device) if i == 0 else rows_cpu.roll(i, 0).to(s.device)
        sets.append((rows, (torch.empty(n, h, dtype=dtype, device=s.device) if payload else None,
                            torch.empty(n, k, dtype=torch.int64, device=s.device),
                            torch.empty(n, k, dtype=torch.float32, device=s.device))))

    def run(i):
        rows, out = sets[i % len(sets)]
        return wc.decode_rows_triton(rows, kind, h, dtype, k, out=out)

    def check(out):
        m = min(n, CHECK_TOKENS * 4)
        ref = wc.decode_rows_ref(rows_cpu[:m], kind, h, dtype, k)
        return all(torch.equal(a[:m].cpu(), b) for a, b in zip(out, ref))

    return dict(op="decode", kind=kind, layout="ht", meta=True), run, check, nbytes, len(sets)


def decode_fp8_case(s: Setup, kind, dtype, apart: bool):
    """The received rows decoded into FP8 experts' input (values e4m3, scales per 128): in one pass
    (decode_rows fp8_groups; an fp8 payload is viewed in place, only its metadata read), or, apart,
    as before it: decode to the activation dtype, then fused_moe's own quant launch."""
    from moeserve.kernels.fp8 import per_token_group_quant_fp8_ref, per_token_group_quant_fp8_triton

    h, k, n = s.h, s.k, s.n_ht
    rb, groups = row_bytes(kind, h, dtype, k), -(-h // 128)
    rows_cpu = received_rows(s, kind, dtype)
    q8 = n * (h + 4 * groups)  # the FP8 groups' bytes
    if apart:
        nbytes = n * (rb + 12 * k) + (n * h * dtype.itemsize if kind != wc.RAW else 0) + n * h * dtype.itemsize + q8
    else:
        nbytes = n * 20 * k + (0 if kind == wc.FP8 else n * (rb - 8 * k) + q8)
    sets = [rows_cpu.to(s.device) if i == 0 else rows_cpu.roll(i, 0).to(s.device)
            for i in range(n_sets(nbytes, s.device))]

    def run(i):
        rows = sets[i % len(sets)]
        if apart:
            x, ids, w = wc.decode_rows_triton(rows, kind, h, dtype, k)
            return per_token_group_quant_fp8_triton(x, 128), ids, w
        return wc.decode_rows_triton(rows, kind, h, dtype, k, fp8_groups=True)

    def check(out):
        # Values, not bytes, for the e4m3 part: the GPU's quotient gives +0 for -0 (mxfp4 decodes
        # negative values that round to zero as -0), which the GEMMs read as the same zero.
        # Each against its own reference: "decode + quant" rounds twice an fp8 payload (one pass
        # views it) and requantizes an mxfp4 one (one pass converts it exactly).
        m = min(n, CHECK_TOKENS * 4)
        (q, sc), ids, w = out
        if apart:
            x_ref, ids_ref, w_ref = wc.decode_rows_ref(rows_cpu[:m], kind, h, dtype, k)
            q_ref, sc_ref = per_token_group_quant_fp8_ref(x_ref, 128)
        else:
            (q_ref, sc_ref), ids_ref, w_ref = wc.decode_rows_ref(rows_cpu[:m], kind, h, dtype, k, fp8_groups=True)
        return (torch.equal(q[:m].cpu().float(), q_ref.float()) and torch.equal(sc[:m].cpu(), sc_ref)
                and torch.equal(ids[:m].cpu(), ids_ref) and torch.equal(w[:m].cpu(), w_ref))

    layout = "fp8 groups, decode + quant" if apart else "fp8 groups, one pass"
    return dict(op="decode", kind=kind, layout=layout, meta=True), run, check, nbytes, len(sets)


def combine_case(s: Setup, kind, layout, dtype):
    """The returned rows of a rank's tokens, decoded and summed per token (ht: slots; ll: cap + dest)."""
    h, t = s.h, s.t
    rb = wc.payload_bytes(kind, h, dtype)
    num_rows = s.n_ht if layout == "ht" else s.r * t
    g = torch.Generator().manual_seed(num_rows)
    rows_cpu = wc.encode_ref(kind, torch.randn(num_rows, h, generator=g).to(dtype), dtype)
    row_map = dict(slots=s.slots) if layout == "ht" else dict(cap=t, dest=s.dest)
    nbytes = s.n_ht * rb + t * h * dtype.itemsize + (s.r * t * 4 if layout == "ht" else t * s.k * 8)
    dev_map = {key: (v.to(s.device) if torch.is_tensor(v) else v) for key, v in row_map.items()}
    sets = []
    for i in range(n_sets(nbytes, s.device)):
        rows = rows_cpu.to(s.device) if i == 0 else rows_cpu.roll(i, 0).to(s.device)
        sets.append((rows, torch.empty(t, h, dtype=dtype, device=s.device)))

    def run(i):
        rows, y = sets[i % len(sets)]
        return wc.combine_rows_triton(rows, kind, h, dtype, dtype, t, **dev_map, out=y)

    def check(out):
        n = min(t, CHECK_TOKENS)
        sub = dict(slots=s.slots[:, :n]) if layout == "ht" else dict(cap=t, dest=s.dest[:n])
        return torch.equal(out[:n].cpu(), wc.combine_rows_ref(rows_cpu, kind, h, dtype, dtype, n, **sub))

    return dict(op="combine", kind=kind, layout=layout, meta=layout == "ll"), run, check, nbytes, len(sets)


def all_cases(s: Setup, dtype, ops=("route", "encode", "decode", "combine")):
    if "route" in ops:
        yield lambda: route_case(s, dtype)
    for kind in wc.KINDS if "encode" in ops else ():
        for layout, meta in (("ht", True), ("ht", False), ("ll", True), ("ll", False), ("plain", False)):
            yield lambda kind=kind, layout=layout, meta=meta: encode_case(s, kind, layout, meta, dtype)
    for kind in wc.KINDS if "decode" in ops else ():
        yield lambda kind=kind: decode_case(s, kind, dtype)
        for apart in (True, False):
            yield lambda kind=kind, apart=apart: decode_fp8_case(s, kind, dtype, apart)
    for kind in wc.KINDS if "combine" in ops else ():
        for layout in ("ht", "ll"):
            yield lambda kind=kind, layout=layout: combine_case(s, kind, layout, dtype)


def make_case(s, op, kind, layout, meta, dtype):
    if op == "encode":
        return encode_case(s, kind, layout, meta, dtype)
    if op == "decode":
        return decode_case(s, kind, dtype)
    return combine_case(s, kind, layout, dtype)


def measure(row, run, check, nbytes, sets, bw, smoke):
    out = run(0)
    if not smoke:
        torch.cuda.synchronize()
    row["exact"] = bool(check(out))
    row["t_us"] = time_us(run, sets, smoke)
    row["bytes"] = nbytes
    row["gbs"] = nbytes / row["t_us"] / 1e3
    row["roof_us"] = nbytes / bw * 1e6
    row["x_roof"] = row["t_us"] / row["roof_us"]
    return row


def fmt_row(r) -> str:
    if "error" in r:
        return f"| {r['op']} | {r['kind']} | {r['layout']} | | {r['R']} | {r['T']} | error: {r['error'][:80]} |"
    return (f"| {r['op']} | {r['kind']} | {r['layout']} | {'k' if r['meta'] else '-'} | {r['R']} | {r['T']} | "
            f"{r['bytes'] / 1e6:.2f} | {r['t_us']:.1f} | {r['gbs']:.0f} | {r['x_roof']:.2f} | "
            f"{'yes' if r['exact'] else 'NO'} |")


HEADER = ["| op | kind | layout | meta | R | T | MB | us | GB/s | x roofline | exact |",
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]


def write_report(out, meta, rows, tune):
    path = out if out.endswith(".json") else os.path.join(out, "wire_kernels.json")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({**meta, "cases": rows, "tune": tune}, f, indent=1)


def tune(args, bw, dtype, device):
    """Candidates of (values per program, warps) per kernel, and fp8's fast paths off, at 4096 tokens and
    each of --tune-ranks (default 2), for the TUNE_CASES of --tune-ops."""
    results = []
    cases = [(r, case) for r in map(int, args.tune_ranks.split(",")) for case in TUNE_CASES
             if case[0] in args.tune_ops.split(",")]
    s = None
    for ranks, (op, kind, layout, meta) in cases:
        if s is None or s.r != ranks:
            s = Setup(args.tune_tokens, ranks, args, device)
        row0, run, check, nbytes, sets = make_case(s, op, kind, layout, meta, dtype)
        saved = wc.TUNING[op, kind], wc.FAST_FP8
        many = wc.TUNING_MANY_RANKS.pop((op, kind), None)  # the candidates go through TUNING at any rank count
        variants = [(c, w, True) for c, w in TUNE_CANDIDATES]
        if kind == "fp8":
            variants.append((saved[0][0], saved[0][1], False))
        for chunk, warps, fast in variants:
            wc.TUNING[op, kind], wc.FAST_FP8 = (chunk, warps), fast
            row = dict(row0, chunk=chunk, warps=warps, fast=fast, T=s.t, R=s.r)
            try:
                measure(row, run, check, nbytes, sets, bw, args.smoke)
            except Exception as e:  # noqa: BLE001 - record and go on
                row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            results.append(row)
            print("tune", json.dumps(row))
        wc.TUNING[op, kind], wc.FAST_FP8 = saved
        if many is not None:
            wc.TUNING_MANY_RANKS[op, kind] = many
        del run, check
        if device.type == "cuda":
            torch.cuda.empty_cache()
    best = {}
    for r in results:
        key = f"{r['op']}/{r['kind']}/R={r['R']}"
        if "error" not in r and r["exact"] and r["fast"] and (key not in best or r["t_us"] < best[key]["t_us"]):
            best[key] = r
    print("tune best:", json.dumps({k: (v["chunk"], v["warps"], round(v["t_us"], 1)) for k, v in best.items()}))
    return {"candidates": results, "best": {k: [v["chunk"], v["warps"], v["t_us"]] for k, v in best.items()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="a .json file or a directory")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the interpreter, fp32")
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--ranks", default="2,8")
    ap.add_argument("--tokens", default="128,4096")
    ap.add_argument("--tune-tokens", type=int, default=4096)
    ap.add_argument("--tune-ranks", default="2", help="destination ranks to tune at (comma list)")
    ap.add_argument("--tune-ops", default="encode,decode,combine", help="which TUNE_CASES ops to tune")
    ap.add_argument("--label", default="")
    ap.add_argument("--ops", default="route,encode,decode,combine", help="which kernels to time (comma list)")
    args = ap.parse_args()
    t_start = time.time()
    if args.smoke:
        args.hidden, args.experts, args.topk, args.tokens, args.ranks, args.tune_tokens = 256, 16, 4, "3,5", "2", 5
        global TUNE_CANDIDATES
        TUNE_CANDIDATES = [(128, 1), (256, 2)]
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    bw = copy_bandwidth(args.smoke)
    import triton
    meta = {"device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(), "command": " ".join(sys.argv), "label": args.label,
            "torch": torch.__version__, "triton": triton.__version__, "copy_bandwidth_GBps": bw / 1e9,
            "dtype": str(dtype), "hidden": args.hidden, "experts": args.experts, "topk": args.topk,
            "tuning": {f"{op}/{kind}": list(v) for (op, kind), v in getattr(wc, "TUNING", {}).items()},
            "tuning_many_ranks": {f"{op}/{kind}": list(v) for (op, kind), v in getattr(wc, "TUNING_MANY_RANKS", {}).items()}}
    print(json.dumps(meta))
    tuned = tune(args, bw, dtype, device) if args.tune else None
    rows = []
    for t in map(int, args.tokens.split(",")):
        for r in map(int, args.ranks.split(",")):
            s = Setup(t, r, args, device)
            for make in all_cases(s, dtype, args.ops.split(",")):
                row, run, check, nbytes, sets = make()
                row.update(T=t, R=r)
                try:
                    measure(row, run, check, nbytes, sets, bw, args.smoke)
                except Exception as e:  # noqa: BLE001 - record and go on with the other cases
                    row.update(error=f"{type(e).__name__}: {str(e)[:300]}", exact=False)
                rows.append(row)
                print(fmt_row(row))
                del run, check
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write_report(args.out, meta, rows, tuned)
    write_report(args.out, meta, rows, tuned)
    bad = [f"{r['op']} {r['kind']} {r['layout']} R={r['R']} T={r['T']}" for r in rows if not r["exact"]]
    print(f"{len(rows) - len(bad)}/{len(rows)} cases equal to the references; copy {bw / 1e9:.0f} GB/s; "
          f"{time.time() - t_start:.0f} s" + (f"; DIFFER: {bad}" if bad else ""))
    big = [r for r in rows if r["T"] == max(map(int, args.tokens.split(","))) and "error" not in r]
    print("\n".join(HEADER + [fmt_row(r) for r in big]))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
