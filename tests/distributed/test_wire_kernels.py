"""Wire codec row kernels (moeserve/kernels/wire_codecs.py): Triton against the plain-torch
references, byte for byte, on CPU; and expert-parallel dispatch/combine on 2 gloo ranks through
the Triton path equal to the torch path.

The Triton cases run under the interpreter (TRITON_INTERPRET=1) in a child process, as in
tests/kernels/test_attention.py: the variable must be set before triton is imported. fp32/fp16
activations only (bf16 is wrong under the interpreter; benchmarks/ep_bench.py checks it on the GPU).
Inputs are fresh random draws each run (the seed is printed on failure) with zeros, subnormals,
tiny and huge values, and exact mxfp4 rounding ties mixed in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tests.helpers import interpreter_results as run_interpreted
from tests.helpers import print_interpreter_cases

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KINDS = ("none", "fp8", "mxfp4")


def nasty_rows(n: int, h: int, dtype: torch.dtype) -> torch.Tensor:
    """Gaussian rows over many decades, plus zero blocks, subnormals, huge values and mxfp4 ties."""
    big = 3e38 if dtype == torch.float32 else 6e4
    tiny = 1e-40 if dtype == torch.float32 else 1e-7  # subnormal in both
    decades = 6 if dtype == torch.float32 else 3  # finite inputs only: inf and NaN are not specified
    x = torch.randn(n, h) * torch.logspace(-decades, decades, n)[:, None]
    x[0, :64] = 0.0  # whole zero blocks / groups
    x[1, 32:64] = tiny * torch.randn(32)
    x[1, 64:96] = 1e-30 if dtype == torch.float32 else 1e-5
    x[2, :32] = big * (torch.rand(32) * 2 - 1)
    x[2, 32] = big
    # Block amax 6 (scale 2^0): every e2m1 midpoint of both signs, times a power of two.
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    x[3, :32] = torch.cat([mids, -mids, mids, -mids]) * 2.0 ** torch.randint(-8, 8, ()).item()
    return x.to(dtype)


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all()) \
        if a.is_floating_point() else torch.equal(a, b)


def _routing(t: int, k: int, num_ranks: int):
    """dest [T, k] (num_ranks = none), local [T, k], weights [T, k]; some tokens miss some ranks."""
    dest = torch.randint(0, num_ranks + 1, (t, k))
    local = torch.where(dest < num_ranks, torch.randint(0, 5, (t, k)), -1)
    return dest, local, torch.rand(t, k)


def _kernel_cases() -> dict[str, bool]:
    from moeserve.kernels import wire_codecs as wc

    out = {}
    for kind in KINDS:
        for dtype in (torch.float32, torch.float16):
            for h in (96, 192) if dtype == torch.float16 else (96, 192, 7168):  # < one chunk, partial fp8 group, V3
                x = nasty_rows(5, h, dtype)
                ref = wc.encode_ref(kind, x, dtype)
                got = wc.encode_rows_triton(x, kind, dtype, x.shape[0], cap=x.shape[0])
                out[f"encode_{kind}_{dtype}_{h}"] = _equal(got, ref)
                if kind == "none":  # fp32 activations on an fp16 wire: the cast rounds as torch does
                    x32 = nasty_rows(5, h, torch.float32)
                    out[f"encode_{kind}_fp32_to_{dtype}_{h}"] = _equal(
                        wc.encode_rows_triton(x32, kind, dtype, 5, cap=5), wc.encode_ref(kind, x32, dtype))
                # Decode what was encoded, and random payloads (every code and scale byte).
                payloads = [ref, _random_payload(kind, 4, h, dtype)]
                for i, p in enumerate(payloads):
                    got = wc.decode_rows_triton(p, kind, h, dtype)[0]
                    out[f"decode{i}_{kind}_{dtype}_{h}"] = _equal(got, wc.decode_ref(kind, p, h, dtype))
                    if kind == "mxfp4":  # random scales: blocks far below their group's largest round
                        got = wc.decode_rows_triton(p, kind, h, dtype, fp8_groups=True)[0]
                        ref = wc.mxfp4_fp8_groups(p, h)
                        out[f"decode{i}_fp8_groups_{dtype}_{h}"] = (_equal(got[0].view(torch.uint8),
                                                                           ref[0].view(torch.uint8))
                                                                    and _equal(got[1], ref[1]))
    # Routing: logical experts -> rank and local slot, replicas picked per token; every rank's view.
    from moeserve.distributed.dispatch import Placement

    for e, r, redundant, t, k in ((16, 2, 0, 9, 4), (16, 4, 4, 70, 6), (8, 2, 6, 5, 1)):
        placement = Placement(torch.randperm(e + redundant) % e, e, r)  # shuffled, replicas anywhere
        table = placement.replica_slots(), placement.replica_count()
        ids = torch.rand(t, e).argsort(dim=1)[:, :k]
        ids[torch.rand(t, k) < 0.2] = -1
        for rank in range(r):
            got = wc.route_triton(ids, *table, rank, placement.slots_per_rank, r, with_hit=True)
            ref = wc.route_ref(ids, *table, rank, placement.slots_per_rank, r, with_hit=True)
            out[f"route_{e}_{r}_{redundant}_{rank}"] = all(_equal(a, b) for a, b in zip(got, ref))
    # The row maps, with metadata: high-throughput slots and the low-latency fixed layout.
    for kind in KINDS:
        for dtype in (torch.float32, torch.float16):
            h, t, k, r = 192, 6, 3, 3
            x = nasty_rows(t, h, dtype)
            dest, local, w = _routing(t, k, r)
            hit = (dest[None] == torch.arange(r)[:, None, None]).any(-1)
            slots = torch.where(hit, hit.view(-1).cumsum(0).view(r, t).to(torch.int32) - 1, -1)
            n = int(hit.sum())
            cap = t + 1  # a padding row per rank
            for name, args in (("slots", dict(num_rows=n, slots=slots)), ("fixed", dict(num_rows=r * cap, cap=cap))):
                rows_ref = wc.encode_rows_ref(x, kind, dtype, dest=dest, local=local, weights=w, **args)
                rows = wc.encode_rows_triton(x, kind, dtype, dest=dest, local=local, weights=w, **args)
                out[f"rows_{name}_{kind}_{dtype}"] = _equal(rows, rows_ref)
                dec = wc.decode_rows_triton(rows_ref, kind, h, dtype, k)
                dec_ref = wc.decode_rows_ref(rows_ref, kind, h, dtype, k)
                out[f"decode_rows_{name}_{kind}_{dtype}"] = all(_equal(a, b) for a, b in zip(dec, dec_ref))
                out.update(_fp8_group_cases(rows_ref, kind, h, dtype, k, dec_ref[0], f"{name}_{kind}_{dtype}"))
                # Combine what came back: each row decoded and summed per token, fp32 and fp16 out.
                back = wc.encode_ref(kind, torch.randn(args["num_rows"], h).to(dtype), dtype)
                row_map = dict(slots=slots) if name == "slots" else dict(cap=cap, dest=dest)
                for out_dtype in (torch.float32, dtype):
                    y = wc.combine_rows_triton(back, kind, h, dtype, out_dtype, t, **row_map)
                    y_ref = wc.combine_rows_ref(back, kind, h, dtype, out_dtype, t, **row_map)
                    out[f"combine_{name}_{kind}_{dtype}_{out_dtype}"] = _equal(y, y_ref)
    out.update(_config_cases())
    return out


def _fp8_group_cases(rows, kind, h, dtype, k, decoded, tag) -> dict[str, bool]:
    """Decoding into FP8 experts' input (fp8_groups): the kernel equals the reference, both equal
    the group quantization fused_moe applies to the plainly decoded rows (an fp8 payload: its own
    bytes, viewed in place; an mxfp4 one: its exact conversion, mxfp4_fp8_groups), and rows that
    carry no expert decode to zeros when live_only."""
    from moeserve.kernels import fp8 as f8
    from moeserve.kernels import wire_codecs as wc

    (q, s), ids, w = wc.decode_rows_triton(rows, kind, h, dtype, k, fp8_groups=True)
    (q_ref, s_ref), ids_ref, w_ref = wc.decode_rows_ref(rows, kind, h, dtype, k, fp8_groups=True)
    want = {"fp8": lambda: wc.fp8_view(rows, h), "mxfp4": lambda: wc.mxfp4_fp8_groups(rows, h)}.get(
        kind, lambda: f8.per_token_group_quant_fp8_triton(decoded, 128))()
    bits = [t.view(torch.uint8) if t.dtype == f8.FP8_DTYPE else t for t in (q, s, q_ref, s_ref, *want)]
    out = {f"fp8_groups_{tag}": _equal(bits[0], bits[2]) and _equal(bits[1], bits[3]) and _equal(ids, ids_ref)
           and _equal(w, w_ref),
           f"fp8_groups_as_fused_moe_{tag}": _equal(bits[0], bits[4]) and _equal(bits[1], bits[5])}
    if kind != "fp8":
        (q, s), ids, _ = wc.decode_rows_triton(rows, kind, h, dtype, k, live_only=True, fp8_groups=True)
        (q_ref, s_ref), _, _ = wc.decode_rows_ref(rows, kind, h, dtype, k, live_only=True, fp8_groups=True)
        dead = ~(ids >= 0).any(dim=1)
        out[f"fp8_groups_live_{tag}"] = (_equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and _equal(s, s_ref)
                                         and not q[dead].view(torch.uint8).any())
    return out


def _config_cases() -> dict[str, bool]:
    """Other (values per program, warps) than the defaults: one program per row and several, rows
    whose 32-bit scales and metadata are aligned (word stores) and not, and combine's loop over
    ranks not unrolled."""
    from moeserve.kernels import wire_codecs as wc

    out = {}
    saved = dict(wc.TUNING), wc.SMALL, wc.MIN_PROGRAMS, wc.COMBINE_UNROLL
    try:
        for chunk, unroll in ((2048, 8), (256, 0)):
            for key in wc.TUNING:
                wc.TUNING[key] = (chunk, 2)
            wc.MIN_PROGRAMS, wc.COMBINE_UNROLL = 0, unroll
            for kind in KINDS:
                for h in (1152, 1184):  # 1152: words aligned; 1184: the mxfp4 metadata is not (592 + 37 bytes)
                    t, k, r = 5, 4, 3
                    x = nasty_rows(t, h, torch.float32)
                    dest, local, w = _routing(t, k, r)
                    hit = (dest[None] == torch.arange(r)[:, None, None]).any(-1)
                    slots = torch.where(hit, hit.view(-1).cumsum(0).view(r, t).to(torch.int32) - 1, -1)
                    n = int(hit.sum())
                    for name, args, row_map in (("slots", dict(num_rows=n, slots=slots), dict(slots=slots)),
                                                ("fixed", dict(num_rows=r * t, cap=t), dict(cap=t, dest=dest))):
                        tag = f"{chunk}_{name}_{kind}_{h}"
                        rows_ref = wc.encode_rows_ref(x, kind, torch.float32, dest=dest, local=local, weights=w, **args)
                        rows = wc.encode_rows_triton(x, kind, torch.float32, dest=dest, local=local, weights=w, **args)
                        out[f"cfg_rows_{tag}"] = _equal(rows, rows_ref)
                        dec = wc.decode_rows_triton(rows_ref, kind, h, torch.float32, k)
                        ref = wc.decode_rows_ref(rows_ref, kind, h, torch.float32, k)
                        out[f"cfg_decode_{tag}"] = all(_equal(a, b) for a, b in zip(dec, ref))
                        back = wc.encode_ref(kind, torch.randn(args["num_rows"], h), torch.float32)
                        y = wc.combine_rows_triton(back, kind, h, torch.float32, torch.float32, t, **row_map)
                        y_ref = wc.combine_rows_ref(back, kind, h, torch.float32, torch.float32, t, **row_map)
                        out[f"cfg_combine_{tag}"] = _equal(y, y_ref)
    finally:
        wc.TUNING.update(saved[0])
        wc.SMALL, wc.MIN_PROGRAMS, wc.COMBINE_UNROLL = saved[1:]
    return out


def _random_payload(kind: str, n: int, h: int, dtype: torch.dtype) -> torch.Tensor:
    from moeserve.kernels import wire_codecs as wc

    p = torch.randint(0, 256, (n, wc.payload_bytes(kind, h, dtype)), dtype=torch.uint8)
    if kind == "fp8":
        q = p[:, :h]
        q[(q & 0x7F) == 0x7F] = 0x11  # e4m3fn's NaN codes are never sent
        p[:, h:] = (torch.rand(n, -(-h // 128)) * 10.0 ** torch.randint(-30, 30, (n, 1))).view(torch.uint8)
    elif kind == "mxfp4":
        p[:, h // 2:] = torch.randint(0, 255, (n, h // 32), dtype=torch.uint8)  # 255 is e8m0's NaN
    else:
        p = wc.encode_ref(kind, torch.randn(n, h) * 100, dtype)
    return p


# ---- two gloo ranks: the Triton path equals the torch path ---------------------------------------

def _ep_ranks(rank, world):
    import torch.distributed as dist

    from moeserve.distributed.dispatch import Dispatcher, Placement

    h, e, k, cap = 192, 16, 4, 12
    g = torch.Generator().manual_seed(100 + rank)
    placement = Placement.contiguous(e, world, num_redundant=world)
    out = {}
    cases = [(7, "none", "none", torch.float32), (7, "fp8", "fp8", torch.float16), (7, "mxfp4", "fp8", torch.float32),
             (12, "mxfp4", "none", torch.float16),  # a full low-latency buffer
             (0 if rank else 5, "mxfp4", "fp8", torch.float32)]  # a rank with no tokens
    for n, dcodec, ccodec, dtype in cases:
        x = torch.randn(n, h, generator=g) * 10.0 ** torch.randint(-3, 4, (n, 1), generator=g)
        ids = torch.rand(n, e, generator=g).argsort(dim=1)[:, :k]
        ids[:1, -1] = -1  # a dropped expert
        w = torch.rand(n, k, generator=g)
        # ht2, ll5: pipelined chunks (ll5: some of 5 empty); llp: ll over peer memory, whose kernels
        # store into the other process's shared buffer and meet at the device barrier (interpreted)
        torch_path = {}  # backend -> its torch-path results
        for backend in ("ht", "ll", "ht2", "ll5", "llp"):
            res = []
            for kernels in ("torch", "triton"):
                chunks = int(backend[2:]) if backend[2:].isdigit() else 1
                d = Dispatcher(dist.group.WORLD, placement, h, dtype, dcodec, ccodec, mode=backend[:2], ll_capacity=cap,
                               kernels=kernels, ht_chunks=chunks, ll_chunks=chunks,
                               ll_transport="peer" if backend == "llp" else "collective")
                for _ in range(2):  # the peer buffers' second use: rows left from the first are not read
                    recv_x, recv_ids, recv_w, handle = d.dispatch(x.to(dtype), ids, w)
                    expert_out = (recv_x.float() * 1.5 - 0.25).to(dtype)  # any per-row function
                    y = d.combine(expert_out, handle)
                live = (recv_ids >= 0).any(dim=1)  # llp sends no payload for rows that carry nothing
                res.append((recv_x[live], recv_ids, recv_w, y))
            out[f"{n}_{dcodec}+{ccodec}_{dtype}_{backend}"] = all(_equal(a, b) for a, b in zip(*res))
            torch_path[backend] = res[0]
        # the peer transport delivers what the collective one does
        out[f"{n}_{dcodec}+{ccodec}_{dtype}_llp_vs_ll"] = all(
            _equal(a, b) for a, b in zip(torch_path["llp"], torch_path["ll"]))
    out.update(_expert_inputs(rank, world, placement, h, e, k, cap))
    return out


def _expert_inputs(rank, world, placement, h, e, k, cap):
    """The experts behind expert parallelism, fed by each dispatch wire. FP8 experts take the
    received rows as FP8 groups (x_fp8): an fp8 dispatch payload is the sender's own activation
    quantization, the one fused_moe applies, so the layer equals the single-process fused_moe up to
    the order of the final sums (< 1e-5, fp32); likewise the raw wire (its rows quantized in the
    decode). An mxfp4 payload is decoded: FP8 experts then equal the single process fed its exact
    FP8 groups (mxfp4_fp8_groups), fp32 experts the single process on the decoded rows, both < 1e-5.
    Each backend and transport; the relative errors are returned (squared, summed over ranks by the
    caller)."""
    import torch.distributed as dist

    from moeserve.distributed.dispatch import Dispatcher
    from moeserve.distributed.ep_moe import ExpertParallelMoE
    from moeserve.kernels import wire_codecs as wc
    from moeserve.kernels.fp8 import quant_block_fp8_ref
    from moeserve.kernels.fused_moe import fused_moe

    g = torch.Generator().manual_seed(5)  # the same experts on every rank
    inter, block = 64, (128, 128)
    w13, w2 = torch.randn(e, 2 * inter, h, generator=g) / h ** 0.5, torch.randn(e, h, inter, generator=g) / inter ** 0.5
    (q13, s13), (q2, s2) = quant_block_fp8_ref(w13, block), quant_block_fp8_ref(w2, block)
    gr = torch.Generator().manual_seed(50 + rank)
    n = 9 if rank == 0 else 4
    x = torch.randn(n, h, generator=gr)
    ids = torch.rand(n, e, generator=gr).argsort(dim=1)[:, :k]
    w = torch.rand(n, k, generator=gr)
    fp8 = (q13, q2, w, ids, s13, s2, block)
    on_mxfp4 = wc.mxfp4_encode(x)
    refs = {("fp8", "none"): fused_moe(x, *fp8), ("fp8", "fp8"): fused_moe(x, *fp8),
            ("fp8", "mxfp4"): fused_moe(None, *fp8, x_fp8=wc.mxfp4_fp8_groups(on_mxfp4, h), out_dtype=x.dtype),
            ("fp32", "mxfp4"): fused_moe(wc.mxfp4_decode(on_mxfp4, h, x.dtype), w13, w2, w, ids)}
    mine = placement.rank_experts(rank)
    out = {}
    for (experts, dcodec), ref in refs.items():
        for backend in ("ht", "ll", "llp"):
            d = Dispatcher(dist.group.WORLD, placement, h, torch.float32, dcodec, "none", mode=backend[:2],
                           ll_capacity=cap, ll_transport="peer" if backend == "llp" else "collective")
            weights = (q13[mine], q2[mine], s13[mine], s2[mine]) if experts == "fp8" else (w13[mine], w2[mine])
            layer = ExpertParallelMoE(d, placement, *weights, block=block)
            if layer.takes_fp8_groups(x) != (experts == "fp8"):
                raise AssertionError(f"{experts} experts: takes_fp8_groups {layer.takes_fp8_groups(x)}")
            y = layer(x, ids, w)
            out[f"experts_{experts}_{dcodec}_{backend}"] = (float((y - ref).pow(2).sum()), float(ref.pow(2).sum()))
    return out


def _interpreter_cases() -> dict[str, bool]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ep_launch import run_ranks

    out = _kernel_cases()
    # The device check in benchmarks/ep_bench.py (bf16 there), run here in fp32 so that it cannot rot.
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from ep_bench import check_kernels

    out["ep_bench_check_kernels"] = check_kernels(192, 4, torch.device("cpu"), torch.float32).endswith("references")
    ranks = run_ranks(_ep_ranks, 2, timeout_s=300)
    for rank, res in enumerate(ranks):
        out.update({f"ep_rank{rank}_{name}": ok for name, ok in res.items() if not name.startswith("experts_")})
    for name in (n for n in ranks[0] if n.startswith("experts_")):
        err, norm = (sum(r[name][i] for r in ranks) for i in (0, 1))
        out[name] = (err / norm) ** 0.5 < 1e-5
        print(name, f"{(err / norm) ** 0.5:.2e}", file=sys.stderr)
    return out


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreted(__file__, timeout_s=600)


def test_triton_row_kernels_match_the_torch_references(interpreter_results):
    seed = interpreter_results.pop("seed")
    assert len(interpreter_results) > 100
    failed = [name for name, ok in interpreter_results.items() if not ok]
    assert not failed, f"seed {seed}: {failed}"


# ---- plain CPU ------------------------------------------------------------------------------------

def test_wire_kernel_bench_smoke(tmp_path):
    """benchmarks/wire_kernel_bench.py --smoke --tune: tiny shapes on CPU under the interpreter, end to end
    (tuning at 2 and 4 ranks: from 4 on, combine's fp8 config comes from another table)."""
    bench = os.path.join(REPO, "benchmarks", "wire_kernel_bench.py")
    proc = subprocess.run([sys.executable, bench, "--smoke", "--tune", "--tune-ranks", "2,4", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "wire_kernels.json").read_text())
    assert report["cases"] and all(r["exact"] for r in report["cases"])
    assert {r["op"] for r in report["cases"]} == {"route", "encode", "decode", "combine"}
    assert {r["layout"] for r in report["cases"] if r["op"] == "encode"} == {"ht", "ll", "plain"}
    assert report["tune"]["best"] and all(r["exact"] for r in report["tune"]["candidates"])
    assert {r["R"] for r in report["tune"]["candidates"]} == {2, 4}
    assert report["tuning_many_ranks"] == {"combine/fp8": [4096, 8]}
    assert proc.stdout.strip().splitlines()[-1].startswith("|")  # the table comes last


def test_references_cover_the_row_maps():
    """encode_rows_ref's layouts, read back by hand: slots rows, fixed rows, zero padding, ids -1."""
    from moeserve.kernels import wire_codecs as wc

    x = torch.randn(3, 64)
    dest = torch.tensor([[0, 2], [1, 0], [2, 2]])  # 2 ranks: token 2 goes nowhere
    local = torch.tensor([[4, -1], [1, 3], [-1, -1]])
    w = torch.rand(3, 2)
    bpt = 64 * 4
    rows = wc.encode_rows_ref(x, "none", torch.float32, 2 * 4, cap=4, dest=dest, local=local, weights=w)
    view = rows.view(2, 4, -1)
    assert torch.equal(view[0, 0, :bpt].view(torch.float32), x[0])
    assert torch.equal(view[1, 1, :bpt].view(torch.float32), x[1])
    assert not view[1, 0, :bpt].any() and not view[:, 2:, :bpt].any()  # no expert there, padding
    ids = view[..., bpt:bpt + 8].clone().view(torch.int32)
    assert ids[0, 0].tolist() == [4, -1] and ids[0, 1].tolist() == [-1, 3] and ids[1, 1].tolist() == [1, -1]
    assert (ids[:, 2:] == -1).all() and (ids[1, 0] == -1).all()
    slots = torch.tensor([[0, 1, -1], [-1, 2, -1]], dtype=torch.int32)
    rows = wc.encode_rows_ref(x, "none", torch.float32, 3, slots=slots, dest=dest, local=local, weights=w)
    assert torch.equal(rows[:, :bpt].clone().view(torch.float32), x[[0, 1, 1]])
    y = wc.combine_rows_ref(rows[:, :bpt], "none", 64, torch.float32, torch.float32, 3, slots=slots)
    assert torch.equal(y, torch.stack([x[0], x[1] + x[1], torch.zeros(64)]))


def test_mxfp4_as_fp8_groups_is_exact():
    """mxfp4_fp8_groups loses nothing where a group's blocks are within 2^14 of each other (every
    encoded activation row here), and rounds to nearest even below that: value * scale is the
    decoded value, exactly; the largest block reaches into e4m3's top binade; a zero row is zeros."""
    from moeserve.kernels import wire_codecs as wc

    for h in (7168, 96, 160):  # V3's hidden, a short last group, two and a half groups
        x = torch.randn(6, h) * torch.logspace(-3, 3, 6)[:, None]
        x[:, :32] *= 1e-3  # one block 2^10 below its group's others
        x[5] = 0
        payload = wc.mxfp4_encode(x)
        q, scale = wc.mxfp4_fp8_groups(payload, h)
        g = -(-h // 128)
        assert q.shape == (6, h) and scale.shape == (6, g)
        values = torch.nn.functional.pad(q.to(torch.float32), (0, g * 128 - h)).view(6, g, 128) * scale[..., None]
        assert torch.equal(values.view(6, -1)[:, :h], wc.mxfp4_decode(payload, h, torch.float32))
        largest = q[:5].to(torch.float32).abs().amax(dim=1)  # the largest block's largest code, 4 or 6, times 2^6
        assert ((largest == 256) | (largest == 384)).all() and not q[5].to(torch.float32).any()
    # A block 2^18 below its group's largest: 6 * 2^(6 - 18) = 0.75 * 2^-9 rounds to e4m3's smallest
    # subnormal, 2^-9 (exact down to 2^-14: 0.5 * 2^(6 - 14) = 2^-9)
    payload = wc.mxfp4_encode(torch.cat([torch.full((1, 32), 6.0 * 2.0 ** -18), torch.full((1, 96), 6.0)], dim=1))
    q, scale = wc.mxfp4_fp8_groups(payload, 128)
    assert q[0, 0].to(torch.float32) == 2.0 ** -9 and q[0, 32].to(torch.float32) == 384
    assert scale[0, 0] == 2.0 ** -6  # 6.0 is code 6 with shared exponent 0: 2^(0 - MX_FP8_SHIFT)


def test_raw_decode_is_a_view_and_raw_encode_no_copy():
    from moeserve.kernels import wire_codecs as wc

    rows = torch.randint(0, 255, (5, 2 * 96 + 32), dtype=torch.uint8)
    x, ids, w = wc.decode_rows(rows, "none", 96, torch.bfloat16, k=4)
    assert x.data_ptr() == rows.data_ptr() and x.stride(0) == rows.shape[1] // 2 and ids.shape == (5, 4)
    y = torch.randn(4, 96, dtype=torch.bfloat16)
    assert wc.encode_rows(y, "none", torch.bfloat16).data_ptr() == y.data_ptr()


if __name__ == "__main__":
    print_interpreter_cases(_interpreter_cases)
