"""SiLU-and-mul: the activation of the gated MLP, over the output of a merged [gate; up] GEMM.

y [T, N] holds the gate projection in columns [0, n) and the up projection in columns
[up_offset, up_offset + n) (up_offset >= n: FP8 layouts may pad the gate part to a weight-block
boundary). The result silu(gate) * up is [T, n]. The reference is two elementwise kernels (silu,
mul) plus the views; the Triton kernel is one launch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeserve.kernels.rmsnorm import _use_triton, triton


def silu_and_mul_ref(y: torch.Tensor, n: int, up_offset: int) -> torch.Tensor:
    """transformers' order: silu in the input dtype, then the product rounded once."""
    return F.silu(y[..., :n]) * y[..., up_offset:up_offset + n]


if triton is not None:
    import triton.language as tl
    from moeserve.kernels.pdl import pdl_begin, pdl_launch

    @triton.jit
    def _silu_and_mul_kernel(y_ptr, out_ptr, n, up_offset, stride_y, stride_out, BLOCK: tl.constexpr,
                             PDL: tl.constexpr = False):
        pdl_begin(PDL)
        # program (row, column block)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        gate = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(y_ptr + row * stride_y + up_offset + cols, mask=mask, other=0.0)
        # As the reference: silu rounded to the input dtype first (F.silu computes in fp32 and
        # rounds its output), then the product in fp32, rounded once.
        act = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
        out = act.to(tl.float32) * up.to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(y: torch.Tensor, n: int, up_offset: int) -> torch.Tensor:
    assert up_offset >= n and y.shape[-1] >= up_offset + n
    y2 = y.reshape(-1, y.shape[-1])
    if y2.stride(-1) != 1:
        y2 = y2.contiguous()
    out = torch.empty(*y.shape[:-1], n, dtype=y.dtype, device=y.device)
    rows = y2.shape[0]
    if rows == 0:
        return out
    block = min(1024, triton.next_power_of_2(n))
    _silu_and_mul_kernel[(rows, triton.cdiv(n, block))](y2, out.view(-1, n), n, up_offset, y2.stride(0), n,
                                                        BLOCK=block, num_warps=4 if block >= 512 else 1,
                                                        **pdl_launch(y2.device))
    return out


def silu_and_mul(y: torch.Tensor, n: int, up_offset: int | None = None) -> torch.Tensor:
    """silu(y[..., :n]) * y[..., up_offset:up_offset + n] (up_offset defaults to n): one launch where
    Triton runs, else the reference."""
    up_offset = n if up_offset is None else up_offset
    if _use_triton(y):
        return silu_and_mul_triton(y, n, up_offset)
    return silu_and_mul_ref(y, n, up_offset)
