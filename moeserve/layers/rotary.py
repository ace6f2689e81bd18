"""Rotary embedding: cos/sin cache for default and YaRN scaling, as DeepSeek and transformers define them."""

from __future__ import annotations

import math

import torch
from torch import nn

from moeserve.config import RopeConfig
from moeserve.kernels.rotary import apply_rotary, apply_rotary_qk


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_softmax_scale(rope: RopeConfig, head_dim: int) -> float:
    """DeepSeek's attention scale: head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN."""
    scale = head_dim**-0.5
    if rope.type == "yarn" and rope.mscale_all_dim:
        m = yarn_mscale(rope.factor, rope.mscale_all_dim)
        scale *= m * m
    return scale


def rope_inv_freq(rope: RopeConfig, dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for `dim` rotary dims and the factor cos/sin are multiplied by."""
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if rope.type == "default":
        return 1.0 / pos_freqs, 1.0
    # YaRN: interpolate low frequencies, keep high ones, with a linear ramp between.
    factor, orig = rope.factor, rope.original_max_position_embeddings

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    def __init__(self, rope: RopeConfig, rot_dim: int, max_positions: int, interleaved: bool):
        super().__init__()
        inv_freq, attention_factor = rope_inv_freq(rope, rot_dim)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1) * attention_factor
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self.interleaved = interleaved

    def forward(self, positions: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotate each x [T, heads, rot_dim] by its token's position (q and k: one kernel launch)."""
        if len(xs) == 2:
            return apply_rotary_qk(xs[0], xs[1], positions, self.cos_sin_cache, self.interleaved)
        return tuple(apply_rotary(x, positions, self.cos_sin_cache, self.interleaved) for x in xs)
