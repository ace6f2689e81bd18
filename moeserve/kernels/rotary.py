"""Rotary position embedding over a precomputed cos/sin cache.

cos_sin_cache [max_positions, rot_dim]: first half cos, second half sin (rot_dim/2 frequencies,
already multiplied by the rope's attention factor). Neox style rotates (x[i], x[i + d/2]).
Interleaved style rotates pairs (x[2i], x[2i+1]) and writes the result de-interleaved
([rotated evens, rotated odds]), as transformers' DeepSeek-V3 does: q and k get the same
permutation, so q.k is unchanged and the cache stays consistent.
"""

from __future__ import annotations

import torch


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


apply_rotary = apply_rotary_ref
