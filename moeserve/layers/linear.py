"""Linear layers: plain, or FP8 block-scaled (DeepSeek's checkpoint format) kept in FP8."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeserve.kernels.fp8 import FP8_DTYPE, block_fp8_matmul, dequant_block_fp8_ref


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class Embedding(nn.Module):
    """Token embedding table; allocated uninitialised (the loader fills it)."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class Linear(nn.Module):
    """y = x W^T (+ b). With quant="fp8" the weight is e4m3 [out, in] with one fp32
    `weight_scale_inv` per block; activations are quantized per 1 x block[1] group on the fly."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, quant: str | None = None,
                 block: tuple[int, int] = (128, 128)):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant, self.block = quant, tuple(block)
        if quant == "fp8":
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
            scale_shape = (_ceil_div(out_features, block[0]), _ceil_div(in_features, block[1]))
            self.weight_scale_inv = nn.Parameter(torch.empty(scale_shape, dtype=torch.float32), requires_grad=False)
        else:
            self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant != "fp8":
            return F.linear(x, self.weight, self.bias)
        y = block_fp8_matmul(x.reshape(-1, x.shape[-1]), self.weight, self.weight_scale_inv, self.block)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.quant != "fp8":
            return self.weight.to(dtype)
        return dequant_block_fp8_ref(self.weight, self.weight_scale_inv, self.block, dtype)
