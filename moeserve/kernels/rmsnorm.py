"""RMSNorm, and RMSNorm fused with the residual add that precedes it."""

from __future__ import annotations

import torch


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalises in fp32, casts back, then scales (transformers' order of operations)."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def fused_add_rmsnorm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """residual' = x + residual; returns (rmsnorm(residual'), residual')."""
    residual = x + residual
    return rmsnorm_ref(residual, weight, eps), residual


rmsnorm = rmsnorm_ref
fused_add_rmsnorm = fused_add_rmsnorm_ref
