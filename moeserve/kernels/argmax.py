"""Greedy sampling's argmax over the vocabulary, in two short launches.

torch's argmax reduces each row in one thread block: at batch 1 a 102,400-token vocabulary is one
block reading 400 KB, 22.7 us on an H200 (docs/perf/engine_v2lite.md), about 1% of a V2-Lite decode
step. Here the vocabulary is cut into chunks, one program each finds its chunk's maximum and first
index of it, and a second launch picks the first chunk holding the row's maximum: the same token
as torch.argmax (the first index of the maximum) for finite logits.
"""

from __future__ import annotations

import torch

from moeserve.kernels.rmsnorm import _use_triton, triton

ARGMAX_CHUNK = 4096  # vocabulary entries a program of the first launch reads (16 KB of fp32)


def greedy_argmax_ref(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


if triton is not None:
    import triton.language as tl
    from moeserve.kernels.pdl import pdl_begin, pdl_launch

    @triton.jit(do_not_specialize=["num_rows"])
    def _chunk_argmax_kernel(x_ptr, val_ptr, idx_ptr, num_rows, vocab, stride_row, num_chunks,
                             BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        pdl_begin(PDL)
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        offs = chunk * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * stride_row + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
        best = tl.argmax(x, axis=0, tie_break_left=True)
        tl.store(val_ptr + row * num_chunks + chunk, tl.max(x, axis=0))
        tl.store(idx_ptr + row * num_chunks + chunk, chunk * BLOCK + best)

    @triton.jit(do_not_specialize=["num_rows"])
    def _pick_chunk_kernel(val_ptr, idx_ptr, out_ptr, num_rows, num_chunks, BLOCK_C: tl.constexpr,
                           PDL: tl.constexpr = False):
        pdl_begin(PDL)
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_C)
        vals = tl.load(val_ptr + row * num_chunks + offs, mask=offs < num_chunks, other=float("-inf"))
        first = tl.argmax(vals, axis=0, tie_break_left=True)  # the first chunk with the maximum
        tl.store(out_ptr + row, tl.load(idx_ptr + row * num_chunks + first).to(tl.int64))


def greedy_argmax_triton(logits: torch.Tensor) -> torch.Tensor:
    rows, vocab = logits.shape
    assert logits.stride(-1) == 1
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    chunks = triton.cdiv(vocab, ARGMAX_CHUNK)
    vals = torch.empty(rows, chunks, dtype=torch.float32, device=logits.device)
    idx = torch.empty(rows, chunks, dtype=torch.int32, device=logits.device)
    _chunk_argmax_kernel[(rows, chunks)](logits, vals, idx, rows, vocab, logits.stride(0), chunks,
                                         BLOCK=ARGMAX_CHUNK, num_warps=8, **pdl_launch(logits.device))
    _pick_chunk_kernel[(rows,)](vals, idx, out, rows, chunks, BLOCK_C=triton.next_power_of_2(chunks),
                                num_warps=1, **pdl_launch(logits.device))
    return out


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, V] (finite) -> [N] int64, the first index of each row's maximum."""
    if logits.dim() == 2 and logits.stride(-1) == 1 and _use_triton(logits):
        return greedy_argmax_triton(logits)
    return greedy_argmax_ref(logits)
