"""RMSNorm module over the fused kernels."""

from __future__ import annotations

import torch
from torch import nn

from moeserve.kernels.rmsnorm import fused_add_rmsnorm, rmsnorm


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)  # inference only, as every layer
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: rmsnorm(x). With residual: (rmsnorm(x + residual), x + residual)."""
        if residual is None:
            return rmsnorm(x, self.weight, self.eps)
        return fused_add_rmsnorm(x, residual, self.weight, self.eps)
