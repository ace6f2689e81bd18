"""MLA's cache write: from the kv_a projection's output to the latent KV cache in one launch.

kv_a [T, kv_lora_rank + rope_dim] (the kv part of the merged q/kv_a GEMM's output, a strided view)
holds per token the latent and the rope key. The cache entry is [rmsnorm(latent) | rope(k_pe)],
written at the token's slot. Given the query's rope part q_pe [T, H, rope_dim] too, the same
launch rotates it (same positions, same cos/sin) into a new contiguous tensor: the layer's
whole rope is then this one kernel. Unfused this is five kernels (norm, q and k rotary, cat,
index_copy_); the Triton kernel normalises, rotates and stores in one (one program per token),
with the norm's and the rotary kernel's rounding (kernels/rmsnorm.py, kernels/rotary.py).
"""

from __future__ import annotations

import torch

from moeserve.kernels.rmsnorm import _use_triton, rmsnorm, rmsnorm_ref, triton
from moeserve.kernels.rotary import apply_rotary, apply_rotary_ref


MLA_ROPE_HEAD_BLOCK = 16


def write_cache_entries(cache: torch.Tensor, slot_mapping: torch.Tensor, values: torch.Tensor) -> None:
    """cache [num_blocks, block_size, *entry] <- values [T, *entry] at slot_mapping, cast to the cache's
    dtype. No host sync (CUDA graphs): padded tokens carry slots of block 0, a scratch block the KV
    manager never hands out. (The unfused write of both attention kinds: MLA's and GQA's.)"""
    flat = cache.view(-1, *cache.shape[2:])
    values = values.to(cache.dtype)
    if cache.dtype == torch.float8_e4m3fn:  # index_copy_ has no float8 kernels: move the bytes
        flat, values = flat.view(torch.uint8), values.view(torch.uint8)
    flat.index_copy_(0, slot_mapping, values)


def _unfused(kv_a, norm_weight, eps, positions, cos_sin_cache, interleaved, cache, slot_mapping, q_pe, norm,
             rotate):
    rank = kv_a.shape[-1] - cos_sin_cache.shape[-1]
    latent, k_pe = kv_a.split([rank, kv_a.shape[-1] - rank], dim=-1)
    k_pe = rotate(k_pe.unsqueeze(1), positions, cos_sin_cache, interleaved).squeeze(1)
    write_cache_entries(cache, slot_mapping, torch.cat((norm(latent, norm_weight, eps), k_pe), dim=-1))
    return None if q_pe is None else rotate(q_pe, positions, cos_sin_cache, interleaved)


def mla_kv_write_ref(kv_a: torch.Tensor, norm_weight: torch.Tensor, eps: float, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor, interleaved: bool, cache: torch.Tensor,
                     slot_mapping: torch.Tensor, q_pe: torch.Tensor | None = None) -> torch.Tensor | None:
    """cache[slot_mapping[t]] = [rmsnorm(latent[t]) | rope(k_pe[t], positions[t])]; returns
    rope(q_pe) when q_pe is given."""
    return _unfused(kv_a, norm_weight, eps, positions, cos_sin_cache, interleaved, cache, slot_mapping, q_pe,
                    rmsnorm_ref, apply_rotary_ref)


if triton is not None:
    import triton.language as tl
    from moeserve.kernels.pdl import pdl_begin, pdl_launch

    from moeserve.kernels.fp8 import _cast_to
    from moeserve.kernels.rotary import _load_cos_sin, _rotate_heads

    @triton.jit
    def _mla_kv_write_kernel(kv_ptr, w_ptr, pos_ptr, cs_ptr, cache_ptr, slot_ptr, q_ptr, q_out_ptr, rank, half,
                             stride_kv, stride_cs, entry, eps, num_q_heads, stride_qt, stride_qh,
                             INTERLEAVED: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_QH: tl.constexpr, FAST: tl.constexpr = True, PDL: tl.constexpr = False):
        pdl_begin(PDL)
        # program (token, block of query heads); the token's first program also writes its cache entry
        t = tl.program_id(0).to(tl.int64)
        head_block = tl.program_id(1)
        d = tl.arange(0, BLOCK_D)
        d_mask = d < half
        cos, sin = _load_cos_sin(cs_ptr, pos_ptr, t, stride_cs, half, d, d_mask, kv_ptr.dtype.element_ty)
        if head_block == 0:
            src = kv_ptr + t * stride_kv
            dst = cache_ptr + tl.load(slot_ptr + t).to(tl.int64) * entry
            # the latent's RMSNorm, rounded as kernels/rmsnorm.py rounds
            cols = tl.arange(0, BLOCK_L)
            mask = cols < rank
            x = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
            inv = tl.rsqrt(tl.sum(x * x, axis=0) / rank + eps)
            y = (x * inv).to(kv_ptr.dtype.element_ty)
            w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            # rounded to the activations' dtype first, as the unfused path casts its bf16 result (FP8 cache)
            latent = (w * y.to(tl.float32)).to(kv_ptr.dtype.element_ty)
            tl.store(dst + cols, _cast_to(latent, cache_ptr.dtype.element_ty, FAST), mask=mask)
            # the rope key, rotated as kernels/rotary.py rotates one head
            _rotate_heads(src + rank, dst + rank, 0, 0, 1, 0, 0, 0, 0, cos, sin, d, d_mask, half, INTERLEAVED, 1,
                          kv_ptr.dtype.element_ty, FAST)
        if BLOCK_QH > 0:  # the query's rope part into the contiguous q_out [T, H, rope]
            _rotate_heads(q_ptr, q_out_ptr, t, head_block * BLOCK_QH, num_q_heads, stride_qt, stride_qh,
                          num_q_heads * 2 * half, 2 * half, cos, sin, d, d_mask, half, INTERLEAVED, BLOCK_QH)


