"""Per-head matrix-vector products of MLA decode: out[b, h] = x[b, h] @ W[h].

MLA's absorbed decode projects each head's query into the latent space (q_nope @ W_UK[h], 128 ->
512) and each head's attention output back to values (latent @ W_UV[h].T, 512 -> 128). At decode
batch sizes these are batched GEMVs of a few MB; through cuBLAS each is one ~3 us launch that
programmatic dependent launch cannot overlap (kernels/pdl.py). The Triton kernel computes one
(block of sequences, head, output block) per program; a row's result does not depend on the other
rows, and it serves batches up to HEAD_MATVEC_MAX_BATCH (a CUDA-graph size, so a batch and its
padded graph take the same path) and weights of a few MB; cuBLAS the rest.
"""

from __future__ import annotations

import torch

from moeserve.kernels.rmsnorm import _use_triton, triton

HEAD_MATVEC_MAX_BATCH = 16
# Up to this many weight bytes a call is latency-bound and the kernel wins (H200, batch 1-16:
# V2-Lite's 2 MB, 0.63-0.78x cuBLAS); DeepSeek-V3's 16 MB (128 heads) streams near the copy
# bandwidth through cuBLAS already and the kernel's absorb was 1.1-1.3x slower there
# (benchmarks/kernel_bench_mla_layer.py --sweep-matvec, docs/perf/kernels_attention.md).
HEAD_MATVEC_MAX_WEIGHT_BYTES = 4 << 20
# (block_b, block_k, block_n), the sweep's best for V2-Lite: the query's absorb (W [H, K, N], N
# contiguous) and the value projection (W stored [H, N, K], K contiguous)
HEAD_MATVEC_TILES = (16, 64, 64)
HEAD_MATVEC_TILES_T = (16, 256, 32)


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
    from moeserve.kernels.attention_triton import _dot_precision
    from moeserve.kernels.pdl import pdl_begin, pdl_launch

    @triton.jit(do_not_specialize=["batch"])
    def _head_matvec_kernel(x_ptr, w_ptr, out_ptr, batch, stride_xb, stride_xh, stride_wh, stride_wk, stride_wn,
                            stride_ob, stride_oh, K: tl.constexpr, N: tl.constexpr, BLOCK_B: tl.constexpr,
                            BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                            PDL: tl.constexpr = False):
        # program (block of BLOCK_B rows, head, BLOCK_N outputs); BLOCK_B >= 16: tl.dot, whose rows do
        # not mix (a row's result is the same whatever rows share its tile); BLOCK_B == 1: multiply-and-sum
        pdl_begin(PDL)
        offs_b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        b_mask = offs_b < batch
        h = tl.program_id(1).to(tl.int64)
        offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        x_rows = x_ptr + offs_b.to(tl.int64)[:, None] * stride_xb + h * stride_xh
        w_head = w_ptr + h * stride_wh + offs_n[None, :] * stride_wn
        acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(x_rows + offs_k[None, :], mask=b_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_head + offs_k[:, None] * stride_wk, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if BLOCK_B >= 16:
                acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
            else:
                acc += tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], axis=1)
        out = out_ptr + offs_b.to(tl.int64)[:, None] * stride_ob + h * stride_oh + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=b_mask[:, None] & n_mask[None, :])


def head_matvec_triton(x: torch.Tensor, w: torch.Tensor, w_transposed: bool = False,
                       out: torch.Tensor | None = None, tiles: tuple[int, int, int] | None = None) -> torch.Tensor:
    batch, heads, k = x.shape
    n = w.shape[1] if w_transposed else w.shape[2]
    assert w.shape == ((heads, n, k) if w_transposed else (heads, k, n)) and x.stride(-1) == 1
    if out is None:
        out = torch.empty(batch, heads, n, dtype=x.dtype, device=x.device)
    assert out.shape == (batch, heads, n) and out.stride(-1) == 1
    if batch == 0:
        return out
    stride_wk, stride_wn = (w.stride(2), w.stride(1)) if w_transposed else (w.stride(1), w.stride(2))
    block_b, block_k, block_n = tiles or (HEAD_MATVEC_TILES_T if w_transposed else HEAD_MATVEC_TILES)
    block_k = max(16, min(block_k, triton.next_power_of_2(k)))
    block_n = max(16, min(block_n, triton.next_power_of_2(n)))
    _head_matvec_kernel[(triton.cdiv(batch, block_b), heads, triton.cdiv(n, block_n))](
        x, w, out, batch, x.stride(0), x.stride(1), w.stride(0), stride_wk, stride_wn, out.stride(0), out.stride(1),
        K=k, N=n, BLOCK_B=block_b, BLOCK_K=block_k, BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(x.dtype), num_warps=4, **pdl_launch(x.device))
    return out


def head_matvec(x: torch.Tensor, w: torch.Tensor, w_transposed: bool = False,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Triton up to HEAD_MATVEC_MAX_BATCH rows and HEAD_MATVEC_MAX_WEIGHT_BYTES where it runs, else
    cuBLAS (the reference)."""
    small = x.shape[0] <= HEAD_MATVEC_MAX_BATCH and w.numel() * w.element_size() <= HEAD_MATVEC_MAX_WEIGHT_BYTES
    if small and _use_triton(x, w) and x.stride(-1) == 1:
        return head_matvec_triton(x, w, w_transposed, out)
    return head_matvec_ref(x, w, w_transposed, out)
