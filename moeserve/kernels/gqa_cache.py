"""GQA's attention prologue (Qwen3): from the merged q/k/v projection to rotated q and the paged KV cache.

q [T, Hq, D], k and v [T, Hkv, D] (views of the merged qkv GEMM's output: heads of unit column
stride, any token and head stride). Per token: q' = rope(rmsnorm(q) per head), k' = rope(rmsnorm(k)
per head); k' and v are written into the paged caches at the token's slot and q' is returned (a
new contiguous tensor, what the decode/prefill attention reads). Unfused this is five kernels (q
norm, k norm, rotary of q and k, two index_copy_ writes); the Triton kernel does it in one launch,
one program per (token, block of heads): q's head blocks first, then the KV head blocks, whose
programs also store v. The rotation is the full head (rot_dim == head_dim), neox or interleaved
(kernels/rotary.py's layouts).

Rounding, as the unfused kernels round: the norm as kernels/rmsnorm.py (normalised row rounded to
the activation dtype, scaled by the weight in fp32, rounded again), the rotation as
kernels/rotary.py (cos/sin rounded to the activation dtype, products and sums in fp32, one rounding
at the store). So against the torch reference (which rounds every rotary op), fp32 results agree
to ~1e-7 and fp16/bf16 ones to a rounding or so; v is copied, bit for bit.

Cache writes follow mla_cache.write_cache_entries (the unfused write, formerly
layers.attention.write_cache): the value rounded to the activation dtype, then cast to the cache's
dtype. An FP8 (e4m3fn) cache gets what mla_cache.py's kernel writes (fp8._cast_to): round to
nearest even, saturating at +-448, NaN kept; the GPU's own conversion, and torch 2.13's. torch
2.11's (the unfused path's, on the device machines) differs only past the range: |x| >= 464 and inf
become NaN there (measured on an H200: no other byte of 8,192 values differed). Slots are taken as
given, as the unfused write and the MLA kernel take them: CUDA-graph padding rows carry slots of
scratch block 0 (never handed out); there are no negative slots.

Qwen3 always has q_norm and k_norm (and GQAAttention always builds them), so both are required;
one eps serves both (both are the config's rms_norm_eps).
"""

from __future__ import annotations

import torch

from moeserve.kernels.mla_cache import write_cache_entries
from moeserve.kernels.rmsnorm import _use_triton, rmsnorm, rmsnorm_ref, triton
from moeserve.kernels.rotary import apply_rotary_qk, apply_rotary_ref

FP8 = torch.float8_e4m3fn


def _unfused(q, k, v, q_weight, k_weight, eps, positions, cos_sin_cache, interleaved, k_cache, v_cache,
             slot_mapping, norm, rotate_qk):
    q, k = rotate_qk(norm(q, q_weight, eps), norm(k, k_weight, eps), positions, cos_sin_cache, interleaved)
    write_cache_entries(k_cache, slot_mapping, k)
    write_cache_entries(v_cache, slot_mapping, v)
    return q


def _rotary_qk_ref(q, k, positions, cos_sin_cache, interleaved):
    return (apply_rotary_ref(q, positions, cos_sin_cache, interleaved),
            apply_rotary_ref(k, positions, cos_sin_cache, interleaved))


def gqa_qkv_write_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor,
                      k_weight: torch.Tensor, eps: float, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                      interleaved: bool, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> torch.Tensor:
    """k_cache[slot[t]] = rope(rmsnorm(k[t])), v_cache[slot[t]] = v[t]; returns rope(rmsnorm(q)).
    Caches [num_blocks, block_size, Hkv, D]."""
    return _unfused(q, k, v, q_weight, k_weight, eps, positions, cos_sin_cache, interleaved, k_cache, v_cache,
                    slot_mapping, rmsnorm_ref, _rotary_qk_ref)


