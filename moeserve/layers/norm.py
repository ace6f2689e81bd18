"""RMSNorm module over the fused kernels."""

from __future__ import annotations

import torch
from torch import nn

from moeserve.kernels.fused_moe import ExpertRows
from moeserve.kernels.rmsnorm import fused_add_rmsnorm, rmsnorm, rmsnorm_quant


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)  # inference only, as every layer
        self.eps = eps

    def forward(self, x: torch.Tensor | ExpertRows, residual: torch.Tensor | None = None):
        """Without residual: rmsnorm(x). With residual: (rmsnorm(x + residual), x + residual).
        x may be a fused MoE's rows before their sum (ExpertRows): the kernel sums them."""
        if residual is None:
            return rmsnorm(x, self.weight, self.eps)
        return fused_add_rmsnorm(x, residual, self.weight, self.eps)

    def norm_residual(self, x: torch.Tensor, residual: torch.Tensor | None, fp8_group: int = 0):
        """(rmsnorm(x + residual), x + residual, fp8) with x itself as the residual when there is
        none yet. fp8: the output quantized per 1 x fp8_group (e4m3, fp32 scales) by the same kernel
        for a consumer whose FP8 GEMM would quantize it anyway (its fp8_input_group); None for 0."""
        if residual is None and isinstance(x, ExpertRows):  # x becomes the residual stream: a tensor
            x = x.sum()
        if fp8_group:
            return rmsnorm_quant(x, residual, self.weight, self.eps, fp8_group)
        if residual is None:
            return self(x), x, None
        return (*self(x, residual), None)
