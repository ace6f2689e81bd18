"""Expert-parallel dispatch + combine: latency and achieved bandwidth per wire format and backend.

DeepSeek-V3 shapes by default (hidden 7168, 256 experts, top-8), 128 and 4096 tokens per rank,
bf16 activations; wire formats bf16 (none/none), fp8 (fp8/fp8) and mxfp4+fp8 (MXFP4 dispatch, FP8
combine); backends ht (variable splits), ll (fixed capacity = tokens per rank) and llp (ll over the
peer-memory transport: rows stored straight into the peers' buffers, a device barrier, no NCCL). Measured in
the same run for reference: GPU0 -> GPU1 peer-copy bandwidth and a plain NCCL all_to_all_single
moving the bytes of the bf16 high-throughput dispatch.

Run on N GPUs of one host (either form):
    torchrun --nproc-per-node N benchmarks/ep_bench.py
    python benchmarks/ep_bench.py --nproc N
CPU smoke run (gloo, small shapes):
    python benchmarks/ep_bench.py --device cpu --nproc 2 --hidden 256 --experts 16 --topk 4 --tokens 8,32

Writes ep_bench.json and ep_bench.md under $OUT (or --out) and prints the table last.
Bandwidth counts the bytes a rank sends to OTHER ranks in dispatch and combine (what crosses
NVLink), divided by the round-trip time; the round trip is the slowest rank's time, median
over iterations. For ll the wire bytes include padding rows; 'useful' is the share that is real.
Experts are free: combine sends a ready buffer of the expert output's shape, contiguous, as
fused_moe would hand it over.

The row work (gather + encode + pack, decode, decode + sum) runs in wire_codecs' Triton kernels
on CUDA (--kernels torch: the plain-torch references). Before timing, rank 0 checks the Triton
kernels on bf16 rows at the benchmark's hidden size against the torch references run on the CPU
(the CPU interpreter cannot do bf16): same bytes, same values; the result is in the header.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import datetime, timezone

# Before any NCCL / symmetric-memory initialisation (see KINDS.md on the device machines).
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moeserve.distributed.dispatch import Dispatcher, Placement  # noqa: E402
from moeserve.distributed.groups import free_port, init_distributed, init_from_env  # noqa: E402
from moeserve.engine.core_proc import exit_rank_process  # noqa: E402
from moeserve.kernels import wire_codecs  # noqa: E402

FORMATS = {"bf16": ("none", "none"), "fp8": ("fp8", "fp8"), "mxfp4+fp8": ("mxfp4", "fp8")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=None, help="spawn this many ranks (default: all GPUs); "
                   "ignored under torchrun")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--tokens", default="128,4096", help="tokens per rank, comma separated")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--backends", default="ht,ll",
                   help="comma list of ht, ll, llp (ll over peer memory); a number after ht or ll pipelines it in "
                   "that many token ranges (ll4)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--graph", action="store_true", help="also time the ll round trip captured in a CUDA graph")
    p.add_argument("--ll-capacity", type=int, default=None,
                   help="rows per rank of the low-latency buffers (default: the tokens per rank); larger shows a "
                   "decode step with fewer tokens than the buffer holds, whose padding rows the collective "
                   "transport sends as zeros and the peer transport as 64 B of metadata")
    p.add_argument("--fp8-experts", action="store_true",
                   help="hand the received rows over as FP8 experts take them (FP8 groups: an fp8 payload as it "
                   "arrived, others decoded and quantized in one pass) instead of decoded to bf16")
    p.add_argument("--kernels", choices=["auto", "triton", "torch"], default="auto",
                   help="row kernels: Triton where it runs (auto) or the plain-torch references")
    p.add_argument("--ht-chunks", type=int, default=1,
                   help="token ranges the ht backend pipelines (codec passes overlap the transfers)")
    p.add_argument("--profile", action="store_true", help="print rank 0's top GPU kernels for each case")
    p.add_argument("--out", default=os.environ.get("OUT", "ep_bench_out"))
    p.add_argument("--timeout", type=float, default=300.0, help="deadline (s) for every collective")
    args = p.parse_args(argv)
    for b in args.backends.split(","):
        if b != "llp" and (b[:2] not in ("ht", "ll") or not (b[2:] == "" or b[2:].isdigit() and int(b[2:]) > 0)):
            p.error(f"--backends: {b!r} is not llp, or ht or ll optionally followed by a chunk count")
    return args


# ----------------------------------------------------------------------------- timing


class Timer:
    """Wall time of a region: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def run(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def timed(fn, args, device) -> float:
    """Median over iterations of the slowest rank's time (ranks start together at a barrier)."""
    timer = Timer(device)
    for _ in range(args.warmup):
        fn()
    times = []
    for _ in range(args.iters):
        dist.barrier()
        t = torch.tensor([timer.run(fn)], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        times.append(float(t))
    return statistics.median(times)


def mean_over_ranks(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


# ----------------------------------------------------------------------------- measurements


def peer_copy_gbs(nbytes: int = 256 << 20, iters: int = 10) -> float | None:
    """GPU0 -> GPU1 copy bandwidth (GB/s, one direction), measured before the process group exists."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return None
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize("cuda:0")
    torch.cuda.synchronize("cuda:1")
    t0 = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    torch.cuda.synchronize("cuda:0")
    torch.cuda.synchronize("cuda:1")
    return nbytes * iters / (time.perf_counter() - t0) / 1e9


def routing(tokens: int, args, rank: int, device):
    g = torch.Generator(device="cpu").manual_seed(1234 + rank)
    x = torch.randn(tokens, args.hidden, generator=g).to(device=device, dtype=torch.bfloat16)
    ids = torch.rand(tokens, args.experts, generator=g).topk(args.topk, dim=1).indices.to(device)
    w = torch.rand(tokens, args.topk, generator=g).softmax(dim=-1).to(device)
    return x, ids, w


def remote_rows(d: Dispatcher, ids: torch.Tensor) -> tuple[int, int]:
    """(rows this rank sends to other ranks in the ht layout, tokens it sends to other ranks)."""
    slots = d.table.physical_slots(ids, d.rank)
    dest = slots // d.table.placement.slots_per_rank
    hit = torch.zeros(ids.shape[0], d.num_ranks, dtype=torch.bool, device=ids.device)
    hit.scatter_(1, dest, True)
    hit[:, d.rank] = False
    return int(hit.sum()), int(hit.any(dim=1).sum())


def bench_round_trip(fmt: str, backend: str, tokens: int, args, device) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    dcodec, ccodec = FORMATS[fmt]
    placement = Placement.contiguous(args.experts, world)
    peer = backend == "llp"
    mode, chunks = backend[:2], 0 if peer else int(backend[2:] or 0)  # "ll4": ll in 4 pipelined ranges
    d = Dispatcher(dist.group.WORLD, placement, args.hidden, torch.bfloat16, dcodec, ccodec, mode=mode,
                   ll_capacity=max(args.ll_capacity or tokens, tokens), device=device, kernels=args.kernels,
                   ht_chunks=chunks or args.ht_chunks,
                   ll_chunks=chunks or 1, ll_transport="peer" if peer else "collective", peer_timeout_s=args.timeout)
    x, ids, w = routing(tokens, args, rank, device)
    fp8 = args.fp8_experts
    # (llp: the first dispatch maps the peer buffers, before any timing or capture)
    recv_x, _, _, handle = d.dispatch(x, ids, w, fp8_groups=fp8)
    # Free experts: the output buffer is ready (the routing, hence its shape, is the same every time);
    # a copy, since a raw payload's recv_x is a view of the receive buffer.
    expert_out = torch.randn(recv_x[0].shape, device=device).to(torch.bfloat16) if fp8 else recv_x.clone()

    def round_trip():
        _, _, _, h = d.dispatch(x, ids, w, fp8_groups=fp8)
        return d.combine(expert_out, h)

    t_rt = timed(round_trip, args, device)
    t_dispatch = timed(lambda: d.dispatch(x, ids, w, fp8_groups=fp8), args, device)
    t_combine = timed(lambda: d.combine(expert_out, handle), args, device)  # a handle can be combined again
    drow, crow = d.bytes_per_row(args.topk)
    rows, _ = remote_rows(d, ids)
    cap = d.ll_capacity
    if mode == "ht":
        wire = rows * (drow + crow)
    elif peer:  # the metadata of every row, the payloads of the rows that carry a token
        wire = rows * (drow - 8 * args.topk + crow) + (world - 1) * cap * 8 * args.topk
    else:  # the whole buffer, padding rows included
        wire = (world - 1) * cap * (drow + crow)
    useful = rows * (drow + crow)
    wire, useful = mean_over_ranks(wire, device), mean_over_ranks(useful, device)
    row = {"format": fmt, "backend": backend, "tokens_per_rank": tokens, "ll_capacity": cap if mode == "ll" else None,
           "fp8_experts": fp8, "round_trip_us": t_rt * 1e6,
           "dispatch_us": t_dispatch * 1e6, "combine_us": t_combine * 1e6,
           "wire_bytes_per_rank": wire, "useful_fraction": useful / wire if wire else 1.0,
           "gbs": wire / t_rt / 1e9, "bytes_per_token_round_trip": d.dispatch_codec.bytes_per_token(args.hidden)
           + d.combine_codec.bytes_per_token(args.hidden)}
    if args.graph and mode == "ll" and device.type == "cuda":
        row["graph_round_trip_us"] = graph_round_trip(round_trip, args, device)
    if args.profile and device.type == "cuda":
        row["profile"] = profile_round_trip(round_trip, f"{fmt} {backend} {tokens} tokens/rank")
    d.close()  # llp: every rank unmaps its peers' buffers before any of them frees or exits
    return row


def profile_round_trip(fn, title: str, iters: int = 5) -> str | None:
    """Rank 0's GPU kernels over a few round trips (every rank runs them: the collectives pair up)."""
    from torch.profiler import ProfilerActivity, profile

    dist.barrier()
    if dist.get_rank() != 0:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        return None
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    text = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=48)
    print(f"profile, {title}, {iters} round trips (rank 0):\n{text}", flush=True)
    return text


def graph_round_trip(fn, args, device) -> float | str:
    """The ll round trip captured in a CUDA graph (no host sync may happen inside)."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return timed(graph.replay, args, device) * 1e6
    except Exception as e:  # report, do not abort the other measurements
        return f"capture failed: {type(e).__name__}: {e}"[:200]


def check_kernels(hidden: int, topk: int, device, dtype=torch.bfloat16) -> str:
    """The Triton row kernels against the torch references run on the CPU, on rows over forty
    decades with zeros and subnormals: 'equal' or what differs."""
    if not wire_codecs.use_triton(torch.empty(0, device=device), dtype):
        return "torch references"
    g = torch.Generator().manual_seed(7)
    t, r = 64, 4
    x = torch.randn(t, hidden, generator=g) * torch.logspace(-20, 20, t)[:, None]
    x[0, :256] = 0.0
    x[1, :64] = torch.linspace(-1.1e-38, 1.1e-38, 64)  # subnormal blocks with nonzero e2m1 codes
    x = x.to(dtype)
    dest = torch.randint(0, r + 1, (t, topk), generator=g)
    meta = dict(dest=dest, local=torch.where(dest < r, torch.randint(0, 8, (t, topk), generator=g), -1),
                weights=torch.rand(t, topk, generator=g))
    hit = (dest[None] == torch.arange(r)[:, None, None]).any(-1)
    slots = torch.where(hit, hit.view(-1).cumsum(0).view(r, t).to(torch.int32) - 1, -1)
    maps = {"slots": (int(hit.sum()), dict(slots=slots)), "fixed": (r * (t + 3), dict(cap=t + 3))}

    def dev(kw):
        return {key: v.to(device) if torch.is_tensor(v) else v for key, v in kw.items()}

    bad = []
    for kind in wire_codecs.KINDS:
        for name, (n, row_map) in maps.items():
            ref = wire_codecs.encode_rows_ref(x, kind, dtype, n, **row_map, **meta)
            got = wire_codecs.encode_rows(x.to(device), kind, dtype, n, **dev(row_map), **dev(meta), triton_ok=True)
            if not torch.equal(got.cpu(), ref):
                bad.append(f"encode {kind} {name}: {int((got.cpu() != ref).sum())} bytes")
            got = wire_codecs.decode_rows(ref.to(device), kind, hidden, dtype, topk, triton_ok=True)
            if not all(torch.equal(a.cpu(), b) for a, b in zip(got, wire_codecs.decode_rows_ref(ref, kind, hidden,
                                                                                               dtype, topk))):
                bad.append(f"decode {kind} {name}")
            back = wire_codecs.encode_ref(kind, torch.randn(n, hidden, generator=g), dtype)
            row_map = dict(row_map, dest=dest) if name == "fixed" else row_map
            y = wire_codecs.combine_rows(back.to(device), kind, hidden, dtype, dtype, t, **dev(row_map), triton_ok=True)
            if not torch.equal(y.cpu(), wire_codecs.combine_rows_ref(back, kind, hidden, dtype, dtype, t, **row_map)):
                bad.append(f"combine {kind} {name}")
    return f"triton, {dtype} equal to the torch references" if not bad else "triton, DIFFERS: " + "; ".join(bad)


def bench_plain_all_to_all(tokens: int, args, device) -> dict:
    """all_to_all_single with equal splits moving the bf16 ht dispatch's bytes (one direction)."""
    world = dist.get_world_size()
    placement = Placement.contiguous(args.experts, world)
    d = Dispatcher(dist.group.WORLD, placement, args.hidden, torch.bfloat16, device=device)
    _, ids, _ = routing(tokens, args, dist.get_rank(), device)
    rows, _ = remote_rows(d, ids)
    per_peer = max(1, round(mean_over_ranks(rows, device) / max(world - 1, 1)))
    row_bytes = 2 * args.hidden
    send = torch.zeros(world * per_peer, row_bytes, dtype=torch.uint8, device=device)
    recv = torch.empty_like(send)
    t = timed(lambda: dist.all_to_all_single(recv, send), args, device)
    wire = (world - 1) * per_peer * row_bytes
    return {"tokens_per_rank": tokens, "a2a_us": t * 1e6, "wire_bytes_per_rank": wire, "gbs": wire / t / 1e9}


# ----------------------------------------------------------------------------- report


def _fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else ("n/a" if value is None else str(value)[:40])


def table(report: dict) -> str:
    peer = report["peer_copy_gbs"]
    lines = [f"EP dispatch+combine, {report['world']} x {report['device_name']}, hidden {report['hidden']}, "
             f"{report['experts']} experts, top-{report['topk']}; GPU0->GPU1 peer copy {_fmt(peer, '.0f')} GB/s",
             f"row kernels: {report.get('kernels', 'n/a')}; ht chunks: {report.get('ht_chunks', 1)}", "",
             "| tokens/rank | format | backend | B/token rt | round trip us | dispatch us | combine us | GB/s "
             "| x peer copy | vs bf16 | useful | graph us |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    bf16 = {(r["backend"], r["tokens_per_rank"]): r["round_trip_us"] for r in report["rows"] if r["format"] == "bf16"}
    for r in report["rows"]:
        ref = bf16.get((r["backend"], r["tokens_per_rank"]))
        cells = [r["tokens_per_rank"], r["format"], r["backend"], r["bytes_per_token_round_trip"],
                 _fmt(r["round_trip_us"], ".1f"), _fmt(r["dispatch_us"], ".1f"), _fmt(r["combine_us"], ".1f"),
                 _fmt(r["gbs"], ".3g"), _fmt(r["gbs"] / peer if peer else None, ".2f"),
                 _fmt(r["round_trip_us"] / ref if ref else None, ".2f"), _fmt(r["useful_fraction"], ".2f"),
                 _fmt(r.get("graph_round_trip_us", ""), ".1f")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "| tokens/rank | plain all_to_all us (bf16 ht dispatch bytes) | GB/s | x peer copy |",
              "|---|---|---|---|"]
    for a in report["all_to_all"]:
        lines.append(f"| {a['tokens_per_rank']} | {a['a2a_us']:.1f} | {a['gbs']:.3g} "
                     f"| {_fmt(a['gbs'] / peer if peer else None, '.2f')} |")
    lines.append("")
    backends = list(dict.fromkeys(r["backend"] for r in report["rows"]))
    for tokens in sorted({r["tokens_per_rank"] for r in report["rows"]}):
        here = [r for r in report["rows"] if r["tokens_per_rank"] == tokens]
        rt = {(r["format"], r["backend"]): r["round_trip_us"] for r in here}
        graph = {(r["format"], r["backend"]): r["graph_round_trip_us"] for r in here
                 if isinstance(r.get("graph_round_trip_us"), float)}
        for backend in backends:
            if ("bf16", backend) in rt and ("mxfp4+fp8", backend) in rt:
                lines.append(f"{tokens} tokens/rank, {backend}: mxfp4+fp8 / bf16 round trip = "
                             f"{rt[('mxfp4+fp8', backend)] / rt[('bf16', backend)]:.2f}")
            if ("bf16", backend) in graph and ("mxfp4+fp8", backend) in graph:
                lines.append(f"{tokens} tokens/rank, {backend} in a CUDA graph: mxfp4+fp8 / bf16 round trip = "
                             f"{graph[('mxfp4+fp8', backend)] / graph[('bf16', backend)]:.2f}")
        best = {fmt: min(((us, b) for (f, b), us in graph.items() if f == fmt), default=None)
                for fmt in ("bf16", "mxfp4+fp8")}
        if all(best.values()):  # each format in its fastest pipelining
            lines.append(f"{tokens} tokens/rank, fastest in a CUDA graph: mxfp4+fp8 ({best['mxfp4+fp8'][1]}) / "
                         f"bf16 ({best['bf16'][1]}) = {best['mxfp4+fp8'][0] / best['bf16'][0]:.2f}")
        if ("bf16", "ll") in rt and ("bf16", "ht") in rt:
            ratio = rt[("bf16", "ll")] / rt[("bf16", "ht")]
            lines.append(f"{tokens} tokens/rank, bf16: ll / ht round trip = {ratio:.2f}")
    return "\n".join(lines)


def run(args, device: torch.device, peer: float | None) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    token_counts = [int(t) for t in args.tokens.split(",")]
    kernels = None
    if rank == 0:  # bf16 on the GPU is what the CPU tests cannot check
        kernels = "torch references" if args.kernels == "torch" else check_kernels(args.hidden, args.topk, device)
    rows, a2a = [], []
    for tokens in token_counts:
        a2a.append(bench_plain_all_to_all(tokens, args, device))
        for fmt in args.formats.split(","):
            for backend in args.backends.split(","):
                rows.append(bench_round_trip(fmt, backend, tokens, args, device))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    if rank != 0:
        dist.barrier()  # until rank 0 has written the report (see the barrier at the end)
        return
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
              "world": world, "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "hidden": args.hidden, "experts": args.experts, "topk": args.topk,
              "peer_copy_gbs": peer, "kernels": kernels, "ht_chunks": args.ht_chunks, "rows": rows, "all_to_all": a2a}
    os.makedirs(args.out, exist_ok=True)
    text = table(report)
    with open(os.path.join(args.out, "ep_bench.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "ep_bench.md"), "w") as f:
        f.write(f"{report['date']} `{report['command']}` torch {report['torch']}\n\n{text}\n")
    print(text, flush=True)
    # Every rank leaves together, so none tears its group down while rank 0 (the rendezvous store's
    # host) still writes; the rank processes then end through exit_rank_process, whose docstring says
    # why (the CPU smoke test aborted at exit in 4 runs of 12 before both).
    dist.barrier()


def worker(local_rank: int, nproc: int, addr: str, args) -> None:
    peer = peer_copy_gbs() if local_rank == 0 and args.device == "cuda" else None
    device = init_distributed(addr, local_rank, nproc, device=args.device, timeout_s=args.timeout)
    if args.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    try:
        run(args, device, peer)
    finally:
        dist.destroy_process_group()
    exit_rank_process(0)  # no interpreter teardown: see exit_rank_process


def main(argv=None) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        peer = peer_copy_gbs() if local_rank == 0 and args.device == "cuda" else None
        device = init_from_env(args.device, timeout_s=args.timeout)
        try:
            run(args, device, peer)
        finally:
            dist.destroy_process_group()
        exit_rank_process(0)
    nproc = args.nproc or (torch.cuda.device_count() if args.device == "cuda" else 2)
    if nproc < 2:
        raise SystemExit("expert parallelism needs at least 2 ranks")
    torch.multiprocessing.spawn(worker, args=(nproc, f"127.0.0.1:{free_port()}", args), nprocs=nproc, join=True)


if __name__ == "__main__":
    main()