if triton is not None:
    import triton.language as tl
    from moeserve.kernels.pdl import pdl_begin, pdl_launch

    from moeserve.kernels.fp8 import _cast_to
    from moeserve.kernels.rotary import _load_cos_sin

    @triton.jit
    def _store_entry(ptr, val, mask, FAST: tl.constexpr):
        # val: fp32 holding values already rounded to the activation dtype; cast to the cache's dtype
        # (e4m3: round to nearest even, saturating, as mla_cache.py writes its FP8 entries)
        tl.store(ptr, _cast_to(val, ptr.dtype.element_ty, FAST), mask=mask)

    @triton.jit
    def _norm_rope_heads(x_row, stride_h, heads, num_heads, w_ptr, eps, cos, sin, d, d_mask, half,
                         INTERLEAVED: tl.constexpr):
        # heads [BLOCK_H] of one token: RMSNorm each (as kernels/rmsnorm.py rounds), then rotate (as
        # kernels/rotary.py rotates); returns the rotated halves in fp32, rounded to x's dtype
        ty = x_row.dtype.element_ty
        if INTERLEAVED:
            i1, i2 = 2 * d, 2 * d + 1
        else:
            i1, i2 = d, half + d
        mask = (heads[:, None] < num_heads) & d_mask[None, :]
        rows = x_row + heads[:, None].to(tl.int64) * stride_h
        x1 = tl.load(rows + i1[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(rows + i2[None, :], mask=mask, other=0.0).to(tl.float32)
        inv = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * half) + eps)
        w1 = tl.load(w_ptr + i1, mask=d_mask, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + i2, mask=d_mask, other=0.0).to(tl.float32)
        y1 = (w1[None, :] * (x1 * inv[:, None]).to(ty).to(tl.float32)).to(ty).to(tl.float32)
        y2 = (w2[None, :] * (x2 * inv[:, None]).to(ty).to(tl.float32)).to(ty).to(tl.float32)
        o1 = (y1 * cos[None, :] - y2 * sin[None, :]).to(ty).to(tl.float32)
        o2 = (y2 * cos[None, :] + y1 * sin[None, :]).to(ty).to(tl.float32)
        return o1, o2, mask

    @triton.jit
    def _gqa_qkv_write_kernel(q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, pos_ptr, cs_ptr, q_out_ptr, k_cache_ptr,
                              v_cache_ptr, slot_ptr, num_q_heads, num_kv_heads, half, eps, stride_qt, stride_qh,
                              stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, FAST: tl.constexpr,
                              INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                              PDL: tl.constexpr = False):
        pdl_begin(PDL)
        # program (token, head block); the first head blocks are q's, the rest the KV heads'
        t = tl.program_id(0).to(tl.int64)
        hb = tl.program_id(1)
        d = tl.arange(0, BLOCK_D)
        d_mask = d < half
        head_dim = 2 * half
        cos, sin = _load_cos_sin(cs_ptr, pos_ptr, t, stride_cs, half, d, d_mask, q_ptr.dtype.element_ty)
        num_q_blocks = tl.cdiv(num_q_heads, BLOCK_H)
        if hb < num_q_blocks:
            heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
            o1, o2, mask = _norm_rope_heads(q_ptr + t * stride_qt, stride_qh, heads, num_q_heads, qw_ptr, eps,
                                            cos, sin, d, d_mask, half, INTERLEAVED)
            dst = q_out_ptr + (t * num_q_heads + heads[:, None]) * head_dim  # q_out: contiguous [T, Hq, D]
            tl.store(dst + d[None, :], o1.to(q_out_ptr.dtype.element_ty), mask=mask)
            tl.store(dst + half + d[None, :], o2.to(q_out_ptr.dtype.element_ty), mask=mask)
        else:
            heads = (hb - num_q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
            o1, o2, mask = _norm_rope_heads(k_ptr + t * stride_kt, stride_kh, heads, num_kv_heads, kw_ptr, eps,
                                            cos, sin, d, d_mask, half, INTERLEAVED)
            # cache entry of the slot: [Hkv, D], contiguous
            entry = tl.load(slot_ptr + t).to(tl.int64) * num_kv_heads * head_dim + heads[:, None] * head_dim
            _store_entry(k_cache_ptr + entry + d[None, :], o1, mask, FAST)
            _store_entry(k_cache_ptr + entry + half + d[None, :], o2, mask, FAST)
            v_row = v_ptr + t * stride_vt + heads[:, None].to(tl.int64) * stride_vh
            v1 = tl.load(v_row + d[None, :], mask=mask, other=0.0).to(tl.float32)
            v2 = tl.load(v_row + half + d[None, :], mask=mask, other=0.0).to(tl.float32)
            _store_entry(v_cache_ptr + entry + d[None, :], v1, mask, FAST)
            _store_entry(v_cache_ptr + entry + half + d[None, :], v2, mask, FAST)


def gqa_qkv_write_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor,
                         k_weight: torch.Tensor, eps: float, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                         interleaved: bool, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor) -> torch.Tensor:
    """gqa_qkv_write_ref in one launch; returns q' as a new contiguous [T, Hq, D] tensor."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert head_dim % 2 == 0 and cos_sin_cache.shape[-1] == head_dim and positions.shape == (num_tokens,)
    assert k.shape == v.shape == (num_tokens, num_kv_heads, head_dim) and slot_mapping.shape == (num_tokens,)
    assert q.dtype == k.dtype == v.dtype == q_weight.dtype == k_weight.dtype
    assert q_weight.shape == k_weight.shape == (head_dim,) and q_weight.is_contiguous() and k_weight.is_contiguous()
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
    assert k_cache.shape == v_cache.shape and k_cache.shape[2:] == (num_kv_heads, head_dim)
    assert k_cache.dtype == v_cache.dtype and k_cache.dtype in (q.dtype, FP8)
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    cs = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    half = head_dim // 2
    block_d = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(max(num_q_heads, num_kv_heads)), max(1, 1024 // block_d))
    grid = (num_tokens, triton.cdiv(num_q_heads, block_h) + triton.cdiv(num_kv_heads, block_h))
    _gqa_qkv_write_kernel[grid](
        q, k, v, q_weight, k_weight, positions, cs, q_out, k_cache, v_cache, slot_mapping, num_q_heads, num_kv_heads,
        half, eps, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cs.stride(0),
        FAST=q.is_cuda, INTERLEAVED=interleaved, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4, **pdl_launch(q.device))
    return q_out


def gqa_qkv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor,
                  k_weight: torch.Tensor, eps: float, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                  interleaved: bool, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> torch.Tensor:
    """One launch where Triton runs and the cache is in the activations' dtype or e4m3; else (plain
    CPU) the norm and rotary kernels' dispatchers and two index_copy_ writes."""
    from moeserve.kernels.fp8 import triton_runs_on

    if (triton is not None and _use_triton(q, k, v, q_weight, k_weight)
            and triton_runs_on(q, positions, slot_mapping, k_cache, v_cache)
            and q.dtype == k.dtype == v.dtype == q_weight.dtype == k_weight.dtype
            and k_cache.dtype == v_cache.dtype and k_cache.dtype in (q.dtype, FP8)
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            and k_cache.is_contiguous() and v_cache.is_contiguous() and cos_sin_cache.shape[-1] == q.shape[-1]):
        return gqa_qkv_write_triton(q, k, v, q_weight, k_weight, eps, positions, cos_sin_cache, interleaved,
                                    k_cache, v_cache, slot_mapping)
    return _unfused(q, k, v, q_weight, k_weight, eps, positions, cos_sin_cache, interleaved, k_cache, v_cache,
                    slot_mapping, rmsnorm, apply_rotary_qk)
