"""MLA's cache write: from the kv_a projection's output to the latent KV cache in one launch.

kv_a [T, kv_lora_rank + rope_dim] (the kv part of the merged q/kv_a GEMM's output, a strided view)
holds per token the latent and the rope key. The cache entry is [rmsnorm(latent) | rope(k_pe)],
written at the token's slot. Unfused this is four kernels (norm, rotary, cat, index_copy_); the
Triton kernel normalises, rotates and stores in one (one program per token), with the norm's
and the rotary kernel's rounding (kernels/rmsnorm.py, kernels/rotary.py).
"""

from __future__ import annotations

import torch

from moeserve.kernels.rmsnorm import _use_triton, rmsnorm, rmsnorm_ref, triton
from moeserve.kernels.rotary import apply_rotary, apply_rotary_ref


def write_cache_entries(cache: torch.Tensor, slot_mapping: torch.Tensor, values: torch.Tensor) -> None:
    """cache [num_blocks, block_size, *entry] <- values [T, *entry] at slot_mapping, cast to the cache's
    dtype. No host sync (CUDA graphs): padded tokens carry slots of block 0, a scratch block the KV
    manager never hands out. (The unfused write of both attention kinds: MLA's and GQA's.)"""
    flat = cache.view(-1, *cache.shape[2:])
    values = values.to(cache.dtype)
    if cache.dtype == torch.float8_e4m3fn:  # index_copy_ has no float8 kernels: move the bytes
        flat, values = flat.view(torch.uint8), values.view(torch.uint8)
    flat.index_copy_(0, slot_mapping, values)


def _unfused(kv_a, norm_weight, eps, positions, cos_sin_cache, interleaved, cache, slot_mapping, norm, rotate):
    rank = kv_a.shape[-1] - cos_sin_cache.shape[-1]
    latent, k_pe = kv_a.split([rank, kv_a.shape[-1] - rank], dim=-1)
    k_pe = rotate(k_pe.unsqueeze(1), positions, cos_sin_cache, interleaved).squeeze(1)
    write_cache_entries(cache, slot_mapping, torch.cat((norm(latent, norm_weight, eps), k_pe), dim=-1))


def mla_kv_write_ref(kv_a: torch.Tensor, norm_weight: torch.Tensor, eps: float, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor, interleaved: bool, cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> None:
    """cache[slot_mapping[t]] = [rmsnorm(latent[t]) | rope(k_pe[t], positions[t])]."""
    _unfused(kv_a, norm_weight, eps, positions, cos_sin_cache, interleaved, cache, slot_mapping, rmsnorm_ref,
             apply_rotary_ref)


if triton is not None:
    import triton.language as tl

    from moeserve.kernels.rotary import _load_cos_sin, _rotate_heads

    @triton.jit
    def _mla_kv_write_kernel(kv_ptr, w_ptr, pos_ptr, cs_ptr, cache_ptr, slot_ptr, rank, half, stride_kv,
                             stride_cs, entry, eps, INTERLEAVED: tl.constexpr, BLOCK_L: tl.constexpr,
                             BLOCK_D: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        src = kv_ptr + t * stride_kv
        dst = cache_ptr + tl.load(slot_ptr + t).to(tl.int64) * entry
        # the latent's RMSNorm, rounded as kernels/rmsnorm.py rounds
        cols = tl.arange(0, BLOCK_L)
        mask = cols < rank
        x = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
        inv = tl.rsqrt(tl.sum(x * x, axis=0) / rank + eps)
        y = (x * inv).to(kv_ptr.dtype.element_ty)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst + cols, (w * y.to(tl.float32)).to(cache_ptr.dtype.element_ty), mask=mask)
        # the rope key, rotated as kernels/rotary.py rotates one head
        d = tl.arange(0, BLOCK_D)
        d_mask = d < half
        cos, sin = _load_cos_sin(cs_ptr, pos_ptr, t, stride_cs, half, d, d_mask, kv_ptr.dtype.element_ty)
        _rotate_heads(src + rank, dst + rank, 0, 0, 1, 0, 0, 0, 0, cos, sin, d, d_mask, half, INTERLEAVED, 1)


def mla_kv_write_triton(kv_a: torch.Tensor, norm_weight: torch.Tensor, eps: float, positions: torch.Tensor,
                        cos_sin_cache: torch.Tensor, interleaved: bool, cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> None:
    num_tokens, width = kv_a.shape
    rope = cos_sin_cache.shape[-1]
    rank = width - rope
    assert cache.shape[-1] == width and cache.is_contiguous() and kv_a.stride(-1) == 1
    assert cache.dtype == kv_a.dtype == norm_weight.dtype and norm_weight.shape == (rank,)
    if num_tokens == 0:
        return
    cs = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    _mla_kv_write_kernel[(num_tokens,)](
        kv_a, norm_weight, positions, cs, cache, slot_mapping, rank, rope // 2, kv_a.stride(0), cs.stride(0),
        width, eps, INTERLEAVED=interleaved, BLOCK_L=triton.next_power_of_2(rank),
        BLOCK_D=triton.next_power_of_2(rope // 2), num_warps=4)


def mla_kv_write(kv_a: torch.Tensor, norm_weight: torch.Tensor, eps: float, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor, interleaved: bool, cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """One launch where Triton runs and the cache has the activations' dtype; else (an FP8 cache,
    plain CPU) the norm and rotary kernels (or their references), a cat and the write."""
    if (_use_triton(kv_a, norm_weight, cache) and triton is not None and cache.dtype == kv_a.dtype
            and norm_weight.dtype == kv_a.dtype and kv_a.stride(-1) == 1 and cache.is_contiguous()):
        return mla_kv_write_triton(kv_a, norm_weight, eps, positions, cos_sin_cache, interleaved, cache,
                                   slot_mapping)
    _unfused(kv_a, norm_weight, eps, positions, cos_sin_cache, interleaved, cache, slot_mapping, rmsnorm,
             apply_rotary)
