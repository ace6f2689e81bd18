"""Wire codecs of expert-parallel payloads, fused with the row copies of dispatch and combine.

Four operations, each a plain-torch reference (`*_ref`, the specification) and a Triton kernel
that does it in one pass (one launch):

  route         logical expert ids [T, k] -> destination rank and local slot of each, and which
                ranks each token goes to
  encode_rows   x [T, H] -> send rows: gather (token t goes to every rank that holds one of its
                experts), encode, and write the routing metadata, straight into the send buffer
  decode_rows   receive rows -> activations [N, H] and the metadata, straight from the buffer
  combine_rows  returned rows -> y [T, H]: decode each token's partial sums and add them up

Codec kinds, the payload at the start of a row (wire.py explains the formats):
  "none"   [H * itemsize]  the wire dtype's raw bytes
  "fp8"    [H] e4m3, then [4 * ceil(H / 128)] fp32 scales (amax / 448 per 128 values)
  "mxfp4"  [H / 2] e2m1 pairs (element 2i in the low nibble), then [H / 32] e8m0 scales
Dispatch rows carry, after the payload, k int32 local expert slots (-1: not on this rank) and k
fp32 router weights for the receiving rank, stored byte by byte (the payload length need not be
a multiple of 4).

The references are the specification as torch computes it on the CPU; the kernels give the same
bytes and values (tests/distributed/test_wire_kernels.py under the interpreter, ep_bench.py's check
in bf16 on the GPU). The torch ops are not the specification on CUDA: there `amax / 448` is a
multiply by the reciprocal, which moves some fp8 scales by an ulp. Inputs are finite (inf and NaN
give unspecified bytes).

Which row holds token t for rank r (encode_rows and combine_rows):
  slots [R, T]  row slots[r, t] where >= 0; nothing else is written (high-throughput: only the
                rows that exist, grouped by rank)
  cap           row r * cap + t for every r and t < cap (low-latency: fixed shapes); a row whose
                token is padding (t >= T), or has no expert on rank r, carries zeros and ids -1
  neither       row t (one rank): plain encode
`out=` writes into a given buffer, so that a caller can fill one buffer chunk by chunk.

The peer transport (dispatch.py, peer_memory.py) uses the cap layout without a send buffer:
encode_peers stores rank r's rows straight into rank r's own buffer (rows rank * cap + t there,
this rank's block), the payload only of rows that carry a token; encode_back sends the expert
output's rows back the same way; decode_rows(live_only=True) reads only the rows that carry one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from moeserve.kernels.fp8 import FP8_DTYPE, per_token_group_quant_fp8_ref, triton, triton_runs_on

if triton is not None:
    import triton.language as tl

    from moeserve.kernels.fp8 import _cast_to, _quant_group_tile, _round_to_e4m3

RAW, FP8, MXFP4 = "none", "fp8", "mxfp4"
KINDS = (RAW, FP8, MXFP4)
FP8_GROUP = 128
MX_BLOCK = 32
E2M1_EMAX = 2  # exponent of the largest e2m1 normal (6 = 1.5 * 2^2)
E2M1_MAX = 6.0
E8M0_BIAS = 127
# An mxfp4 payload handed to FP8 experts as FP8 groups (mxfp4_fp8_groups): each value is its e2m1 code
# times 2^(its block's exponent - the group's largest + MX_FP8_SHIFT), so the largest block's values
# (<= 6 * 2^6 = 384) fill e4m3's range (448) and a block up to 2^14 below the largest stays exact.
MX_FP8_SHIFT = 6
# Magnitudes of the 8 e2m1 codes, and the midpoints between neighbours (rounding boundaries).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
ENV_KERNELS = "MOESERVE_WIRE_KERNELS"  # "torch" forces the references
if triton is not None:
    MX_FP8_SHIFT_C = tl.constexpr(MX_FP8_SHIFT)  # the kernels' copy


@dataclass
class PeerRows:
    """Rows in every rank's buffer (the peer transport): views[r] is rank r's rows [R * cap, row_bytes]
    as this process maps them, table[r] their address (int64 [R], on the device) for the kernels.
    This rank writes only its own block of each, rows rank * cap .. (rank + 1) * cap."""

    views: list
    table: torch.Tensor
    rank: int


def payload_bytes(kind: str, hidden: int, dtype: torch.dtype) -> int:
    if kind == RAW:
        return hidden * dtype.itemsize
    if kind == FP8:
        return hidden + 4 * -(-hidden // FP8_GROUP)
    if kind == MXFP4:
        if hidden % MX_BLOCK:
            raise ValueError(f"mxfp4 needs hidden % {MX_BLOCK} == 0, got {hidden}")
        return hidden // 2 + hidden // MX_BLOCK
    raise ValueError(f"unknown wire codec {kind!r}; choose from {list(KINDS)}")


def bytes_as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """View uint8 columns [N, n * itemsize] as dtype [N, n], copying when the slice is misaligned."""
    if not t.is_contiguous() or t.storage_offset() % dtype.itemsize:
        t = t.clone(memory_format=torch.contiguous_format)
    return t.view(dtype)


def raw_view(rows: torch.Tensor, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """The raw payload of rows [N, row_bytes] as dtype [N, hidden]: a strided view into the
    buffer when the rows are aligned (no copy), else a copy."""
    n = dtype.itemsize
    if rows.shape[0] == 0:
        return torch.empty(0, hidden, dtype=dtype, device=rows.device)
    if rows.is_contiguous() and rows.shape[1] % n == 0 and rows.storage_offset() % n == 0:
        return rows.view(dtype)[:, :hidden]
    return bytes_as(rows[:, :hidden * n], dtype).reshape(rows.shape[0], hidden)


def fp8_view(rows: torch.Tensor, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp8 payload of rows [N, row_bytes] as FP8 experts take their input: (e4m3 [N, hidden],
    fp32 scales [N, ceil(hidden / 128)]), strided views into the buffer (the scales copied if
    misaligned). The payload is per_token_group_quant_fp8's output, so nothing is decoded."""
    groups = -(-hidden // FP8_GROUP)
    q = rows[:, :hidden].view(FP8_DTYPE)
    if rows.shape[0] and rows.is_contiguous() and rows.shape[1] % 4 == 0 and rows.storage_offset() % 4 == 0 \
            and hidden % 4 == 0:
        return q, rows.view(torch.float32)[:, hidden // 4:hidden // 4 + groups]
    return q, bytes_as(rows[:, hidden:hidden + 4 * groups], torch.float32)


def in_place(kind: str, fp8_groups: bool) -> bool:
    """Whether decode hands over the payload as it lies (a view): the raw payload as activations,
    the fp8 payload as FP8 groups."""
    return kind == (FP8 if fp8_groups else RAW)


def payload_view(rows: torch.Tensor, kind: str, hidden: int, dtype: torch.dtype):
    return fp8_view(rows, hidden) if kind == FP8 else raw_view(rows, hidden, dtype)


def empty_decoded(n: int, hidden: int, dtype: torch.dtype, fp8_groups: bool, device):
    """Room for n decoded rows: [n, hidden] dtype, or FP8 groups (e4m3 [n, hidden], fp32 [n, groups])."""
    if fp8_groups:
        return (torch.empty(n, hidden, dtype=FP8_DTYPE, device=device),
                torch.empty(n, -(-hidden // FP8_GROUP), dtype=torch.float32, device=device))
    return torch.empty(n, hidden, dtype=dtype, device=device)


# ----------------------------------------------------------------------------- torch: codecs


def e2m1_round(v: torch.Tensor) -> torch.Tensor:
    """Magnitudes v >= 0 (already scaled) -> e2m1 codes 0..7: round to nearest, ties to the even
    code, values above 6 saturate to code 7 (6.0), as the OCP MX spec allows for FP4.

    The grid step is 0.5 below 2, 1 in [2, 4), 2 from 4 on; torch.round (half to even) on v / step
    gives an integer whose parity is the code's, and the code is that integer + 0, 2 or 4.
    """
    v = v.to(torch.float32)
    step = torch.where(v < 2, 0.5, torch.where(v < 4, 1.0, 2.0))
    offset = torch.where(v < 2, 0.0, torch.where(v < 4, 2.0, 4.0))
    return (torch.round(v / step) + offset).clamp(max=7).to(torch.uint8)


def e2m1_value(code: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 (bit 3 = sign) -> fp32 values: 0.5*m when the exponent field is 0, else 2^(e-1) * (1 + m/2)."""
    c = code.to(torch.int32)
    e, m = ((c >> 1) & 3).to(torch.float32), (c & 1).to(torch.float32)
    mag = torch.where(e == 0, 0.5 * m, torch.exp2(e - 1) * (1 + 0.5 * m))
    return torch.where((c & 8) != 0, -mag, mag)


def mxfp4_encode(x: torch.Tensor) -> torch.Tensor:
    t, h = x.shape
    blocks = x.to(torch.float32).view(t, h // MX_BLOCK, MX_BLOCK)
    amax = blocks.abs().amax(dim=-1)
    # frexp: amax = m * 2^e with m in [0.5, 1), so floor(log2(amax)) = e - 1, exactly.
    _, e = torch.frexp(amax)
    shared = torch.where(amax > 0, e - 1 - E2M1_EMAX, -E8M0_BIAS).clamp(-E8M0_BIAS, E8M0_BIAS)
    scaled = blocks * torch.exp2(-shared.to(torch.float32))[..., None]
    codes = e2m1_round(scaled.abs()) | ((scaled < 0).to(torch.uint8) << 3)
    codes = codes.view(t, h // 2, 2)
    packed = codes[..., 0] | (codes[..., 1] << 4)
    return torch.cat([packed, (shared + E8M0_BIAS).to(torch.uint8)], dim=1)


def _mxfp4_fields(payload: torch.Tensor, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An mxfp4 payload -> (e2m1 codes [N, hidden / 32, 32], e8m0 scales [N, hidden / 32] int64)."""
    packed = payload[:, :hidden // 2]
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).view(payload.shape[0], hidden // MX_BLOCK, MX_BLOCK)
    return codes, payload[:, hidden // 2:hidden // 2 + hidden // MX_BLOCK].to(torch.int64)


def mxfp4_decode(payload: torch.Tensor, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    codes, e8m0 = _mxfp4_fields(payload, hidden)
    shared = e8m0.to(torch.float32) - E8M0_BIAS
    return (e2m1_value(codes) * torch.exp2(shared)[..., None]).view(payload.shape[0], hidden).to(dtype)


def mxfp4_fp8_groups(payload: torch.Tensor, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An mxfp4 payload [N, >= payload_bytes] as FP8 groups, (e4m3 [N, hidden], fp32 [N, ceil(hidden / 128)]),
    without rounding: the four e8m0 scales of a 128-value group differ by powers of two, so each value
    is its e2m1 code shifted by its block's exponent relative to the group's largest (MX_FP8_SHIFT
    above it), and the group's scale is that largest power of two. Exact where a block is within
    2^14 of its group's largest (smaller values round to e4m3, to nearest even); no amax, no division.
    What FP8 experts compute on an mxfp4 payload (decode_rows fp8_groups)."""
    t, nb, g = payload.shape[0], hidden // MX_BLOCK, -(-hidden // FP8_GROUP)
    codes, e8m0 = _mxfp4_fields(payload, hidden)
    per = FP8_GROUP // MX_BLOCK  # mxfp4 blocks a group
    pad = g * per - nb  # a short last group: empty blocks, e8m0 0 (never the largest)
    codes = torch.nn.functional.pad(codes, (0, 0, 0, pad)).view(t, g, per, MX_BLOCK)
    e8m0 = torch.nn.functional.pad(e8m0, (0, pad)).view(t, g, per)
    emax = e8m0.amax(dim=2, keepdim=True)
    shift = torch.exp2((e8m0 - emax).clamp(min=-132).to(torch.float64) + MX_FP8_SHIFT)  # float64: exact
    q = (e2m1_value(codes).to(torch.float64) * shift[..., None]).to(torch.float32).to(FP8_DTYPE)
    scale = torch.exp2(emax[..., 0].to(torch.float64) - E8M0_BIAS - MX_FP8_SHIFT).to(torch.float32)
    return q.view(t, g * FP8_GROUP)[:, :hidden], scale


def fp8_encode(x: torch.Tensor) -> torch.Tensor:
    # DeepSeek's per-1x128 activation quantization, the one its FP8 GEMMs use.
    q, scale = per_token_group_quant_fp8_ref(x, FP8_GROUP)
    return torch.cat([q.view(torch.uint8), scale.contiguous().view(torch.uint8)], dim=1)


def fp8_decode(payload: torch.Tensor, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    t = payload.shape[0]
    groups = -(-hidden // FP8_GROUP)
    q = bytes_as(payload[:, :hidden], FP8_DTYPE).to(torch.float32)
    scale = bytes_as(payload[:, hidden:hidden + 4 * groups], torch.float32)
    q = torch.nn.functional.pad(q, (0, groups * FP8_GROUP - hidden)).view(t, groups, FP8_GROUP)
    return (q * scale[..., None]).view(t, groups * FP8_GROUP)[:, :hidden].to(dtype)


def encode_ref(kind: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x [T, H] -> payload uint8 [T, payload_bytes]."""
    t, h = x.shape
    if kind == RAW:
        return x.to(dtype).contiguous().view(torch.uint8).reshape(t, h * dtype.itemsize)
    if t == 0:  # torch cannot reinterpret the bytes of an empty scale tensor
        return torch.empty(0, payload_bytes(kind, h, dtype), dtype=torch.uint8, device=x.device)
    return fp8_encode(x) if kind == FP8 else mxfp4_encode(x)


def decode_ref(kind: str, payload: torch.Tensor, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """payload uint8 [N, >= payload_bytes] -> [N, hidden] in dtype."""
    if kind == RAW:
        return raw_view(payload, hidden, dtype)
    if payload.shape[0] == 0:
        return torch.empty(0, hidden, dtype=dtype, device=payload.device)
    return fp8_decode(payload, hidden, dtype) if kind == FP8 else mxfp4_decode(payload, hidden, dtype)


# ----------------------------------------------------------------------------- torch: routing


def physical_slots_ref(topk_ids, replica_slots, replica_count, rank: int) -> torch.Tensor:
    """topk_ids [T, k] logical experts (< 0: none) -> physical slots [T, k] (-1 where none); token t
    takes replica (t + rank) % replicas of its expert, so replicas share the load."""
    valid = topk_ids >= 0
    ids = topk_ids.clamp(min=0)
    token = torch.arange(topk_ids.shape[0], device=topk_ids.device)[:, None]
    replica = (token + rank) % replica_count[ids]
    return torch.where(valid, replica_slots[ids, replica], -1)


def route_ref(topk_ids, replica_slots, replica_count, rank: int, slots_per_rank: int, num_ranks: int,
              with_hit: bool = False):
    """-> dest rank [T, k] (num_ranks where none), local slot [T, k] (-1 where none), int64; and with_hit:
    hit [R, T] bool, token t has an expert on rank r."""
    slots = physical_slots_ref(topk_ids, replica_slots, replica_count, rank)
    dest = torch.where(slots >= 0, slots // slots_per_rank, num_ranks)
    local = torch.where(slots >= 0, slots % slots_per_rank, -1)
    hit = (dest[None] == torch.arange(num_ranks, device=dest.device)[:, None, None]).any(-1) if with_hit else None
    return dest, local, hit


# ----------------------------------------------------------------------------- torch: rows


def _row_map(num_ranks: int, num_tokens: int, slots, cap: int, dest):
    """-> rows [R, T] int64 (the row of token t for rank r), live [R, T] bool (that row carries it)."""
    if slots is not None:
        return slots.to(torch.int64), slots >= 0
    device = dest.device if dest is not None else None
    rank = torch.arange(num_ranks, device=device)[:, None]
    rows = rank * cap + torch.arange(num_tokens, device=device)[None, :]
    live = (dest[None] == rank[..., None]).any(-1) if dest is not None else torch.ones_like(rows, dtype=torch.bool)
    return rows, live


def encode_rows_ref(x, kind, dtype, num_rows, slots=None, cap=0, dest=None, local=None, weights=None, out=None):
    t, h = x.shape
    bpt = payload_bytes(kind, h, dtype)
    k = dest.shape[1] if dest is not None else 0
    out = torch.empty(num_rows, bpt + 8 * k, dtype=torch.uint8, device=x.device) if out is None else out
    num_ranks = slots.shape[0] if slots is not None else (num_rows // cap if cap else 0)
    if num_ranks == 0:
        return out
    rows, live = _row_map(num_ranks, t, slots, cap, dest)
    payload = encode_ref(kind, x, dtype).expand(num_ranks, t, bpt)
    meta = []
    if k:
        mine = dest[None] == torch.arange(num_ranks, device=x.device)[:, None, None]  # [R, T, k]
        ids = torch.where(mine, local[None], -1).to(torch.int32)
        w = torch.where(mine, weights[None].to(torch.float32), 0.0)
        meta = [ids.view(torch.uint8).reshape(num_ranks, t, 4 * k), w.view(torch.uint8).reshape(num_ranks, t, 4 * k)]
    if slots is None:  # every row of the fixed layout is written: no host sync, graph-capturable
        view = out.view(num_ranks, cap, -1)
        view[:, :t] = torch.cat([torch.where(live[..., None], payload, 0)] + meta, dim=-1)
        view[:, t:] = 0
        view[:, t:, bpt:bpt + 4 * k] = 0xFF  # padding rows: ids -1
    elif t:
        r, i = live.nonzero(as_tuple=True)
        out[rows[r, i]] = torch.cat([payload[r, i]] + [m[r, i] for m in meta], dim=-1)
    return out


def _store_to_peers_ref(rows, live, peers: PeerRows, cap: int, meta_from: int):
    """rows [R * cap, B], block r meant for rank r -> this rank's block of each rank's buffer: every
    row's bytes from meta_from on, and the payload (bytes before it) of live rows only."""
    for r, view in enumerate(peers.views):
        dst = view[peers.rank * cap:(peers.rank + 1) * cap]
        src, ok = rows[r * cap:(r + 1) * cap], live[r * cap:(r + 1) * cap]
        dst[:, meta_from:] = src[:, meta_from:]
        dst[ok] = src[ok]


def encode_peers_ref(x, kind, dtype, cap, dest, local, weights, peers: PeerRows):
    rows = encode_rows_ref(x, kind, dtype, len(peers.views) * cap, cap=cap, dest=dest, local=local, weights=weights)
    live = torch.zeros(len(peers.views), cap, dtype=torch.bool, device=x.device)
    live[:, :x.shape[0]] = _row_map(len(peers.views), x.shape[0], None, cap, dest)[1]
    _store_to_peers_ref(rows, live.reshape(-1), peers, cap, payload_bytes(kind, x.shape[1], dtype))


def encode_back_ref(x, kind, dtype, ids, cap, peers: PeerRows):
    rows = encode_ref(kind, x, dtype)
    _store_to_peers_ref(rows, (ids >= 0).any(dim=1), peers, cap, rows.shape[1])


def decode_rows_ref(rows, kind, hidden, dtype, k=0, out=None, live_only=False, fp8_groups=False):
    bpt = payload_bytes(kind, hidden, dtype)
    view = in_place(kind, fp8_groups)
    exact = fp8_groups and kind == MXFP4  # FP8 groups straight from the codes and scales, nothing decoded
    x = payload_view(rows, kind, hidden, dtype) if view else None if exact else decode_ref(kind, rows, hidden, dtype)
    if not (k and rows.shape[0]):  # torch cannot reinterpret empty byte columns
        ids = torch.empty(rows.shape[0], k, dtype=torch.int64, device=rows.device)
        w = torch.empty(rows.shape[0], k, dtype=torch.float32, device=rows.device)
    else:
        ids = bytes_as(rows[:, bpt:bpt + 4 * k], torch.int32).to(torch.int64)
        w = bytes_as(rows[:, bpt + 4 * k:bpt + 8 * k], torch.float32)
    if view:
        if out is None:
            return x, ids, w
        out[1].copy_(ids)
        out[2].copy_(w)
        return x, out[1], out[2]
    live = (ids >= 0).any(dim=1, keepdim=True) if live_only and k else None
    if exact:  # a dead row converts as zeros
        x = mxfp4_fp8_groups(rows if live is None else torch.where(live, rows, 0), hidden)
    else:
        if live is not None:
            x = torch.where(live, x, 0).to(x.dtype)
        if fp8_groups:  # what fused_moe would make of the decoded rows before its GEMMs
            x = per_token_group_quant_fp8_ref(x, FP8_GROUP) if x.shape[0] else empty_decoded(0, hidden, dtype, True,
                                                                                              x.device)
    if out is None:
        return x, ids, w
    for dst, src in zip(out[0] if fp8_groups else (out[0],), x if fp8_groups else (x,)):
        dst.copy_(src)
    out[1].copy_(ids)
    out[2].copy_(w)
    return out


def combine_rows_ref(rows, kind, hidden, dtype, out_dtype, num_tokens, slots=None, cap=0, dest=None, out=None):
    num_ranks = slots.shape[0] if slots is not None else (rows.shape[0] // cap if cap else 0)
    y = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=rows.device)
    if num_ranks and num_tokens and rows.shape[0]:
        index, live = _row_map(num_ranks, num_tokens, slots, cap, dest)
        for r in range(num_ranks):  # ranks in order, as the kernel adds them
            part = decode_ref(kind, rows[index[r].clamp(min=0)], hidden, dtype).to(torch.float32)
            y += torch.where(live[r, :, None], part, 0.0)
    return y.to(out_dtype) if out is None else out.copy_(y)


# ----------------------------------------------------------------------------- Triton
#
# Each program takes CHUNK values of one row (CHUNK a power of two, whole fp8 groups); the
# (CHUNK, num_warps) of each operation come from TUNING (benchmarks/wire_kernel_bench.py --tune
# times candidates). ALIGN (host-checked: the row stride, the buffer's address, the fp8 scales'
# and the metadata's offsets all multiples of 4) stores and loads the 32-bit scales and metadata as
# words instead of 4 bytes each. FAST (CUDA only, not the interpreter) lets the fp8 paths use the
# GPU's own e4m3 conversions, which round correctly (the interpreter's do not), and divide through
# the group's reciprocal with one FMA correction (Markstein: with y = RN(1/s) and q = RN(x y),
# RN(q + (x - s q) y) is the IEEE quotient RN(x / s)); both give the same bytes as the references
# (checked on the GPU by ep_bench.py and wire_kernel_bench.py).

if triton is not None:

    @triton.jit
    def _e2m1_code(v):
        # v = |x| / 2^X >= 0 -> code 0..7: nearest e2m1 value, ties to the even code, above 6 -> 6.
        # e2m1 keeps one mantissa bit above 1 and steps 0.5 below it, so round v to a multiple of
        # its step s = 2^(max(E, 0) - 1) (E = v's exponent) by adding M = 1.5 * 2^23 * s (the fp32
        # add rounds to nearest even at ulp(M) = s); the low bits of v + M are then n = round(v / s),
        # whose parity is the code's, and the code is n + 2 max(E, 0).
        v = tl.minimum(v, 6.0)
        e = tl.maximum(v.to(tl.int32, bitcast=True) >> 23, 127)
        magic = (((e + 22) << 23) | 0x400000).to(tl.float32, bitcast=True)
        n = (v + magic).to(tl.int32, bitcast=True) - magic.to(tl.int32, bitcast=True)
        return n + 2 * (e - 127)

    @triton.jit
    def _mxfp4_encode(x, NB: tl.constexpr):
        # x [NB * 32] fp32 -> (e2m1 pairs [NB * 16] uint8, e8m0 scales [NB] uint8)
        blocks = tl.reshape(x, [NB, 32])
        amax = tl.max(tl.abs(blocks), axis=1)
        # floor(log2(amax)) is amax's exponent field; zero and subnormal amax clamp to 2^-127.
        shared = tl.maximum(((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127 - 2, -127)
        inv = ((127 - shared) << 23).to(tl.float32, bitcast=True)  # 2^-shared, exact and normal
        s = blocks * inv[:, None]
        code = _e2m1_code(tl.abs(s)) | tl.where(s < 0, 8, 0)
        lo, hi = tl.split(tl.reshape(code, [NB, 16, 2]))
        return tl.reshape((lo | (hi << 4)).to(tl.uint8), [NB * 16]), (shared + 127).to(tl.uint8)

    @triton.jit
    def _fp8_encode(x, G: tl.constexpr, FAST: tl.constexpr):
        # x [G * 128] fp32 -> (e4m3 bytes [G * 128], fp32 scales [G]); div_rn: IEEE division, as
        # torch does it on CPU (the GPU's '/' is approximate).
        groups = tl.reshape(x, [G, 128])
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(groups), axis=1), 1e-10), 448.0)
        if FAST:
            rcp = tl.math.div_rn(tl.full([G], 1.0, tl.float32), scale)[:, None]
            q0 = groups * rcp
            q = tl.fma(tl.fma(-q0, scale[:, None], groups), rcp, q0)
            q = tl.clamp(q, -448.0, 448.0)
        else:
            q = _round_to_e4m3(tl.clamp(tl.math.div_rn(groups, scale[:, None]), -448.0, 448.0))
        return tl.reshape(q.to(tl.float8e4nv).to(tl.uint8, bitcast=True), [G * 128]), scale

    @triton.jit
    def _store_u32(ptr, v, mask, ALIGN: tl.constexpr):
        # 32-bit values [n] -> 4 little-endian bytes each at ptr + 4 i (as words when ALIGN).
        if ALIGN:
            tl.store(ptr.to(tl.pointer_type(tl.uint32)) + tl.arange(0, v.shape[0]), v.to(tl.uint32, bitcast=True),
                     mask=mask)
        else:
            b = tl.arange(0, 4)
            u = v.to(tl.uint32, bitcast=True)
            byte = ((u[:, None] >> (8 * b[None, :]).to(tl.uint32)) & 0xFF).to(tl.uint8)
            tl.store(ptr + 4 * tl.arange(0, v.shape[0])[:, None] + b[None, :], byte, mask=mask[:, None])

    @triton.jit
    def _load_u32(ptr, n: tl.constexpr, mask, ALIGN: tl.constexpr):
        if ALIGN:
            return tl.load(ptr.to(tl.pointer_type(tl.uint32)) + tl.arange(0, n), mask=mask, other=0)
        b = tl.arange(0, 4)
        byte = tl.load(ptr + 4 * tl.arange(0, n)[:, None] + b[None, :], mask=mask[:, None], other=0)
        return tl.sum(byte.to(tl.uint32) << (8 * b[None, :]).to(tl.uint32), axis=1)  # disjoint bits: sum == or

    @triton.jit
    def _e4m3_value(byte, FAST: tl.constexpr):
        if FAST:  # the GPU's conversion (e4m3 -> f16 -> f32 is exact)
            return byte.to(tl.float8e4nv, bitcast=True).to(tl.float32)
        b = byte.to(tl.int32)
        e, m = (b >> 3) & 15, b & 7
        normal = (((b & 0x80) << 24) | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
        sub = m.to(tl.float32) * 0.001953125 * tl.where(b >= 0x80, -1.0, 1.0)  # m * 2^-9
        return tl.where(e == 0, sub, normal)

    @triton.jit
    def _e2m1_value(code):
        # code (bit 3 = sign) -> value * 2^-126: the 3 magnitude bits at fp32 bits 22..24 are the
        # value's exponent and mantissa with e2m1's bias of 1 (code 1 = 0.5 becomes the subnormal
        # 2^-127, code 2 = 1.0 the normal 2^-126, ...), so that one exact multiply by 2^126 restores
        # it (fp32 multiplies keep subnormals: no flush to zero in Triton's code).
        bits = ((code & 7) << 22) | ((code & 8) << 28)
        return bits.to(tl.float32, bitcast=True) * 8.507059173023462e37  # 2^126

    @triton.jit
    def _e8m0_value(e8m0):
        # 2^(e8m0 - 127) is the fp32 whose exponent field is e8m0; e8m0 0 is the subnormal 2^-127.
        return tl.where(e8m0 == 0, 0x400000, e8m0 << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _mxfp4_fp8_group(codes, e8m0, FAST: tl.constexpr):
        # codes [R, NB, 32] and e8m0 [R, NB] (int32), one FP8 group a row -> (e4m3 [R, NB, 32], fp32
        # scales [R]): mxfp4_fp8_groups, the torch specification. 2^(d + MX_FP8_SHIFT) is built as
        # fp32 bits, normal for d >= -132 (any smaller shift flushes to zero in e4m3 anyway).
        emax = tl.max(e8m0, axis=1)
        d = tl.maximum(e8m0 - emax[:, None], -132)
        shift = ((d + 127 + MX_FP8_SHIFT_C) << 23).to(tl.float32, bitcast=True)
        q = _cast_to(_e2m1_value(codes) * shift[:, :, None], tl.float8e4nv, FAST)
        return q, _e8m0_value(emax) * (0.5 ** MX_FP8_SHIFT_C)

    @triton.jit
    def _load_mxfp4(row, chunk, hidden, live, CHUNK: tl.constexpr):
        # One chunk of a row's mxfp4 payload -> (codes [CHUNK / 32, 32], e8m0 [CHUNK / 32]), int32;
        # zeros where not live (nothing is read).
        NB: tl.constexpr = CHUNK // 32
        offs = chunk * (CHUNK // 2) + tl.arange(0, CHUNK // 2)
        packed = tl.load(row + offs, mask=tl.where(live, offs < hidden // 2, False), other=0).to(tl.int32)
        codes = tl.reshape(tl.join(packed & 15, packed >> 4), [NB, 32])
        b = chunk * NB + tl.arange(0, NB)
        e8m0 = tl.load(row + hidden // 2 + b, mask=tl.where(live, b < hidden // 32, False), other=0).to(tl.int32)
        return codes, e8m0

    @triton.jit
    def _store_payload(row, body, scale, live, chunk, hidden, KIND: tl.constexpr, WIRE: tl.constexpr,
                       CHUNK: tl.constexpr, ALIGN: tl.constexpr):
        # One chunk of a row's payload; zeros where the row is not live.
        if KIND == 0:
            offs = chunk * CHUNK + tl.arange(0, CHUNK)
            tl.store(row.to(tl.pointer_type(WIRE)) + offs, tl.where(live, body, 0.0), mask=offs < hidden)
        elif KIND == 1:
            offs = chunk * CHUNK + tl.arange(0, CHUNK)
            tl.store(row + offs, tl.where(live, body, 0), mask=offs < hidden)
            g = chunk * (CHUNK // 128) + tl.arange(0, CHUNK // 128)
            _store_u32(row + hidden + 4 * chunk * (CHUNK // 128), tl.where(live, scale, 0.0), g * 128 < hidden, ALIGN)
        else:
            offs = chunk * (CHUNK // 2) + tl.arange(0, CHUNK // 2)
            tl.store(row + offs, tl.where(live, body, 0), mask=offs < hidden // 2)
            b = chunk * (CHUNK // 32) + tl.arange(0, CHUNK // 32)
            tl.store(row + hidden // 2 + b, tl.where(live, scale, 0), mask=b < hidden // 32)

    @triton.jit
    def _load_payload(row, chunk, hidden, live, KIND: tl.constexpr, WIRE: tl.constexpr, CHUNK: tl.constexpr,
                      ALIGN: tl.constexpr, FAST: tl.constexpr):
        # One chunk of a row's payload -> fp32 [CHUNK], exactly as the references compute it
        # before their final cast; zeros where not live (nothing is read). Masks are
        # where(live, m, False), not `m & live`, which the interpreter cannot mask with.
        if KIND == 0:
            offs = chunk * CHUNK + tl.arange(0, CHUNK)
            v = tl.load(row.to(tl.pointer_type(WIRE)) + offs, mask=tl.where(live, offs < hidden, False), other=0.0)
            v = v.to(tl.float32)
        elif KIND == 1:
            G: tl.constexpr = CHUNK // 128
            offs = chunk * CHUNK + tl.arange(0, CHUNK)
            q = _e4m3_value(tl.load(row + offs, mask=tl.where(live, offs < hidden, False), other=0), FAST)
            g = chunk * G + tl.arange(0, G)
            scale = _load_u32(row + hidden + 4 * chunk * G, G, tl.where(live, g * 128 < hidden, False), ALIGN)
            v = tl.reshape(tl.reshape(q, [G, 128]) * scale.to(tl.float32, bitcast=True)[:, None], [CHUNK])
        else:
            codes, e8m0 = _load_mxfp4(row, chunk, hidden, live, CHUNK)
            v = tl.reshape(_e2m1_value(codes) * _e8m0_value(e8m0)[:, None], [CHUNK])
        return v

    @triton.jit
    def _encode_chunk(x_ptr, t, chunk, hidden, stride_x, has_token, KIND: tl.constexpr, WIRE: tl.constexpr,
                      CHUNK: tl.constexpr, FAST: tl.constexpr):
        # One chunk of row t of x -> (payload body, scales), zeros for no token.
        offs = chunk * CHUNK + tl.arange(0, CHUNK)
        # A branch rather than a mask on has_token: `offs < hidden` alone lets loads vectorize.
        if has_token:
            x = tl.load(x_ptr + t.to(tl.int64) * stride_x + offs, mask=offs < hidden, other=0.0).to(tl.float32)
        else:
            x = tl.zeros([CHUNK], dtype=tl.float32)
        if KIND == 0:
            body, scale = x.to(WIRE), 0
        elif KIND == 1:
            body, scale = _fp8_encode(x, CHUNK // 128, FAST)
        else:
            body, scale = _mxfp4_encode(x, CHUNK // 32)
        return body, scale

    @triton.jit
    def _peer_row(out_ptr, peers_ptr, r, row, stride):
        # Row `row` of rank r's buffer, through this process's mapping of it (address table peers_ptr),
        # written as out_ptr (this rank's own buffer, an argument) plus a distance: the compiler
        # knows an argument's alignment but takes a loaded address as unaligned, and would store
        # one byte at a time. The buffers are 256-byte aligned (PeerBuffers), so (d >> 4) << 4 == d
        # says what is true: the distance is a multiple of 16.
        distance = ((tl.load(peers_ptr + r) - out_ptr.to(tl.int64)) >> 4) << 4
        return out_ptr + distance + row.to(tl.int64) * stride

    @triton.jit(do_not_specialize=["num_tokens", "cap"])
    def _encode_rows_kernel(x_ptr, out_ptr, slots_ptr, dest_ptr, local_ptr, weight_ptr, peers_ptr,
                            num_tokens, hidden, payload_bytes, cap, num_ranks, top_k, rank, stride_x, stride_out,
                            KIND: tl.constexpr, WIRE: tl.constexpr, FIXED: tl.constexpr, META: tl.constexpr,
                            PEER: tl.constexpr, CHUNK: tl.constexpr, KP: tl.constexpr, ALIGN: tl.constexpr,
                            FAST: tl.constexpr):
        # Program (token t, chunk): read the chunk once, encode it once, store it in t's row for
        # every rank that gets one. PEER (with FIXED): row t of this rank's block in rank r's own
        # buffer, and only live rows' payloads (the metadata marks the others).
        t = tl.program_id(0)
        chunk = tl.program_id(1)
        has_token = t < num_tokens
        body, scale = _encode_chunk(x_ptr, t, chunk, hidden, stride_x, has_token, KIND, WIRE, CHUNK, FAST)
        if META:
            j = tl.arange(0, KP)
            jm = j < tl.where(has_token, top_k, 0)  # (not `vector & scalar`: the interpreter cannot mask with it)
            dest = tl.load(dest_ptr + t * top_k + j, mask=jm, other=-1)
            local = tl.load(local_ptr + t * top_k + j, mask=jm, other=-1).to(tl.int32)
            weight = tl.load(weight_ptr + t * top_k + j, mask=jm, other=0.0).to(tl.float32)
        for r in range(0, num_ranks):
            if FIXED:
                row = r * cap + t
                live = has_token
                if META:
                    live = live & (tl.sum((dest == r).to(tl.int32), axis=0) > 0)
            else:
                row = tl.load(slots_ptr + r * num_tokens + t)
                live = row >= 0
            if row >= 0:
                if PEER:
                    base = _peer_row(out_ptr, peers_ptr, r, rank * cap + t, stride_out)
                    if live:
                        _store_payload(base, body, scale, live, chunk, hidden, KIND, WIRE, CHUNK, ALIGN)
                else:
                    base = out_ptr + row.to(tl.int64) * stride_out
                    _store_payload(base, body, scale, live, chunk, hidden, KIND, WIRE, CHUNK, ALIGN)
                if META:
                    if chunk == 0:
                        mine = dest == r
                        _store_u32(base + payload_bytes, tl.where(mine, local, -1), j < top_k, ALIGN)
                        _store_u32(base + payload_bytes + 4 * top_k, tl.where(mine, weight, 0.0), j < top_k, ALIGN)

    @triton.jit(do_not_specialize=["cap"])
    def _encode_back_kernel(x_ptr, ids_ptr, out_ptr, peers_ptr, rank, cap, hidden, top_k, stride_x, stride_out,
                            KIND: tl.constexpr, WIRE: tl.constexpr, CHUNK: tl.constexpr, KP: tl.constexpr,
                            ALIGN: tl.constexpr, FAST: tl.constexpr):
        # Program (row n, chunk) of the expert output: row n holds token n % cap of rank n // cap; if
        # it carried an expert (ids[n] not all -1), encode it into that rank's own buffer, row
        # rank * cap + n % cap (this rank's block).
        n = tl.program_id(0)
        chunk = tl.program_id(1)
        j = tl.arange(0, KP)
        ids = tl.load(ids_ptr + n.to(tl.int64) * top_k + j, mask=j < top_k, other=-1)
        if tl.max(ids, axis=0) >= 0:
            body, scale = _encode_chunk(x_ptr, n, chunk, hidden, stride_x, True, KIND, WIRE, CHUNK, FAST)
            base = _peer_row(out_ptr, peers_ptr, n // cap, rank * cap + n % cap, stride_out)
            _store_payload(base, body, scale, n >= 0, chunk, hidden, KIND, WIRE, CHUNK, ALIGN)

    @triton.jit
    def _decode_rows_kernel(rows_ptr, out_ptr, scale_ptr, ids_ptr, w_ptr, hidden, payload_bytes, top_k, stride_rows,
                            stride_out, stride_scale, KIND: tl.constexpr, WIRE: tl.constexpr, PAYLOAD: tl.constexpr,
                            META: tl.constexpr, LIVE: tl.constexpr, Q8: tl.constexpr, CHUNK: tl.constexpr,
                            KP: tl.constexpr, ALIGN: tl.constexpr, FAST: tl.constexpr):
        # LIVE: a row whose ids are all -1 decodes to zeros without its payload being read (the
        # peer transport does not send those payloads). Q8: out gets e4m3 values and scale_ptr
        # their per-128 scales, the decoded row (in the wire dtype) quantized as fused_moe's own
        # activation quant does it (the same function), for FP8 experts.
        n = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        row = rows_ptr + n * stride_rows
        if PAYLOAD:
            offs = chunk * CHUNK + tl.arange(0, CHUNK)
            if LIVE:
                j = tl.arange(0, KP)
                ids = _load_u32(row + payload_bytes, KP, j < top_k, ALIGN).to(tl.int32, bitcast=True)
                live = tl.max(tl.where(j < top_k, ids, -1), axis=0) >= 0
            else:
                live = n >= 0
            if Q8:
                G: tl.constexpr = CHUNK // 128
                if KIND == 2:  # exactly, from the codes and scales (mxfp4_fp8_groups)
                    codes, e8m0 = _load_mxfp4(row, chunk, hidden, live, CHUNK)
                    q, scale = _mxfp4_fp8_group(tl.reshape(codes, [G, 4, 32]), tl.reshape(e8m0, [G, 4]), FAST)
                    q = tl.reshape(q, [CHUNK]).to(out_ptr.dtype.element_ty)
                else:
                    v = _load_payload(row, chunk, hidden, live, KIND, WIRE, CHUNK, ALIGN, FAST)
                    q, scale = _quant_group_tile(tl.reshape(v.to(WIRE).to(tl.float32), [G, 128]), 448.0, FAST)
                    q = tl.reshape(q, [CHUNK]).to(out_ptr.dtype.element_ty)
                tl.store(out_ptr + n * stride_out + offs, q, mask=offs < hidden)
                g = chunk * G + tl.arange(0, G)
                tl.store(scale_ptr + n * stride_scale + g, scale, mask=g * 128 < hidden)
            else:
                v = _load_payload(row, chunk, hidden, live, KIND, WIRE, CHUNK, ALIGN, FAST)
                tl.store(out_ptr + n * stride_out + offs, v.to(out_ptr.dtype.element_ty), mask=offs < hidden)
        if META:
            if chunk == 0:
                j = tl.arange(0, KP)
                ids = _load_u32(row + payload_bytes, KP, j < top_k, ALIGN).to(tl.int32, bitcast=True)
                w = _load_u32(row + payload_bytes + 4 * top_k, KP, j < top_k, ALIGN).to(tl.float32, bitcast=True)
                tl.store(ids_ptr + n * top_k + j, ids.to(tl.int64), mask=j < top_k)
                tl.store(w_ptr + n * top_k + j, w, mask=j < top_k)

    @triton.jit
    def _combine_rank(acc, rows_ptr, slots_ptr, dest, r, t, chunk, num_tokens, hidden, cap, stride_rows,
                      KIND: tl.constexpr, WIRE: tl.constexpr, FIXED: tl.constexpr, HAS_DEST: tl.constexpr,
                      CHUNK: tl.constexpr, ALIGN: tl.constexpr, FAST: tl.constexpr):
        if FIXED:
            row = r * cap + t
            live = t < num_tokens
            if HAS_DEST:
                live = live & (tl.sum((dest == r).to(tl.int32), axis=0) > 0)
        else:
            row = tl.load(slots_ptr + r * num_tokens + t)
            live = row >= 0
        # Masked, not branched: with the ranks unrolled, every rank's loads can be in flight at once.
        v = _load_payload(rows_ptr + tl.maximum(row, 0).to(tl.int64) * stride_rows, chunk, hidden, live, KIND, WIRE,
                          CHUNK, ALIGN, FAST)
        return acc + v.to(WIRE).to(tl.float32)

    @triton.jit(do_not_specialize=["num_tokens", "cap"])
    def _combine_rows_kernel(rows_ptr, out_ptr, slots_ptr, dest_ptr, num_tokens, hidden, cap, num_ranks, top_k,
                             stride_rows, stride_out, KIND: tl.constexpr, WIRE: tl.constexpr, FIXED: tl.constexpr,
                             HAS_DEST: tl.constexpr, CHUNK: tl.constexpr, KP: tl.constexpr, NR: tl.constexpr,
                             ALIGN: tl.constexpr, FAST: tl.constexpr):
        # y[t] = sum over ranks, in order, of the decoded rows that carried token t (fp32, each
        # partial first rounded to the wire dtype as the reference decodes it; a row that does not
        # carry t adds +0.0, as the reference's where(live, part, 0) does). NR > 0: the number of
        # ranks, unrolled; 0: a loop over num_ranks.
        t = tl.program_id(0)
        chunk = tl.program_id(1)
        offs = chunk * CHUNK + tl.arange(0, CHUNK)
        dest = 0
        if HAS_DEST:
            j = tl.arange(0, KP)
            dest = tl.load(dest_ptr + t * top_k + j, mask=j < top_k, other=-1)
        acc = tl.zeros([CHUNK], dtype=tl.float32)
        if NR > 0:
            for r in tl.static_range(NR):
                acc = _combine_rank(acc, rows_ptr, slots_ptr, dest, r, t, chunk, num_tokens, hidden, cap, stride_rows,
                                    KIND, WIRE, FIXED, HAS_DEST, CHUNK, ALIGN, FAST)
        else:
            for r in range(0, num_ranks):
                acc = _combine_rank(acc, rows_ptr, slots_ptr, dest, r, t, chunk, num_tokens, hidden, cap, stride_rows,
                                    KIND, WIRE, FIXED, HAS_DEST, CHUNK, ALIGN, FAST)
        tl.store(out_ptr + t.to(tl.int64) * stride_out + offs, acc.to(out_ptr.dtype.element_ty), mask=offs < hidden)

    @triton.jit(do_not_specialize=["num_tokens"])
    def _route_kernel(ids_ptr, rslots_ptr, rcount_ptr, dest_ptr, local_ptr, hit_ptr, num_tokens, top_k, max_rep,
                      rank, slots_per_rank, num_ranks, HIT: tl.constexpr, BT: tl.constexpr, KP: tl.constexpr):
        # The ~15 small torch ops of route_ref in one launch: they cost more in launches than in work.
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        j = tl.arange(0, KP)
        m = (t[:, None] < num_tokens) & (j[None, :] < top_k)
        ids = tl.load(ids_ptr + t[:, None].to(tl.int64) * top_k + j[None, :], mask=m, other=-1).to(tl.int64)
        valid = ids >= 0
        e = tl.where(valid, ids, 0)
        count = tl.load(rcount_ptr + e, mask=valid, other=1)
        slot = tl.load(rslots_ptr + e * max_rep + (t[:, None] + rank) % count, mask=valid, other=0)
        dest = tl.where(valid, slot // slots_per_rank, num_ranks)
        local = tl.where(valid, slot % slots_per_rank, -1)
        out = t[:, None].to(tl.int64) * top_k + j[None, :]
        tl.store(dest_ptr + out, dest, mask=m)
        tl.store(local_ptr + out, local, mask=m)
        if HIT:
            for r in range(0, num_ranks):
                hit = tl.sum((dest == r).to(tl.int32), axis=1) > 0
                tl.store(hit_ptr + r * num_tokens + t, hit, mask=t < num_tokens)

    _TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


_KIND_ID = {RAW: 0, FP8: 1, MXFP4: 2}
NUM_WARPS = 4  # route
# (values per program, warps) of each row kernel and payload kind, timed on one H200 at hidden 7168,
# 4096 tokens (benchmarks/wire_kernel_bench.py --tune; docs/perf/ep.md, "Row kernels alone"): one
# program per row moves the most bytes per program and won everywhere. Launches of fewer than
# MIN_PROGRAMS programs at that size (decode-sized batches) take SMALL instead, which spreads them
# over more programs.
TUNING = {(op, kind): (8192, 8) for op in ("encode", "decode", "combine") for kind in KINDS}
TUNING["encode", RAW] = TUNING["combine", RAW] = (8192, 16)
SMALL, MIN_PROGRAMS = (1024, 4), 1024
# Combining fp8 rows from 4 or more ranks (each program decodes a row of every rank, unrolled): programs
# of 4096 values measured 10% faster than the 2-rank table's 8192 at 4 ranks (51.4 -> 46.9 us) and 5% at 8
# (88.1 -> 84.4 us) (H200, 4096 tokens; docs/perf/ep.md, "Row kernels at 4 and 8 ranks").
TUNING_MANY_RANKS = {("combine", FP8): (4096, 8)}
MANY_RANKS = 4
FAST_FP8 = True  # the GPU's e4m3 conversions and reciprocal division (see above); CUDA only
COMBINE_UNROLL = 8  # combine unrolls its loop over ranks up to this many


def _config(op: str, kind: str, hidden: int, rows: int, ranks: int = 2) -> tuple[int, int]:
    # Values per program: a power of two, whole fp8 groups (so whole mxfp4 blocks too).
    chunk, warps = TUNING_MANY_RANKS.get((op, kind), TUNING[op, kind]) if ranks >= MANY_RANKS else TUNING[op, kind]
    if rows * triton.cdiv(hidden, chunk) < MIN_PROGRAMS:
        chunk, warps = SMALL
    return max(128, min(chunk, triton.next_power_of_2(hidden))), warps


def _aligned(buf: torch.Tensor, *offsets: int) -> bool:
    """32-bit words at these byte offsets of every row of buf are aligned."""
    rows_ok = buf.shape[0] <= 1 or buf.stride(0) % 4 == 0
    return buf.data_ptr() % 4 == 0 and rows_ok and all(o % 4 == 0 for o in offsets)


def _fast(t: torch.Tensor) -> bool:
    return FAST_FP8 and t.is_cuda


def _kp(k: int) -> int:
    return max(2, triton.next_power_of_2(max(k, 1)))


def route_triton(topk_ids, replica_slots, replica_count, rank, slots_per_rank, num_ranks, with_hit=False):
    t, k = topk_ids.shape
    dest = torch.empty(t, k, dtype=torch.int64, device=topk_ids.device)
    local = torch.empty_like(dest)
    hit = torch.empty(num_ranks, t, dtype=torch.bool, device=topk_ids.device) if with_hit else None
    if t == 0:
        return dest, local, hit
    bt = 64
    _route_kernel[(triton.cdiv(t, bt),)](
        topk_ids.contiguous(), replica_slots.contiguous(), replica_count, dest, local, hit if with_hit else dest,
        t, k, replica_slots.shape[1], rank, slots_per_rank, num_ranks, HIT=with_hit, BT=bt, KP=_kp(k),
        num_warps=NUM_WARPS)
    return dest, local, hit


def encode_rows_triton(x, kind, dtype, num_rows, slots=None, cap=0, dest=None, local=None, weights=None, out=None,
                       peers: PeerRows | None = None):
    t, h = x.shape
    bpt = payload_bytes(kind, h, dtype)
    k = dest.shape[1] if dest is not None else 0
    if peers is not None:  # this rank's own buffer gives the layout every rank's has
        out = peers.views[peers.rank]
    out = torch.empty(num_rows, bpt + 8 * k, dtype=torch.uint8, device=x.device) if out is None else out
    fixed = slots is None
    num_ranks = (num_rows // cap if cap else 0) if fixed else slots.shape[0]
    grid_t = cap if fixed else t
    if out.shape[0] == 0 or grid_t == 0 or num_ranks == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    chunk, warps = _config("encode", kind, h, grid_t)
    dummy = out
    _encode_rows_kernel[(grid_t, triton.cdiv(h, chunk))](
        x, out, slots.contiguous() if slots is not None else dummy,
        dest.contiguous() if k else dummy, local.contiguous() if k else dummy,
        weights.contiguous() if k else dummy, peers.table if peers is not None else dummy, t, h, bpt, cap,
        num_ranks, k, peers.rank if peers is not None else 0, x.stride(0), out.stride(0),
        KIND=_KIND_ID[kind], WIRE=_TL[dtype], FIXED=fixed, META=k > 0, PEER=peers is not None, CHUNK=chunk,
        KP=_kp(k), ALIGN=_aligned(out, h if kind == FP8 else 0, bpt), FAST=_fast(x), num_warps=warps)
    return out


def encode_back_triton(x, kind, dtype, ids, cap, peers: PeerRows):
    n, h = x.shape
    if n == 0:
        return
    out = peers.views[peers.rank]
    chunk, warps = _config("encode", kind, h, n)
    x = x if x.stride(-1) == 1 else x.contiguous()
    _encode_back_kernel[(n, triton.cdiv(h, chunk))](
        x, ids.contiguous(), out, peers.table, peers.rank, cap, h, ids.shape[1], x.stride(0), out.stride(0),
        KIND=_KIND_ID[kind], WIRE=_TL[dtype], CHUNK=chunk, KP=_kp(ids.shape[1]),
        ALIGN=_aligned(out, h if kind == FP8 else 0), FAST=_fast(x), num_warps=warps)


def decode_rows_triton(rows, kind, hidden, dtype, k=0, out=None, live_only=False, fp8_groups=False):
    n = rows.shape[0]
    bpt = payload_bytes(kind, hidden, dtype)
    payload = not in_place(kind, fp8_groups)  # else handed over as a view
    if out is None:
        out = (empty_decoded(n, hidden, dtype, fp8_groups, rows.device) if payload else None,
               torch.empty(n, k, dtype=torch.int64, device=rows.device),
               torch.empty(n, k, dtype=torch.float32, device=rows.device))
    x, ids, w = out
    x = x if payload else payload_view(rows, kind, hidden, dtype)
    if n == 0 or not (payload or k):
        return x, ids, w
    values, scales = x if payload and fp8_groups else (x if payload else ids, w)
    chunk, warps = _config("decode", kind, hidden, n)
    _decode_rows_kernel[(n, triton.cdiv(hidden, chunk) if payload else 1)](
        rows, values, scales, ids, w, hidden, bpt, k, rows.stride(0), values.stride(0) if payload else 0,
        scales.stride(0) if payload and fp8_groups else 0, KIND=_KIND_ID[kind], WIRE=_TL[dtype], PAYLOAD=payload,
        META=k > 0, LIVE=live_only and k > 0, Q8=fp8_groups, CHUNK=chunk, KP=_kp(k),
        ALIGN=_aligned(rows, hidden if kind == FP8 else 0, bpt), FAST=_fast(rows), num_warps=warps)
    return x, ids, w


def combine_rows_triton(rows, kind, hidden, dtype, out_dtype, num_tokens, slots=None, cap=0, dest=None, out=None):
    y = torch.empty(num_tokens, hidden, dtype=out_dtype, device=rows.device) if out is None else out
    fixed = slots is None
    num_ranks = (rows.shape[0] // cap if cap else 0) if fixed else slots.shape[0]
    if num_tokens == 0:
        return y
    if num_ranks == 0 or rows.shape[0] == 0:
        return y.zero_()
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    chunk, warps = _config("combine", kind, hidden, num_tokens, num_ranks)
    k = dest.shape[1] if dest is not None else 0
    _combine_rows_kernel[(num_tokens, triton.cdiv(hidden, chunk))](
        rows, y, slots.contiguous() if slots is not None else y, dest.contiguous() if dest is not None else y,
        num_tokens, hidden, cap, num_ranks, k, rows.stride(0), y.stride(0), KIND=_KIND_ID[kind], WIRE=_TL[dtype],
        FIXED=fixed, HAS_DEST=dest is not None, CHUNK=chunk, KP=_kp(k),
        NR=num_ranks if num_ranks <= COMBINE_UNROLL else 0, ALIGN=_aligned(rows, hidden if kind == FP8 else 0),
        FAST=_fast(rows), num_warps=warps)
    return y


# ----------------------------------------------------------------------------- dispatch


def use_triton(t: torch.Tensor, *dtypes: torch.dtype) -> bool:
    """Triton on CUDA; on CPU only under the interpreter, in fp32/fp16 (bf16 is wrong there);
    MOESERVE_WIRE_KERNELS=torch forces the references."""
    if os.environ.get(ENV_KERNELS) == "torch" or not triton_runs_on(t):
        return False
    return t.is_cuda or all(d in (torch.float32, torch.float16) for d in dtypes)


def route(topk_ids, replica_slots, replica_count, rank: int, slots_per_rank: int, num_ranks: int,
          with_hit: bool = False, triton_ok: bool | None = None):
    """Where each token's experts are: dest [T, k], local [T, k] (and hit [R, T]); see route_ref."""
    if triton_ok if triton_ok is not None else use_triton(topk_ids):
        return route_triton(topk_ids, replica_slots, replica_count, rank, slots_per_rank, num_ranks, with_hit)
    return route_ref(topk_ids, replica_slots, replica_count, rank, slots_per_rank, num_ranks, with_hit)


def encode_rows(x: torch.Tensor, kind: str, dtype: torch.dtype, num_rows: int | None = None, slots=None,
                cap: int = 0, dest=None, local=None, weights=None, out=None,
                triton_ok: bool | None = None) -> torch.Tensor:
    """x [T, H] -> uint8 rows [num_rows, payload_bytes (+ 8k with dest)]; the module docstring has the row
    maps. dest/local/weights [T, k]: expert ranks (R where none), local slots, router weights.
    out: write into these rows instead (slots index out's rows; other rows are left alone).
    With no row map (rows = tokens) a raw payload of x's own dtype is x's bytes, not a copy."""
    num_rows = x.shape[0] if num_rows is None else num_rows
    if slots is None and not cap:
        if kind == RAW and dest is None and out is None and x.dtype == dtype and x.is_contiguous():
            return x.view(torch.uint8).view(x.shape[0], x.shape[1] * dtype.itemsize)
        cap = num_rows
    if triton_ok if triton_ok is not None else use_triton(x, x.dtype, dtype):
        return encode_rows_triton(x, kind, dtype, num_rows, slots, cap, dest, local, weights, out)
    return encode_rows_ref(x, kind, dtype, num_rows, slots, cap, dest, local, weights, out)


def encode_peers(x: torch.Tensor, kind: str, dtype: torch.dtype, cap: int, dest, local, weights, peers: PeerRows,
                 triton_ok: bool | None = None) -> None:
    """The low-latency layout's rows (cap rows per rank, row t = token t), each stored straight into
    the receiving rank's buffer (this rank's block of it): every row's metadata (ids -1 where token
    t has no expert there, or t >= T), and the payloads of the rows that carry a token."""
    if triton_ok if triton_ok is not None else use_triton(x, x.dtype, dtype):
        encode_rows_triton(x, kind, dtype, len(peers.views) * cap, cap=cap, dest=dest, local=local, weights=weights,
                           peers=peers)
    else:
        encode_peers_ref(x, kind, dtype, cap, dest, local, weights, peers)


def encode_back(x: torch.Tensor, kind: str, dtype: torch.dtype, ids: torch.Tensor, cap: int, peers: PeerRows,
                triton_ok: bool | None = None) -> None:
    """Expert output x [R * cap, H] (row r * cap + t: token t of rank r, ids [R * cap, k] its received
    expert ids) -> each row that carried an expert, encoded, into rank r's buffer at row
    rank * cap + t; rows without one are not sent (their token has no expert here)."""
    if triton_ok if triton_ok is not None else use_triton(x, x.dtype, dtype):
        encode_back_triton(x, kind, dtype, ids, cap, peers)
    else:
        encode_back_ref(x, kind, dtype, ids, cap, peers)


def decode_rows(rows: torch.Tensor, kind: str, hidden: int, dtype: torch.dtype, k: int = 0, out=None,
                triton_ok: bool | None = None, live_only: bool = False, fp8_groups: bool = False):
    """rows uint8 [N, row_bytes] -> (x [N, hidden] dtype, ids [N, k] int64, weights [N, k] fp32).
    A raw payload comes back as a view into rows. out: (x, ids, weights) to fill instead (x is
    not used for a raw payload). live_only: rows whose ids are all -1 decode to zeros, their
    payload unread (a payload handed over as a view keeps whatever bytes are there).
    fp8_groups: x is (e4m3 [N, hidden], fp32 scales [N, ceil(hidden / 128)]) for FP8 experts, the
    decoded rows quantized per 128 exactly as fused_moe would quantize them; an fp8 payload is
    already that and comes back as views, an mxfp4 one is converted without rounding (mxfp4_fp8_groups)."""
    if triton_ok if triton_ok is not None else use_triton(rows, dtype):
        return decode_rows_triton(rows, kind, hidden, dtype, k, out, live_only, fp8_groups)
    return decode_rows_ref(rows, kind, hidden, dtype, k, out, live_only, fp8_groups)


def combine_rows(rows: torch.Tensor, kind: str, hidden: int, dtype: torch.dtype, out_dtype: torch.dtype,
                 num_tokens: int, slots=None, cap: int = 0, dest=None, out=None, triton_ok: bool | None = None):
    """Returned rows -> y [num_tokens, hidden] out_dtype: the sum over ranks of the decoded rows
    that carried each token (slots, or cap with dest, as encode_rows placed them). out: y to fill."""
    if triton_ok if triton_ok is not None else use_triton(rows, dtype, out_dtype):
        return combine_rows_triton(rows, kind, hidden, dtype, out_dtype, num_tokens, slots, cap, dest, out)
    return combine_rows_ref(rows, kind, hidden, dtype, out_dtype, num_tokens, slots, cap, dest, out)
