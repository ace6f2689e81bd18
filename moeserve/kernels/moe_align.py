"""Sort (token, expert) pairs by expert and pad each expert's run to a multiple of BLOCK_M, so
that a grouped GEMM can give every block of BLOCK_M rows a single expert.

Pair p = t * top_k + j stands for token t's j-th expert, topk_ids[t, j]. Outputs:
- sorted_ids [max_padded] int32: pair ids grouped by expert (ascending within an expert),
  each expert's run padded with the sentinel num_pairs;
- block_expert [max_padded // BLOCK_M] int32: the expert of each block, -1 past the end;
- num_padded [1] int32: how many slots are in use (a multiple of BLOCK_M).
Pairs whose expert id is < 0 (experts on other ranks) are left out. Sizes depend only on the
shapes, never on the ids, so no host sync is needed and the step can be captured in a graph.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


def max_padded_size(num_pairs: int, num_experts: int, block_m: int) -> int:
    # Each expert that gets a pair wastes at most block_m - 1 slots of padding.
    worst = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return -(-worst // block_m) * block_m


def moe_align_block_size_ref(topk_ids: torch.Tensor, block_m: int, num_experts: int):
    device = topk_ids.device
    ids = topk_ids.reshape(-1).to(torch.int64)
    num_pairs = ids.numel()
    max_padded = max_padded_size(num_pairs, num_experts, block_m)
    valid = (ids >= 0) & (ids < num_experts)
    key = torch.where(valid, ids, num_experts)  # dropped pairs sort last
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device).scatter_add_(0, key, torch.ones_like(key))
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    pad_end = padded.cumsum(0)
    pad_start = pad_end - padded
    count_start = counts.cumsum(0) - counts
    order = torch.sort(key, stable=True).indices
    sorted_key = key[order]
    rank = torch.arange(num_pairs, device=device) - count_start[sorted_key]
    dest = torch.where(sorted_key < num_experts, torch.cat((pad_start, pad_start.new_zeros(1)))[sorted_key] + rank,
                       max_padded)  # dropped pairs land in a spare slot cut off below
    sorted_ids = torch.full((max_padded + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids[dest] = order.to(torch.int32)
    block_start = torch.arange(max_padded // block_m, device=device) * block_m
    total = pad_end[-1:] if num_experts else torch.zeros(1, dtype=torch.int64, device=device)
    block_expert = torch.searchsorted(pad_end, block_start, right=True)
    block_expert = torch.where(block_start < total, block_expert, -1).to(torch.int32)
    return sorted_ids[:max_padded], block_expert, total.to(torch.int32)


if triton is not None:

    @triton.jit
    def _moe_align_kernel(ids_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr, num_pairs, num_experts,
                          max_padded, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr,
                          FILL: tl.constexpr):
        # One program does it all: the work is small next to the GEMMs, and one program needs no
        # grid-wide sync. Bin E_PAD - 1 (>= num_experts) collects dropped pairs.
        experts = tl.arange(0, E_PAD)
        spare = E_PAD - 1
        for s in range(0, max_padded, FILL):  # padding slots hold the sentinel
            slots = s + tl.arange(0, FILL)
            tl.store(sorted_ptr + slots, tl.zeros([FILL], tl.int32) + num_pairs, mask=slots < max_padded)

        counts = tl.zeros([E_PAD], tl.int32)
        for c in range(0, num_pairs, CHUNK):
            offs = c + tl.arange(0, CHUNK)
            e = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32)
            e = tl.where((e >= 0) & (e < num_experts), e, spare)
            counts += tl.histogram(e, E_PAD)
        counts = tl.where(experts < num_experts, counts, 0)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        pad_end = tl.cumsum(padded, 0)
        pad_start = pad_end - padded
        total = tl.sum(padded, 0)
        tl.store(num_padded_ptr, total)

        num_blocks = max_padded // BLOCK_M
        for b in range(0, num_blocks, CHUNK):
            blocks = b + tl.arange(0, CHUNK)
            start = blocks * BLOCK_M
            # a block's expert = how many experts' runs end at or before the block's start
            e_of = tl.sum((pad_end[None, :] <= start[:, None]).to(tl.int32), axis=1)
            tl.store(block_expert_ptr + blocks, tl.where(start < total, e_of, -1), mask=blocks < num_blocks)

        tl.debug_barrier()  # the sentinel fill above must land before the scatter below
        placed = tl.zeros([E_PAD], tl.int32)
        lanes = tl.arange(0, CHUNK)
        for c in range(0, num_pairs, CHUNK):
            offs = c + lanes
            e = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32)
            keep = (e >= 0) & (e < num_experts)
            e = tl.where(keep, e, spare)
            onehot = e[:, None] == experts[None, :]
            base = tl.sum(tl.where(onehot, (pad_start + placed)[None, :], 0), axis=1)
            # rank among the pairs of this chunk with the same expert that come earlier
            rank = tl.sum(((e[:, None] == e[None, :]) & (lanes[None, :] < lanes[:, None])).to(tl.int32), axis=1)
            tl.store(sorted_ptr + base + rank, offs, mask=keep)
            placed += tl.sum(onehot.to(tl.int32), axis=0)


def moe_align_block_size_triton(topk_ids: torch.Tensor, block_m: int, num_experts: int):
    ids = topk_ids.reshape(-1)
    ids = ids if ids.is_contiguous() else ids.contiguous()
    num_pairs = ids.numel()
    max_padded = max_padded_size(num_pairs, num_experts, block_m)
    device = topk_ids.device
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_padded // block_m, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    e_pad = triton.next_power_of_2(num_experts + 1)
    chunk = 64 if e_pad <= 256 else 32
    num_warps = 4 if num_pairs <= 4096 else 8
    _moe_align_kernel[(1,)](ids, sorted_ids, block_expert, num_padded, num_pairs, num_experts, max_padded,
                            BLOCK_M=block_m, E_PAD=e_pad, CHUNK=chunk, FILL=1024, num_warps=num_warps)
    return sorted_ids, block_expert, num_padded
