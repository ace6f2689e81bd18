"""y = x W^T (+ b) for the few rows of a decode batch (M <= moe_config.GEMV_MAX_M), unquantized.

At these sizes the GEMM is a read of W and nothing else: V2-Lite's per-layer projections are 8-23 MB
of bf16, 2-5.5 us at an H200's copy bandwidth, yet cuBLAS spends 6-9 us on each (docs/perf/).
The kernel is the FP8 GEMM's split-K kernel without its scales (kernels/fp8.py,
_splitk_matmul_kernel with SCALED=False): K is cut into enough ranges that every SM streams its own
slices of W, and the ranges' fp32 partial sums are added in a fixed order (by each output tile's
last program to finish, or a second pass), so a result is the same run to run. Accumulation in fp32, one rounding to x's dtype, bias included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeserve.kernels import moe_config
from moeserve.kernels.fp8 import splitk_matmul, triton


def gemv_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w [N, K].T (+ bias [N]) with fp32 sums, rounded once to x.dtype: what the kernel computes."""
    y = x.float() @ w.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def gemv_triton(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                config: dict | None = None) -> torch.Tensor:
    """The Triton kernel; config: BLOCK_M/N/K, GROUP_SIZE_M, num_warps, num_stages, SPLIT_K
    (moe_config.gemv_config picks them per shape). fp32 operands would run as TF32 on a GPU (tl.dot's
    default), so the dispatch below sends only bf16/fp16 there; the interpreter computes fp32 exactly."""
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    cfg = config or moe_config.gemv_config(m, n, k, x.device)
    return splitk_matmul(x, w, out, cfg, bias=bias)


def gemv_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Where the kernel is used: a CUDA GPU, a decode-sized batch, 16-bit weights of x's dtype."""
    return (triton is not None and x.is_cuda and x.dim() == 2 and x.shape[0] <= moe_config.GEMV_MAX_M
            and x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, with the small-M kernel where it fits (x of any leading shape)."""
    rows = x.reshape(-1, x.shape[-1])
    if not gemv_fits(rows, w):
        return F.linear(x, w, bias)
    return gemv_triton(rows, w, bias).reshape(*x.shape[:-1], w.shape[0])
