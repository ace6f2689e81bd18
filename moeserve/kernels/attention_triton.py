"""Triton attention over the paged KV cache: split-KV decode (a.k.a. flash-decoding) and varlen prefill.

Decode: one query token per sequence. A decode batch is often small while each sequence is long, so
parallelizing over (sequence, head) alone leaves most SMs idle. Each sequence's context is
therefore cut into `num_splits` contiguous pieces; one program per (sequence, head block, split)
runs an online softmax over its piece and writes a partial output normalized by its own sum plus
its log-sum-exp; a second small kernel merges the splits.

- MLA (absorbed): all heads of a sequence read the same latent cache row (MQA over [latent |
  rope key]), so one program serves a block of heads and each cache tile is loaded once for them.
- GQA: one program serves the query heads of one KV head.

The cache may be bf16/fp16/fp32 or float8_e4m3fn (scale 1.0): tiles are upcast to the query dtype
after the load. Slots past seq_len (and block-table entries past the last used block) are never
loaded, so they may hold anything, NaN included. The number of splits depends only on the batch
and head shapes, never on seq_lens values, so the call is CUDA-graph safe (no host sync).

Prefill: one launch for all prefill sequences of a layer (the per-sequence loop it replaces was
launch-bound). Program (head, i) serves BLOCK_M queries of one sequence for one query head: the
host lists each sequence's query blocks in a small table (from host lengths, no device sync) and
the kernel runs a causal online softmax over the keys the block can see. Keys come straight from
the paged cache through the block table (GQA: query head h reads KV head h // group), or from K/V
packed by sequence (MLA's expanded form, whose K/V kv_b_proj makes and nothing caches). A
sequence's queries are the last q_len of its seq_len positions; the prefix before them
(prefix-cache hits, earlier chunks) is attended in full. Key tiles wholly before a block's first
query need no mask; only the diagonal tiles get one.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import triton
import triton.language as tl

from moeserve.kernels.attention import memoized, to_device_async
from moeserve.kernels.pdl import pdl_begin, pdl_launch

MAX_SPLITS = 32
MIN_HEAD_BLOCK = 16  # tl.dot needs M >= 16
MLA_RESIDENT = 2  # MLA decode programs per SM at once (default tiles): see choose_num_splits
# MLA decode tiles (block_h, block_n, num_warps, num_stages). With many heads (DeepSeek-V3's 128, or
# 64 a rank at tp 2) a 64-head block reads each KV tile for 2 head blocks instead of 8, with 64-token
# tiles: on an H200 1.7-2.1x faster than the default tiles at batch 16-128 with a bf16 cache and
# 2.2-2.6x with an FP8 one; even with the default at batch 8, slower at batch 1
# (docs/perf/kernels_attention.md), so it is used from batch 16 on. The default tiles take 3 stages
# since the block-table entries are loaded a tile ahead (with them 33 vs 38 us at V2-Lite batch 64);
# two such programs still fit an SM's shared memory (MLA_RESIDENT).
MLA_TILES = (16, 32, 4, 3)
MLA_TILES_MANY_HEADS = (64, 64, 8, 2)
MANY_HEADS, MANY_HEADS_MIN_BATCH = 64, 16
# An FP8 (e4m3) cache read with a 16-bit q by tiles of at most MLA_FP8_FAST_MAX_N tokens (the default
# ones): the dots run in fp16 (MLA_FP8_F16_DOTS) and, on a GPU, each tile is converted by inline PTX
# (MLA_FP8_PTX_CVT; the kernel says why). H200, V2-Lite batch 64 at 1024 tokens: 47.2 -> 36.0 us (bf16
# cache: 30.5), batch 128 at 4096: 314 -> 206-216 us (docs/perf/kernels_attention.md). Not the many-heads
# tiles: fp16 dots were slower there (V3 batch 64: 157 vs 135 us), their 64 heads already spreading
# each tile's conversion over 4x the dots.
# Pages of at least a tile (BLOCK_N divides the page size): each tile's rows addressed from one base
# (the kernel says why); off, or smaller pages, every token's row through its block-table entry. H200,
# pages of 64 against 16, 1,024 tokens: V2-Lite batch 1 8.6 -> 7.5 us, batch 64 31.6 -> 30.7; V3 (the
# 64-token many-head tiles) batch 64 115 -> 97 (docs/perf/kernels_attention.md). Hence the engine's
# 64-token pages for MLA models (config.default_block_size).
MLA_TILE_IN_PAGE = True
MLA_FP8_F16_DOTS = True
MLA_FP8_PTX_CVT = True
MLA_FP8_FAST_MAX_N = 32
# prefill launch table, one row per program: (block-table row, first query token, q_len, k_len,
# first key token (contiguous K/V), first query of the block within the sequence)
PLAN_COLS = tl.constexpr(6)


@triton.jit
def _e4m3_to_f16(x):
    # e4m3 -> fp16, four values a call (two cvt.rn.f16x2.e4m3x2). Declared not pure on purpose: Triton
    # then keeps the conversion where it is written instead of moving it into a dot's operand load.
    return tl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
        "=r,=r,r", [x.to(tl.uint8, bitcast=True)], dtype=tl.float16, is_pure=False, pack=4)


@triton.jit
def _paged_slots(bt_row_ptr, offs_n, valid, PAGE_SIZE: tl.constexpr, stride_page, stride_tok):
    """Element offsets (int64) of tokens offs_n of one sequence in a paged cache."""
    page = tl.load(bt_row_ptr + offs_n // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
    return page * stride_page + (offs_n % PAGE_SIZE).to(tl.int64) * stride_tok


@triton.jit
def _tile_slots_ahead(bt_row_ptr, pages, n0, end, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, stride_page,
                      stride_tok):
    """Tile [n0, n0 + BLOCK_N) of a paged sequence, its block-table entries `pages` loaded an iteration
    before (start with _first_tile_pages) -> (offs_n, valid, element offsets of its rows, the next
    tile's entries). Loading them ahead keeps the cache loads from waiting on a block-table load issued
    just before them (MLA decode with 3 stages, split + merge: 33 us vs 42 at V2-Lite batch 64 on an
    H200; docs/perf/kernels_attention.md)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    valid = offs_n < end
    slots = pages.to(tl.int64) * stride_page + (offs_n % PAGE_SIZE).to(tl.int64) * stride_tok
    next_pages = tl.load(bt_row_ptr + (offs_n + BLOCK_N) // PAGE_SIZE, mask=offs_n + BLOCK_N < end, other=0)
    return offs_n, valid, slots, next_pages


@triton.jit
def _first_tile_pages(bt_row_ptr, start, end, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr):
    offs_n = start + tl.arange(0, BLOCK_N)
    return tl.load(bt_row_ptr + offs_n // PAGE_SIZE, mask=offs_n < end, other=0)


@triton.jit
def _split_range(seq_len, split, num_splits, BLOCK_N: tl.constexpr):
    """[start, end) of this split's tokens; splits are whole BLOCK_N tiles, trailing ones may be empty."""
    tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.cdiv(tiles, num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)
    return start, end


@triton.jit
def _store_partial(acc, m_i, l_i, part_ptr, lse_ptr, row_ids, row_mask, offs_d, d_mask, stride_row, split,
                   num_splits):
    """Write acc / l and m + log(l) (natural log) for rows row_ids; an empty split writes 0 and -inf."""
    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    ptrs = part_ptr + (row_ids[:, None] * num_splits + split) * stride_row + offs_d[None, :]
    tl.store(ptrs, out, mask=row_mask[:, None] & d_mask[None, :])
    tl.store(lse_ptr + row_ids * num_splits + split, lse, mask=row_mask)


@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _mla_decode_split_kernel(
        ql_ptr, qr_ptr, kv_ptr, bt_ptr, seq_lens_ptr, part_ptr, lse_ptr,
        num_heads, num_splits, qk_scale_log2,
        stride_ql_b, stride_ql_h, stride_qr_b, stride_qr_h, stride_kv_page, stride_kv_tok, stride_bt,
        LATENT: tl.constexpr, ROPE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
        DOT_PRECISION: tl.constexpr, F16_DOTS: tl.constexpr = False, FAST: tl.constexpr = False,
        TILE_IN_PAGE: tl.constexpr = False, PDL: tl.constexpr = False):
    """F16_DOTS: an e4m3 cache with a 16-bit q, the dots in fp16 (below); FAST: on a GPU, its tiles
    converted by inline PTX (_e4m3_to_f16), not the interpreter's cast. TILE_IN_PAGE: BLOCK_N divides
    PAGE_SIZE, so a tile is one page's contiguous rows (below)."""
    pdl_begin(PDL)
    b = tl.program_id(0)
    head_block = tl.program_id(1)
    split = tl.program_id(2)

    offs_h = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < num_heads
    offs_l = tl.arange(0, BLOCK_L)
    l_mask = offs_l < LATENT
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < ROPE

    q_lat = tl.load(ql_ptr + b * stride_ql_b + offs_h[:, None] * stride_ql_h + offs_l[None, :],
                    mask=h_mask[:, None] & l_mask[None, :], other=0.0)
    q_rope = tl.load(qr_ptr + b * stride_qr_b + offs_h[:, None] * stride_qr_h + offs_r[None, :],
                     mask=h_mask[:, None] & r_mask[None, :], other=0.0)

    score_scale = qk_scale_log2
    if F16_DOTS:
        # e4m3 converts to fp16 in one instruction a pair (to bf16 only through fp32), so with an FP8
        # cache the dots run in fp16. q is scaled by a power of two into fp16's range (bf16's is far
        # wider; exact, as is the inverse applied to the scores).
        q_max = tl.maximum(tl.max(tl.max(tl.abs(q_lat.to(tl.float32)), axis=1), axis=0),
                           tl.max(tl.max(tl.abs(q_rope.to(tl.float32)), axis=1), axis=0))
        shift = tl.maximum(tl.ceil(tl.log2(q_max)) - 14.0, 0.0)
        q_lat = (q_lat.to(tl.float32) * tl.exp2(-shift)).to(tl.float16)
        q_rope = (q_rope.to(tl.float32) * tl.exp2(-shift)).to(tl.float16)
        score_scale = qk_scale_log2 * tl.exp2(shift)

    seq_len = tl.load(seq_lens_ptr + b)
    start, end = _split_range(seq_len, split, num_splits, BLOCK_N)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt

    # finite floor instead of -inf: a fully masked tile then gives exp2(-inf) = 0, never inf - inf
    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_L], dtype=tl.float32)
    if TILE_IN_PAGE:
        # A tile's rows lie in one page (BLOCK_N divides PAGE_SIZE; splits start on tile boundaries),
        # contiguous: one block-table entry a tile (loaded a tile ahead) and one int64 base, the rows'
        # offsets from it fixed for the loop. The general path's per-token entries and 64-bit slot
        # arithmetic were most of the kernel's integer instructions (Nsight Compute, V2-Lite batch 64:
        # 5.4 M of 9.4 M); this path runs 38% fewer (docs/perf/kernels_attention.md).
        rows = tl.arange(0, BLOCK_N)
        lat_offs = rows[:, None] * stride_kv_tok + offs_l[None, :]
        rope_offs = rows[:, None] * stride_kv_tok + LATENT + offs_r[None, :]
        page = tl.load(bt_row + start // PAGE_SIZE, mask=start < end, other=0)
    else:
        pages = _first_tile_pages(bt_row, start, end, BLOCK_N, PAGE_SIZE)  # each tile's entries a tile ahead
    for n0 in range(start, end, BLOCK_N):
        if TILE_IN_PAGE:
            offs_n = n0 + rows
            valid = offs_n < end
            tile = kv_ptr + (page.to(tl.int64) * stride_kv_page + (n0 % PAGE_SIZE) * stride_kv_tok)
            page = tl.load(bt_row + (n0 + BLOCK_N) // PAGE_SIZE, mask=n0 + BLOCK_N < end, other=0)
            if BLOCK_L == LATENT and BLOCK_R == ROPE:  # every column in range: the rows' mask alone
                kv_lat = tl.load(tile + lat_offs, mask=valid[:, None], other=0.0)
                kv_rope = tl.load(tile + rope_offs, mask=valid[:, None], other=0.0)
            else:
                kv_lat = tl.load(tile + lat_offs, mask=valid[:, None] & l_mask[None, :], other=0.0)
                kv_rope = tl.load(tile + rope_offs, mask=valid[:, None] & r_mask[None, :], other=0.0)
        else:
            offs_n, valid, slots, pages = _tile_slots_ahead(bt_row, pages, n0, end, BLOCK_N, PAGE_SIZE,
                                                            stride_kv_page, stride_kv_tok)
            kv_lat = tl.load(kv_ptr + slots[:, None] + offs_l[None, :], mask=valid[:, None] & l_mask[None, :],
                             other=0.0)
            kv_rope = tl.load(kv_ptr + slots[:, None] + LATENT + offs_r[None, :],
                              mask=valid[:, None] & r_mask[None, :], other=0.0)
        if F16_DOTS and FAST:
            # The latent tile feeds both dots. Converted by a cast, Triton (3.6) moves the conversion
            # into each dot's operand load: the value sum then reads its transposed e4m3 operand a
            # byte at a time from shared memory, and the load itself is not pipelined. Converted
            # here, the tile is an asynchronous copy, converted once, stored in fp16, and both dots
            # read it as they read a bf16 cache (ldmatrix).
            kv_lat, kv_rope = _e4m3_to_f16(kv_lat), _e4m3_to_f16(kv_rope)
        else:
            kv_lat, kv_rope = kv_lat.to(q_lat.dtype), kv_rope.to(q_lat.dtype)
        s = tl.dot(q_lat, tl.trans(kv_lat), input_precision=DOT_PRECISION)
        s += tl.dot(q_rope, tl.trans(kv_rope), input_precision=DOT_PRECISION)
        s = tl.where(valid[None, :], s * score_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv_lat.dtype), kv_lat, input_precision=DOT_PRECISION)
        m_i = m_new

    # m_i is in log2 units: (m_i + log2 l) * ln 2 is the natural-log lse
    _store_partial(acc, m_i, l_i, part_ptr, lse_ptr, b * num_heads + offs_h, h_mask, offs_l, l_mask, BLOCK_L,
                   split, num_splits)


@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _gqa_decode_split_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, part_ptr, lse_ptr,
        num_heads, num_splits, qk_scale_log2,
        stride_q_b, stride_q_h, stride_k_page, stride_k_tok, stride_k_head,
        stride_v_page, stride_v_tok, stride_v_head, stride_bt,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr = False):
    pdl_begin(PDL)
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    offs_g = tl.arange(0, BLOCK_H)
    g_mask = offs_g < GROUP
    offs_h = kv_head * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM

    q = tl.load(q_ptr + b * stride_q_b + offs_h[:, None] * stride_q_h + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)

    seq_len = tl.load(seq_lens_ptr + b)
    start, end = _split_range(seq_len, split, num_splits, BLOCK_N)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    k_head = k_ptr + kv_head.to(tl.int64) * stride_k_head
    v_head = v_ptr + kv_head.to(tl.int64) * stride_v_head

    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = offs_n < end
        page = tl.load(bt_row + offs_n // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
        tok = (offs_n % PAGE_SIZE).to(tl.int64)
        tile_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_head + (page * stride_k_page + tok * stride_k_tok)[:, None] + offs_d[None, :],
                    mask=tile_mask, other=0.0).to(q.dtype)
        v = tl.load(v_head + (page * stride_v_page + tok * stride_v_tok)[:, None] + offs_d[None, :],
                    mask=tile_mask, other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s = tl.where(valid[None, :], s * qk_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    _store_partial(acc, m_i, l_i, part_ptr, lse_ptr, b * num_heads + offs_h, g_mask, offs_d, d_mask, BLOCK_D,
                   split, num_splits)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(part_ptr, lse_ptr, out_ptr, num_heads, num_splits, stride_out_b, stride_out_h,
                         DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr = False):
    """out[row] = sum_s exp(lse_s) * part_s / sum_s exp(lse_s) for one (sequence, head) row."""
    pdl_begin(PDL)
    row = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    s_mask = offs_s < num_splits
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < DIM
    lse = tl.load(lse_ptr + row * num_splits + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # seq_len 0: every split empty, output zeros
    w = tl.exp(lse - m)
    part = tl.load(part_ptr + (row * num_splits + offs_s)[:, None] * BLOCK_D + offs_d[None, :],
                   mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(part * w[:, None], axis=0) / tl.maximum(tl.sum(w, axis=0), 1e-30)
    b = row // num_heads
    h = row % num_heads
    tl.store(out_ptr + b * stride_out_b + h * stride_out_h + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _prefill_tile(acc, m_i, l_i, q1, q2, k_head, v_head, bt_row, k_start, n0, end, pos, qk_scale_log2,
                  stride_k_page, stride_k_tok, stride_v_page, stride_v_tok,
                  QK_DIM1: tl.constexpr, QK_DIM2: tl.constexpr, BLOCK_D2: tl.constexpr, V_DIM: tl.constexpr,
                  BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
                  CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Keys [n0, n0 + BLOCK_N) (those < end) into the running softmax of one query block."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    valid = offs_n < end
    if PAGED:
        page = tl.load(bt_row + offs_n // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
        tok = (offs_n % PAGE_SIZE).to(tl.int64)
        k_rows = page * stride_k_page + tok * stride_k_tok
        v_rows = page * stride_v_page + tok * stride_v_tok
    else:  # packed by sequence: this sequence's keys start at token k_start
        tok = (k_start + offs_n).to(tl.int64)
        k_rows = tok * stride_k_tok
        v_rows = tok * stride_v_tok
    offs_d1 = tl.arange(0, QK_DIM1)
    k1 = tl.load(k_head + k_rows[:, None] + offs_d1[None, :], mask=valid[:, None], other=0.0).to(q1.dtype)
    s = tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION)
    if QK_DIM2 > 0:
        offs_d2 = tl.arange(0, BLOCK_D2)
        k2 = tl.load(k_head + k_rows[:, None] + QK_DIM1 + offs_d2[None, :],
                     mask=valid[:, None] & (offs_d2 < QK_DIM2)[None, :], other=0.0).to(q1.dtype)
        s += tl.dot(q2, tl.trans(k2), input_precision=DOT_PRECISION)
    if CAUSAL:  # the diagonal tiles: key n is visible to the query at position p when n <= p
        s = tl.where(valid[None, :] & (offs_n[None, :] <= pos[:, None]), s * qk_scale_log2, float("-inf"))
    else:
        s = s * qk_scale_log2
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    offs_dv = tl.arange(0, BLOCK_DV)
    v = tl.load(v_head + v_rows[:, None] + offs_dv[None, :], mask=valid[:, None] & (offs_dv < V_DIM)[None, :],
                other=0.0).to(q1.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["stride_bt"])
def _varlen_prefill_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, plan_ptr, bt_ptr, qk_scale_log2,
        stride_q_tok, stride_q_head, stride_k_page, stride_k_tok, stride_k_head,
        stride_v_page, stride_v_tok, stride_v_head, stride_o_tok, stride_o_head, stride_bt,
        GROUP: tl.constexpr, QK_DIM1: tl.constexpr, QK_DIM2: tl.constexpr, BLOCK_D2: tl.constexpr,
        V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # heads on the fastest grid axis: the query heads of one KV head run side by side and share its
    # tiles in L2
    head = tl.program_id(0)
    row = plan_ptr + tl.program_id(1) * PLAN_COLS
    seq = tl.load(row)
    q_start = tl.load(row + 1)
    q_len = tl.load(row + 2)
    k_len = tl.load(row + 3)
    k_start = tl.load(row + 4)
    m0 = tl.load(row + 5)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < q_len
    pos = k_len - q_len + offs_m  # the queries are the last q_len of the sequence's k_len positions
    q_rows = (q_start + offs_m).to(tl.int64) * stride_q_tok + head * stride_q_head
    offs_d1 = tl.arange(0, QK_DIM1)
    q1 = tl.load(q_ptr + q_rows[:, None] + offs_d1[None, :], mask=m_mask[:, None], other=0.0)
    if QK_DIM2 > 0:  # a qk dim that is not a power of two (MLA: 128 + 64) as two dots, no padding to 256
        offs_d2 = tl.arange(0, BLOCK_D2)
        q2 = tl.load(q_ptr + q_rows[:, None] + QK_DIM1 + offs_d2[None, :],
                     mask=m_mask[:, None] & (offs_d2 < QK_DIM2)[None, :], other=0.0)
    else:
        q2 = q1

    kv_head = (head // GROUP).to(tl.int64)
    k_head = k_ptr + kv_head * stride_k_head
    v_head = v_ptr + kv_head * stride_v_head
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # keys below the block's first position are visible to all its queries: whole tiles of them need
    # no mask; the rest, up to the last query's position (or the sequence end), go through the causal one
    end = tl.minimum(k_len, k_len - q_len + m0 + BLOCK_M)
    full_end = (k_len - q_len + m0 + 1) // BLOCK_N * BLOCK_N
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(acc, m_i, l_i, q1, q2, k_head, v_head, bt_row, k_start, n0, end, pos,
                                      qk_scale_log2, stride_k_page, stride_k_tok, stride_v_page, stride_v_tok,
                                      QK_DIM1, QK_DIM2, BLOCK_D2, V_DIM, BLOCK_DV, BLOCK_N, PAGED, PAGE_SIZE,
                                      False, DOT_PRECISION)
    for n0 in range(full_end, end, BLOCK_N):
        acc, m_i, l_i = _prefill_tile(acc, m_i, l_i, q1, q2, k_head, v_head, bt_row, k_start, n0, end, pos,
                                      qk_scale_log2, stride_k_page, stride_k_tok, stride_v_page, stride_v_tok,
                                      QK_DIM1, QK_DIM2, BLOCK_D2, V_DIM, BLOCK_DV, BLOCK_N, PAGED, PAGE_SIZE,
                                      True, DOT_PRECISION)

    # every query sees key 0, so l_i > 0 on the rows that are stored
    out = acc / l_i[:, None]
    offs_dv = tl.arange(0, BLOCK_DV)
    o_rows = (q_start + offs_m).to(tl.int64) * stride_o_tok + head * stride_o_head
    tl.store(out_ptr + o_rows[:, None] + offs_dv[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & (offs_dv < V_DIM)[None, :])


# ---- host side ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the CPU interpreter: a few splits keep the split path exercised
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(batch: int, programs_per_seq: int, sm_count: int, max_splits: int = MAX_SPLITS,
                      resident: int | None = None) -> int:
    """Splits per sequence, from shapes only (no seq_lens values: the choice is fixed at CUDA-graph
    capture; splits past a short sequence's end cost one empty program each).

    resident: how many programs of the kernel fit on one SM at once, where that is few (the MLA
    kernel: 2, with its 16 x 512 fp32 accumulator and three 36 KB tile stages). The splits then stop
    at one full wave of resident programs, because a partial second wave takes as long as a whole
    one (H200, V2-Lite batch 64 at 1024 tokens: 4 splits 39.7 us, 5 splits 46.2;
    docs/perf/kernels_attention_splits_h200.json). Without it (the GQA kernel: small tiles, many
    resident) at least two waves of SMs, which measured best there.
    """
    programs = max(batch * programs_per_seq, 1)
    if resident:
        return max(1, min(max_splits, resident * sm_count // programs))
    return max(1, min(max_splits, triton.cdiv(2 * sm_count, programs)))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs (tests, CPU) get full-precision dots; on GPU tl.dot would otherwise use tf32
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_paged(cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor, batch: int) -> None:
    assert block_tables.dtype == torch.int32 and seq_lens.dtype == torch.int32, "block_tables/seq_lens int32"
    assert block_tables.shape[0] == batch and seq_lens.shape == (batch,)
    assert block_tables.stride(1) == 1 and seq_lens.is_contiguous()
    assert cache.stride(-1) == 1, "cache rows must be contiguous in the last dim"


def _merge(part: torch.Tensor, lse: torch.Tensor, out: torch.Tensor, dim: int) -> torch.Tensor:
    batch, num_heads, num_splits = lse.shape
    _merge_splits_kernel[(batch * num_heads,)](
        part, lse, out, num_heads, num_splits, out.stride(0), out.stride(1),
        DIM=dim, BLOCK_D=part.shape[-1], BLOCK_S=triton.next_power_of_2(num_splits),
        num_warps=4, **pdl_launch(part.device))
    return out


def mla_decode_tiles(num_heads: int, batch: int) -> tuple[int, int, int, int]:
    """(block_h, block_n, num_warps, num_stages) of the MLA decode kernel for this step."""
    if num_heads >= MANY_HEADS and batch >= MANY_HEADS_MIN_BATCH:
        return MLA_TILES_MANY_HEADS
    return MLA_TILES


def mla_decode_triton(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                      num_splits: int | None = None, block_h: int | None = None, block_n: int | None = None,
                      num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """q_latent [B, H, L], q_rope [B, H, R], kv_cache [NB, BS, L + R] -> [B, H, L] (q dtype).
    Tiles left None come from mla_decode_tiles."""
    batch, num_heads, latent = q_latent.shape
    tiles = mla_decode_tiles(num_heads, batch)
    block_h, block_n, num_warps, num_stages = (given if given is not None else default for given, default in
                                               zip((block_h, block_n, num_warps, num_stages), tiles))
    rope = q_rope.shape[-1]
    page_size = kv_cache.shape[1]
    assert kv_cache.shape[-1] == latent + rope and q_latent.stride(-1) == 1 and q_rope.stride(-1) == 1
    _check_paged(kv_cache, block_tables, seq_lens, batch)
    block_h = max(MIN_HEAD_BLOCK, min(block_h, triton.next_power_of_2(num_heads)))
    head_blocks = triton.cdiv(num_heads, block_h)
    if num_splits is None:
        num_splits = choose_num_splits(batch, head_blocks, _sm_count(q_latent.device), resident=MLA_RESIDENT)
    block_l = triton.next_power_of_2(latent)
    fp8_fast = (kv_cache.dtype == torch.float8_e4m3fn and q_latent.dtype != torch.float32
                and block_n <= MLA_FP8_FAST_MAX_N)
    part = torch.empty(batch, num_heads, num_splits, block_l, dtype=torch.float32, device=q_latent.device)
    lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q_latent.device)
    _mla_decode_split_kernel[(batch, head_blocks, num_splits)](
        q_latent, q_rope, kv_cache, block_tables, seq_lens, part, lse,
        num_heads, num_splits, scale * math.log2(math.e),
        q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), block_tables.stride(0),
        LATENT=latent, ROPE=rope, BLOCK_L=block_l, BLOCK_R=triton.next_power_of_2(rope),
        BLOCK_H=block_h, BLOCK_N=block_n, PAGE_SIZE=page_size,
        DOT_PRECISION=_dot_precision(q_latent.dtype),
        F16_DOTS=fp8_fast and MLA_FP8_F16_DOTS, FAST=q_latent.is_cuda and MLA_FP8_PTX_CVT,
        TILE_IN_PAGE=MLA_TILE_IN_PAGE and page_size % block_n == 0,
        num_warps=num_warps, num_stages=num_stages, **pdl_launch(q_latent.device))
    out = torch.empty(batch, num_heads, latent, dtype=q_latent.dtype, device=q_latent.device)
    return _merge(part, lse, out, latent)


def paged_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        seq_lens: torch.Tensor, scale: float, num_splits: int | None = None, block_n: int = 64,
                        num_warps: int = 4, num_stages: int = 2, out: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, D], k_cache/v_cache [NB, BS, Hkv, D] -> [B, H, D] (q dtype), written into `out` when
    given (any [B, H, D] view with unit last stride: the caller's output rows, no copy after)."""
    batch, num_heads, head_dim = q.shape
    num_kv = k_cache.shape[2]
    page_size = k_cache.shape[1]
    assert num_heads % num_kv == 0 and q.stride(-1) == 1 and v_cache.shape == k_cache.shape
    _check_paged(k_cache, block_tables, seq_lens, batch)
    _check_paged(v_cache, block_tables, seq_lens, batch)
    if out is None:
        out = torch.empty(batch, num_heads, head_dim, dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1
    group = num_heads // num_kv
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv, _sm_count(q.device))
    block_d = triton.next_power_of_2(head_dim)
    part = torch.empty(batch, num_heads, num_splits, block_d, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    _gqa_decode_split_kernel[(batch, num_kv, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, part, lse,
        num_heads, num_splits, scale * math.log2(math.e),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d,
        BLOCK_H=max(MIN_HEAD_BLOCK, triton.next_power_of_2(group)), BLOCK_N=block_n, PAGE_SIZE=page_size,
        DOT_PRECISION=_dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages, **pdl_launch(q.device))
    return _merge(part, lse, out, head_dim)


def prefill_plan(q_lens: list[int], k_lens: list[int], block_m: int, device: torch.device) -> torch.Tensor:
    """The prefill launch table [programs, PLAN_COLS] int32, built on the host from host lengths.

    Sequences with no queries get no program. Rows are ordered by the keys their block sees, most
    first, so the long diagonal blocks of a long sequence do not start in the last wave.
    """
    q = np.asarray(q_lens, dtype=np.int64)
    k = np.asarray(k_lens, dtype=np.int64)
    assert q.shape == k.shape and (k >= q).all(), "each sequence needs k_len >= q_len"
    blocks = -(-q // block_m)
    seq = np.repeat(np.arange(q.size), blocks)
    m0 = (np.arange(seq.size) - np.repeat(np.cumsum(blocks) - blocks, blocks)) * block_m
    q_start, k_start = np.cumsum(q) - q, np.cumsum(k) - k
    plan = np.stack([seq, q_start[seq], q[seq], k[seq], k_start[seq], m0], axis=1)
    plan = plan[np.argsort(-(k[seq] - q[seq] + np.minimum(m0 + block_m, q[seq])), kind="stable")]
    return to_device_async(plan.astype(np.int32), device)


def _prefill_launch(q, k, v, plan, block_tables, paged, page_size, scale, block_m, block_n, num_warps,
                    num_stages):
    """k/v: caches [NB, page, Hkv, D] (paged) or packed tensors [Tk, Hkv, D] (strided views welcome)."""
    num_tokens, num_heads, qk_dim = q.shape
    num_kv, v_dim = k.shape[-2], v.shape[-1]
    assert num_heads % num_kv == 0 and v.shape[-2] == num_kv and k.shape[-1] == qk_dim
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "rows must be contiguous in the last dim"
    assert qk_dim >= 16 and v_dim >= 16, "tl.dot needs dims >= 16"
    assert plan.dtype == torch.int32 and plan.shape[1] == PLAN_COLS.value and plan.is_contiguous()
    out = torch.empty(num_tokens, num_heads, v_dim, dtype=q.dtype, device=q.device)
    if plan.shape[0] == 0:
        return out
    assert plan.shape[0] < 65536, "query blocks go on grid axis 1 (at most 65535): raise block_m"
    dim1 = 1 << (qk_dim.bit_length() - 1)  # the largest power of two <= qk_dim
    if paged:  # [NB, page, Hkv, D]
        k_page, k_tok, v_page, v_tok = k.stride(0), k.stride(1), v.stride(0), v.stride(1)
    else:  # [Tk, Hkv, D]
        k_page, k_tok, v_page, v_tok = 0, k.stride(0), 0, v.stride(0)
    _varlen_prefill_kernel[(num_heads, plan.shape[0])](
        q, k, v, out, plan, block_tables, scale * math.log2(math.e),
        q.stride(0), q.stride(1), k_page, k_tok, k.stride(-2), v_page, v_tok, v.stride(-2),
        out.stride(0), out.stride(1), block_tables.stride(0) if paged else 0,
        GROUP=num_heads // num_kv, QK_DIM1=dim1, QK_DIM2=qk_dim - dim1,
        BLOCK_D2=max(16, triton.next_power_of_2(qk_dim - dim1)), V_DIM=v_dim,
        BLOCK_DV=triton.next_power_of_2(v_dim), BLOCK_M=block_m, BLOCK_N=block_n, PAGED=paged,
        PAGE_SIZE=page_size, DOT_PRECISION=_dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages)
    return out


def paged_prefill_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                         query_lens: list[int], seq_lens: list[int], scale: float, memo: dict | None = None,
                         block_m: int = 64, block_n: int = 64, num_warps: int = 4,
                         num_stages: int = 2) -> torch.Tensor:
    """q [sum(query_lens), H, D] packed by sequence, k_cache/v_cache [NB, BS, Hkv, D] -> [Tq, H, D] (q dtype).

    Sequence b's keys are the first seq_lens[b] tokens of block_tables row b; its queries are the
    last query_lens[b] of them. Lengths are host lists (prefill steps are not graph-captured).
    """
    assert block_tables.dtype == torch.int32 and block_tables.stride(1) == 1
    assert block_tables.shape[0] == len(query_lens) == len(seq_lens) and v_cache.shape == k_cache.shape
    assert q.shape[0] == sum(query_lens)
    plan = memoized(memo, ("paged_prefill", block_m), lambda: prefill_plan(query_lens, seq_lens, block_m, q.device))
    return _prefill_launch(q, k_cache, v_cache, plan, block_tables, True, k_cache.shape[1], scale, block_m,
                           block_n, num_warps, num_stages)


def varlen_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: list[int],
                            cu_seqlens_k: list[int], scale: float, memo: dict | None = None, block_m: int = 64,
                            block_n: int = 64, num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """q [Tq, H, Dqk], k [Tk, Hkv, Dqk], v [Tk, Hkv, Dv] packed by sequence -> [Tq, H, Dv] (q dtype)."""
    def build():
        assert cu_seqlens_q[0] == 0 and cu_seqlens_k[0] == 0 and cu_seqlens_q[-1] == q.shape[0]
        return prefill_plan(np.diff(cu_seqlens_q), np.diff(cu_seqlens_k), block_m, q.device)

    plan = memoized(memo, ("varlen_prefill", block_m), build)
    return _prefill_launch(q, k, v, plan, plan, False, 1, scale, block_m, block_n, num_warps, num_stages)