def mla_kv_write_triton(kv_a: torch.Tensor, norm_weight: torch.Tensor, eps: float, positions: torch.Tensor,
                        cos_sin_cache: torch.Tensor, interleaved: bool, cache: torch.Tensor,
                        slot_mapping: torch.Tensor, q_pe: torch.Tensor | None = None) -> torch.Tensor | None:
    num_tokens, width = kv_a.shape
    rope = cos_sin_cache.shape[-1]
    rank = width - rope
    assert cache.shape[-1] == width and cache.is_contiguous() and kv_a.stride(-1) == 1
    assert cache.dtype in (kv_a.dtype, torch.float8_e4m3fn) and kv_a.dtype == norm_weight.dtype
    assert norm_weight.shape == (rank,)
    q_out = None
    if q_pe is not None:
        assert q_pe.dim() == 3 and q_pe.shape[0] == num_tokens and q_pe.shape[-1] == rope
        assert q_pe.dtype == kv_a.dtype and q_pe.stride(-1) == 1
        q_out = torch.empty(q_pe.shape, dtype=q_pe.dtype, device=q_pe.device)
    if num_tokens == 0:
        return q_out
    cs = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    q_in = kv_a if q_pe is None else q_pe  # no q_pe: the kernel's q branch is compiled out
    heads = 0 if q_pe is None else q_pe.shape[1]
    # up to MLA_ROPE_HEAD_BLOCK query heads a program: V3's 128 heads in one program measured 1.5x
    # slower than its rotary kernel and cache write apart (benchmarks/kernel_bench_mla_layer.py)
    block_qh = min(MLA_ROPE_HEAD_BLOCK, triton.next_power_of_2(heads)) if heads else 0
    _mla_kv_write_kernel[(num_tokens, triton.cdiv(heads, block_qh) if heads else 1)](
        kv_a, norm_weight, positions, cs, cache, slot_mapping, q_in, q_in if q_out is None else q_out,
        rank, rope // 2, kv_a.stride(0), cs.stride(0), width, eps,
        heads, q_in.stride(0), 0 if q_pe is None else q_pe.stride(1),
        INTERLEAVED=interleaved, BLOCK_L=triton.next_power_of_2(rank), BLOCK_D=triton.next_power_of_2(rope // 2),
        BLOCK_QH=block_qh, FAST=kv_a.is_cuda, num_warps=4, **pdl_launch(kv_a.device))
    return q_out


def mla_kv_write(kv_a: torch.Tensor, norm_weight: torch.Tensor, eps: float, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor, interleaved: bool, cache: torch.Tensor,
                 slot_mapping: torch.Tensor, q_pe: torch.Tensor | None = None) -> torch.Tensor | None:
    """One launch where Triton runs and the cache has the activations' dtype or e4m3; else (plain
    CPU) the norm and rotary kernels (or their references), a cat and the write. Returns q_pe rotated
    (a new contiguous tensor) when q_pe is given.

    An e4m3 entry is rounded to the activations' dtype first, as the unfused path does, then cast by
    the GPU (round to nearest even, saturating at +-448), not by torch (tests/kernels/test_mla_cache.py:
    bit for bit under the interpreter in fp32, within 1e-2 in bf16 on a GPU); kernels/gqa_cache.py
    writes its FP8 entries the same way."""
    if (_use_triton(kv_a, norm_weight) and triton is not None
            and cache.dtype in (kv_a.dtype, torch.float8_e4m3fn)
            and norm_weight.dtype == kv_a.dtype and kv_a.stride(-1) == 1 and cache.is_contiguous()
            and (q_pe is None or (q_pe.dtype == kv_a.dtype and q_pe.stride(-1) == 1))):
        return mla_kv_write_triton(kv_a, norm_weight, eps, positions, cos_sin_cache, interleaved, cache,
                                   slot_mapping, q_pe)
    return _unfused(kv_a, norm_weight, eps, positions, cos_sin_cache, interleaved, cache, slot_mapping, q_pe,
                    rmsnorm, apply_rotary)
