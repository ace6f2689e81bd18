"""Per-head matrix-vector products of MLA decode: out[b, h] = x[b, h] @ W[h].

MLA's absorbed decode projects each head's query into the latent space (q_nope @ W_UK[h], 128 ->
512) and each head's attention output back to values (latent @ W_UV[h].T, 512 -> 128). At decode
batch sizes these are batched GEMVs of a few MB; through cuBLAS each is one ~3 us launch that
programmatic dependent launch cannot overlap (kernels/pdl.py). The Triton kernel computes one
(sequence, head, output block) per program, a multiply-and-sum with no padded dot rows, so a row's
result does not depend on the batch: it serves batches up to HEAD_MATVEC_MAX_BATCH (a CUDA-graph
size, so a batch and its padded graph take the same path), cuBLAS the larger ones.
"""

from __future__ import annotations

import torch

from moeserve.kernels.rmsnorm import _use_triton, triton

HEAD_MATVEC_MAX_BATCH = 16


def head_matvec_ref(x: torch.Tensor, w: torch.Tensor, w_transposed: bool = False,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, H, K]; w [H, K, N] (w_transposed: [H, N, K]) -> [B, H, N], into `out` when given."""
    n = w.shape[1] if w_transposed else w.shape[2]
    if out is None:
        out = x.new_empty(x.shape[0], x.shape[1], n)
    torch.bmm(x.transpose(0, 1), w.transpose(1, 2) if w_transposed else w, out=out.transpose(0, 1))
    return out


if triton is not None:
    import triton.language as tl
    from moeserve.kernels.pdl import pdl_begin, pdl_launch

    @triton.jit
    def _head_matvec_kernel(x_ptr, w_ptr, out_ptr, stride_xb, stride_xh, stride_wh, stride_wk, stride_wn,
                            stride_ob, stride_oh, K: tl.constexpr, N: tl.constexpr, BLOCK_K: tl.constexpr,
                            BLOCK_N: tl.constexpr, PDL: tl.constexpr = False):
        pdl_begin(PDL)
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        x_row = x_ptr + b * stride_xb + h * stride_xh
        w_head = w_ptr + h * stride_wh + offs_n[None, :] * stride_wn
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(x_row + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(w_head + offs_k[:, None] * stride_wk, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc += tl.sum(x[:, None] * w.to(tl.float32), axis=0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


def head_matvec_triton(x: torch.Tensor, w: torch.Tensor, w_transposed: bool = False,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    batch, heads, k = x.shape
    n = w.shape[1] if w_transposed else w.shape[2]
    assert w.shape == ((heads, n, k) if w_transposed else (heads, k, n)) and x.stride(-1) == 1
    if out is None:
        out = torch.empty(batch, heads, n, dtype=x.dtype, device=x.device)
    assert out.shape == (batch, heads, n) and out.stride(-1) == 1
    if batch == 0:
        return out
    stride_wk, stride_wn = (w.stride(2), w.stride(1)) if w_transposed else (w.stride(1), w.stride(2))
    # [BLOCK_K, BLOCK_N] weight tiles of 8K values (64 fp32 registers a thread at 4 warps), N cut so
    # that a batch of 1 still has 64 programs (MLA's 16 heads) streaming 16-32 KB each
    block_n = min(32 if w_transposed else 128, triton.next_power_of_2(n))
    block_k = max(16, min(triton.next_power_of_2(k), 8192 // block_n))
    _head_matvec_kernel[(batch, heads, triton.cdiv(n, block_n))](
        x, w, out, x.stride(0), x.stride(1), w.stride(0), stride_wk, stride_wn, out.stride(0), out.stride(1),
        K=k, N=n, BLOCK_K=block_k, BLOCK_N=block_n, num_warps=4, **pdl_launch(x.device))
    return out


def head_matvec(x: torch.Tensor, w: torch.Tensor, w_transposed: bool = False,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton up to HEAD_MATVEC_MAX_BATCH rows where it runs, else cuBLAS (the reference)."""
    if x.shape[0] <= HEAD_MATVEC_MAX_BATCH and _use_triton(x, w) and x.stride(-1) == 1:
        return head_matvec_triton(x, w, w_transposed, out)
    return head_matvec_ref(x, w, w_transposed, out)
