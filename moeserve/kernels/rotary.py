"""Rotary position embedding over a precomputed cos/sin cache.

cos_sin_cache [max_positions, rot_dim]: first half cos, second half sin (rot_dim/2 frequencies,
already multiplied by the rope's attention factor). Neox style rotates (x[i], x[i + d/2]).
Interleaved style rotates pairs (x[2i], x[2i+1]) and writes the result de-interleaved
([rotated evens, rotated odds]), as transformers' DeepSeek-V3 does: q and k get the same
permutation, so q.k is unchanged and the cache stays consistent.

The Triton kernel rotates q and k in one launch and writes new contiguous tensors (inputs are
often views, e.g. the rope part of q, and callers use the returned tensors).
"""

from __future__ import annotations

import torch

from moeserve.kernels.rmsnorm import _use_triton, triton


def apply_rotary_ref(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                     interleaved: bool) -> torch.Tensor:
    """x [T, heads, rot_dim], positions [T] -> rotated x (same shape and dtype)."""
    half = cos_sin_cache.shape[-1] // 2
    cos_sin = cos_sin_cache[positions].to(x.dtype)
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


if triton is not None:
    import triton.language as tl
    from moeserve.kernels.fp8 import _cast_to
    from moeserve.kernels.pdl import pdl_begin, pdl_launch

    @triton.jit
    def _load_cos_sin(cache_ptr, pos_ptr, t, stride_cache, half, d, d_mask, ty):
        # token t's cos and sin rounded to the activation dtype ty as the reference does; the
        # rotation's products and sums stay in fp32
        pos = tl.load(pos_ptr + t).to(tl.int64)
        cos = tl.load(cache_ptr + pos * stride_cache + d, mask=d_mask, other=0.0)
        sin = tl.load(cache_ptr + pos * stride_cache + half + d, mask=d_mask, other=0.0)
        return cos.to(ty).to(tl.float32), sin.to(ty).to(tl.float32)

    @triton.jit
    def _rotate_heads(x_ptr, o_ptr, t, head0, num_heads, stride_xt, stride_xh, stride_ot, stride_oh, cos, sin,
                      d, d_mask, half, INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr,
                      ROUND_TO: tl.constexpr = None, FAST: tl.constexpr = True):
        # ROUND_TO: the result rounded to that dtype before o's (an FP8 cache: as x's dtype, then e4m3;
        # FAST False: off a GPU, see fp8._cast_to)
        heads = head0 + tl.arange(0, BLOCK_H)
        mask = (heads[:, None] < num_heads) & d_mask[None, :]
        x_row = x_ptr + t * stride_xt + heads[:, None].to(tl.int64) * stride_xh
        if INTERLEAVED:
            x1 = tl.load(x_row + 2 * d[None, :], mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_row + 2 * d[None, :] + 1, mask=mask, other=0.0).to(tl.float32)
        else:
            x1 = tl.load(x_row + d[None, :], mask=mask, other=0.0).to(tl.float32)
            x2 = tl.load(x_row + half + d[None, :], mask=mask, other=0.0).to(tl.float32)
        o_row = o_ptr + t * stride_ot + heads[:, None].to(tl.int64) * stride_oh
        ty = o_ptr.dtype.element_ty
        o1, o2 = x1 * cos[None, :] - x2 * sin[None, :], x2 * cos[None, :] + x1 * sin[None, :]
        if ROUND_TO is not None:
            o1, o2 = o1.to(ROUND_TO), o2.to(ROUND_TO)
        tl.store(o_row + d[None, :], _cast_to(o1, ty, FAST), mask=mask)
        tl.store(o_row + half + d[None, :], _cast_to(o2, ty, FAST), mask=mask)

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, q_out_ptr, k_out_ptr, pos_ptr, cache_ptr, num_q_heads, num_k_heads, half,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh,
                       stride_cache, INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                       PDL: tl.constexpr = False):
        pdl_begin(PDL)
        # program (token, head block); the first head blocks are q's, the rest k's
        t = tl.program_id(0).to(tl.int64)
        hb = tl.program_id(1)
        d = tl.arange(0, BLOCK_D)
        d_mask = d < half
        cos, sin = _load_cos_sin(cache_ptr, pos_ptr, t, stride_cache, half, d, d_mask, q_out_ptr.dtype.element_ty)
        num_q_blocks = tl.cdiv(num_q_heads, BLOCK_H)
        if hb < num_q_blocks:
            _rotate_heads(q_ptr, q_out_ptr, t, hb * BLOCK_H, num_q_heads, stride_qt, stride_qh, stride_qot,
                          stride_qoh, cos, sin, d, d_mask, half, INTERLEAVED, BLOCK_H)
        else:
            _rotate_heads(k_ptr, k_out_ptr, t, (hb - num_q_blocks) * BLOCK_H, num_k_heads, stride_kt, stride_kh,
                          stride_kot, stride_koh, cos, sin, d, d_mask, half, INTERLEAVED, BLOCK_H)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def rotary_qk_triton(q: torch.Tensor, k: torch.Tensor | None, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                     interleaved: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """apply_rotary_ref on q [T, Hq, R] and k [T, Hk, R] (or None) in one launch -> new contiguous tensors.

    Products and sums stay in fp32 with one rounding at the store (the reference rounds each op to
    x's dtype), so bf16/fp16 results differ from it by a rounding or so (fp32: ~1e-7)."""
    assert q.dim() == 3 and q.shape[-1] == cos_sin_cache.shape[-1] and positions.shape == (q.shape[0],)
    assert k is None or (k.dim() == 3 and k.shape[0] == q.shape[0] and k.shape[-1] == q.shape[-1]
                         and k.dtype == q.dtype)
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = None if k is None else torch.empty(k.shape, dtype=k.dtype, device=k.device)
    num_tokens, half = q.shape[0], q.shape[-1] // 2
    if num_tokens == 0:
        return q_out, k_out
    q = _unit_last(q)
    kk = q if k is None else _unit_last(k)  # no k: zero k heads, so no k programs
    k_heads = 0 if k is None else k.shape[1]
    ko = q_out if k_out is None else k_out
    cache = _unit_last(cos_sin_cache)
    block_d = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(max(q.shape[1], k_heads)), max(1, 1024 // block_d))
    grid = (num_tokens, triton.cdiv(q.shape[1], block_h) + triton.cdiv(k_heads, block_h))
    _rotary_kernel[grid](q, kk, q_out, ko, positions, cache, q.shape[1], k_heads, half,
                         q.stride(0), q.stride(1), kk.stride(0), kk.stride(1), q_out.stride(0), q_out.stride(1),
                         ko.stride(0), ko.stride(1), cache.stride(0),
                         INTERLEAVED=interleaved, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4, **pdl_launch(q.device))
    return q_out, k_out


def apply_rotary_triton(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                        interleaved: bool) -> torch.Tensor:
    return rotary_qk_triton(x, None, positions, cos_sin_cache, interleaved)[0]


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                 interleaved: bool) -> torch.Tensor:
    if _use_triton(x, positions, cos_sin_cache):
        return apply_rotary_triton(x, positions, cos_sin_cache, interleaved)
    return apply_rotary_ref(x, positions, cos_sin_cache, interleaved)


def apply_rotary_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                    interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(apply_rotary(q), apply_rotary(k)) in one launch where the kernel runs."""
    if _use_triton(q, k, positions, cos_sin_cache) and k.dtype == q.dtype:
        return rotary_qk_triton(q, k, positions, cos_sin_cache, interleaved)
    return (apply_rotary_ref(q, positions, cos_sin_cache, interleaved),
            apply_rotary_ref(k, positions, cos_sin_cache, interleaved))
