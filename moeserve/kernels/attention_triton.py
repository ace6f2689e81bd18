"""Triton decode attention over the paged KV cache (split-KV, a.k.a. flash-decoding).

One query token per sequence. A decode batch is often small while each sequence is long, so
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
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

MAX_SPLITS = 32
MIN_HEAD_BLOCK = 16  # tl.dot needs M >= 16


@triton.jit
def _paged_slots(bt_row_ptr, offs_n, valid, PAGE_SIZE: tl.constexpr, stride_page, stride_tok):
    """Element offsets (int64) of tokens offs_n of one sequence in a paged cache."""
    page = tl.load(bt_row_ptr + offs_n // PAGE_SIZE, mask=valid, other=0).to(tl.int64)
    return page * stride_page + (offs_n % PAGE_SIZE).to(tl.int64) * stride_tok


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


@triton.jit
def _mla_decode_split_kernel(
        ql_ptr, qr_ptr, kv_ptr, bt_ptr, seq_lens_ptr, part_ptr, lse_ptr,
        num_heads, num_splits, qk_scale_log2,
        stride_ql_b, stride_ql_h, stride_qr_b, stride_qr_h, stride_kv_page, stride_kv_tok, stride_bt,
        LATENT: tl.constexpr, ROPE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
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

    seq_len = tl.load(seq_lens_ptr + b)
    start, end = _split_range(seq_len, split, num_splits, BLOCK_N)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt

    # finite floor instead of -inf: a fully masked tile then gives exp2(-inf) = 0, never inf - inf
    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_L], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = offs_n < end
        slots = _paged_slots(bt_row, offs_n, valid, PAGE_SIZE, stride_kv_page, stride_kv_tok)
        kv_lat = tl.load(kv_ptr + slots[:, None] + offs_l[None, :], mask=valid[:, None] & l_mask[None, :],
                         other=0.0).to(q_lat.dtype)
        kv_rope = tl.load(kv_ptr + slots[:, None] + LATENT + offs_r[None, :], mask=valid[:, None] & r_mask[None, :],
                          other=0.0).to(q_lat.dtype)
        s = tl.dot(q_lat, tl.trans(kv_lat), input_precision=DOT_PRECISION)
        s += tl.dot(q_rope, tl.trans(kv_rope), input_precision=DOT_PRECISION)
        s = tl.where(valid[None, :], s * qk_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv_lat.dtype), kv_lat, input_precision=DOT_PRECISION)
        m_i = m_new

    # m_i is in log2 units: (m_i + log2 l) * ln 2 is the natural-log lse
    _store_partial(acc, m_i, l_i, part_ptr, lse_ptr, b * num_heads + offs_h, h_mask, offs_l, l_mask, BLOCK_L,
                   split, num_splits)


@triton.jit
def _gqa_decode_split_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, part_ptr, lse_ptr,
        num_heads, num_splits, qk_scale_log2,
        stride_q_b, stride_q_h, stride_k_page, stride_k_tok, stride_k_head,
        stride_v_page, stride_v_tok, stride_v_head, stride_bt,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
        BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr):
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


@triton.jit
def _merge_splits_kernel(part_ptr, lse_ptr, out_ptr, num_heads, num_splits, stride_out_b, stride_out_h,
                         DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """out[row] = sum_s exp(lse_s) * part_s / sum_s exp(lse_s) for one (sequence, head) row."""
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


# ---- host side ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the CPU interpreter: a few splits keep the split path exercised
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_num_splits(batch: int, programs_per_seq: int, sm_count: int, max_splits: int = MAX_SPLITS) -> int:
    """Splits per sequence so that batch * programs_per_seq * splits covers about two waves of SMs.

    Shapes only (no seq_lens values): the choice is fixed at CUDA-graph capture. Splits past a
    short sequence's end cost one empty program each, which is cheap next to a long one's loop.
    """
    programs = max(batch * programs_per_seq, 1)
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
        num_warps=4)
    return out


def mla_decode_triton(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                      num_splits: int | None = None, block_h: int = 16, block_n: int = 32,
                      num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """q_latent [B, H, L], q_rope [B, H, R], kv_cache [NB, BS, L + R] -> [B, H, L] (q dtype)."""
    batch, num_heads, latent = q_latent.shape
    rope = q_rope.shape[-1]
    page_size = kv_cache.shape[1]
    assert kv_cache.shape[-1] == latent + rope and q_latent.stride(-1) == 1 and q_rope.stride(-1) == 1
    _check_paged(kv_cache, block_tables, seq_lens, batch)
    block_h = max(MIN_HEAD_BLOCK, min(block_h, triton.next_power_of_2(num_heads)))
    head_blocks = triton.cdiv(num_heads, block_h)
    if num_splits is None:
        num_splits = choose_num_splits(batch, head_blocks, _sm_count(q_latent.device))
    block_l = triton.next_power_of_2(latent)
    part = torch.empty(batch, num_heads, num_splits, block_l, dtype=torch.float32, device=q_latent.device)
    lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q_latent.device)
    _mla_decode_split_kernel[(batch, head_blocks, num_splits)](
        q_latent, q_rope, kv_cache, block_tables, seq_lens, part, lse,
        num_heads, num_splits, scale * math.log2(math.e),
        q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), block_tables.stride(0),
        LATENT=latent, ROPE=rope, BLOCK_L=block_l, BLOCK_R=triton.next_power_of_2(rope),
        BLOCK_H=block_h, BLOCK_N=block_n, PAGE_SIZE=page_size,
        DOT_PRECISION=_dot_precision(q_latent.dtype), num_warps=num_warps, num_stages=num_stages)
    out = torch.empty(batch, num_heads, latent, dtype=q_latent.dtype, device=q_latent.device)
    return _merge(part, lse, out, latent)


def paged_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        seq_lens: torch.Tensor, scale: float, num_splits: int | None = None, block_n: int = 64,
                        num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """q [B, H, D], k_cache/v_cache [NB, BS, Hkv, D] -> [B, H, D] (q dtype)."""
    batch, num_heads, head_dim = q.shape
    num_kv = k_cache.shape[2]
    page_size = k_cache.shape[1]
    assert num_heads % num_kv == 0 and q.stride(-1) == 1 and v_cache.shape == k_cache.shape
    _check_paged(k_cache, block_tables, seq_lens, batch)
    _check_paged(v_cache, block_tables, seq_lens, batch)
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
        DOT_PRECISION=_dot_precision(q.dtype), num_warps=num_warps, num_stages=num_stages)
    out = torch.empty(batch, num_heads, head_dim, dtype=q.dtype, device=q.device)
    return _merge(part, lse, out, head_dim)
