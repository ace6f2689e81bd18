"""Sort (token, expert) pairs by expert and pad each expert's run to a multiple of BLOCK_M, so
that a grouped GEMM can give every block of BLOCK_M rows a single expert.

Pair p = t * top_k + j stands for token t's j-th expert, topk_ids[t, j]. Outputs:
- sorted_ids [max_padded] int32: pair ids grouped by expert (ascending within an expert),
  each expert's run padded with the sentinel num_pairs;
- block_expert [max_padded // BLOCK_M] int32: the expert of each block, -1 past the end;
- num_padded [1] int32: how many slots are in use (a multiple of BLOCK_M).
Pairs whose expert id is < 0 (experts on other ranks) or >= num_experts are left out. Sizes depend only on the
shapes, never on the ids, so no host sync is needed and the step can be captured in a graph.
Two Triton paths, picked by the number of pairs (moe_align_block_size_triton):
- up to ONE_LAUNCH_MAX_WORK experts x pairs and ONE_LAUNCH_MAX_PAIRS pairs (decode batches, short
  prefills; `one_launch`): one launch of one program per expert. Each reads all the ids and counts
  every expert's pairs, which gives its expert's run start, and places its expert's pairs by their
  rank among them (a cumsum): no sort, no second launch. It replaced one program doing everything,
  each pair's place from a tl.sort of expert * N + pair keys: on one SM the sort was most of that
  launch, 3.5 us at V2-Lite's 512 decode pairs against 2.2.
- above it (long prefills): chunks of pairs over three launches (count, offsets, scatter). A first
  version in one program took 7 ms for 65,536 pairs (T=8192, top-8) on an H100, a third of the whole
  MoE layer: one program cannot spread a large sort or scatter over the GPU.
Within an expert the pairs keep ascending pair order (the reference's stable sort) on both paths.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from moeserve.kernels.pdl import pdl_begin, pdl_launch
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
    def _load_experts(ids_ptr, offs, num_pairs, num_experts):
        """Expert of each pair, and whether it is computed here; dropped pairs read as expert 0."""
        e = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32)
        keep = (e >= 0) & (e < num_experts)
        return tl.where(keep, e, 0), keep

    @triton.jit(do_not_specialize=["num_pairs", "max_padded", "num_blocks", "tail_slots", "tail_blocks"])
    def _align_per_expert_kernel(ids_ptr, sorted_ptr, block_expert_ptr, num_padded_ptr, num_pairs, num_experts,
                                 max_padded, num_blocks, tail_slots, tail_blocks, BLOCK_M: tl.constexpr,
                                 E_PAD: tl.constexpr, N_PAD: tl.constexpr, RUN_BLOCKS: tl.constexpr,
                                 FILL: tl.constexpr, PDL: tl.constexpr = False):
        pdl_begin(PDL)
        # Program x writes expert x's run: every program counts all experts' pairs (the same counts in
        # each), which gives its run's start; a pair's slot in the run is its rank among expert x's
        # pairs (ascending pair order, as the reference's stable sort). Runs are disjoint, and program
        # x also writes its share [x * tail_slots, +tail_slots) of the slots and blocks past the last run.
        x = tl.program_id(0)
        lanes = tl.arange(0, N_PAD)
        e, keep = _load_experts(ids_ptr, lanes, num_pairs, num_experts)
        experts = tl.arange(0, E_PAD)
        counts = tl.histogram(e, E_PAD)
        dropped = tl.sum((~keep).to(tl.int32), 0)  # dropped pairs and the lanes past the end read as expert 0
        counts = tl.where(experts == 0, counts - dropped, counts)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        total = tl.sum(padded, 0)
        start = tl.sum(tl.where(experts < x, padded, 0), 0)
        run = tl.sum(tl.where(experts == x, padded, 0), 0)
        if x == 0:
            tl.store(num_padded_ptr, total)

        mine = keep & (e == x)
        rank = tl.cumsum(mine.to(tl.int32), 0) - 1
        tl.store(sorted_ptr + start + rank, lanes, mask=mine)
        count = tl.sum(mine.to(tl.int32), 0)
        pad = tl.arange(0, BLOCK_M)  # the run's padding (< BLOCK_M slots): the sentinel
        tl.store(sorted_ptr + start + count + pad, tl.zeros([BLOCK_M], tl.int32) + num_pairs, mask=count + pad < run)
        blocks = tl.arange(0, RUN_BLOCKS)
        tl.store(block_expert_ptr + start // BLOCK_M + blocks, tl.zeros([RUN_BLOCKS], tl.int32) + x,
                 mask=blocks < run // BLOCK_M)

        first = x * tail_slots
        for s0 in range(first, first + tail_slots, FILL):
            slots = s0 + tl.arange(0, FILL)
            tl.store(sorted_ptr + slots, tl.zeros([FILL], tl.int32) + num_pairs,
                     mask=(slots < first + tail_slots) & (slots >= total) & (slots < max_padded))
        first = x * tail_blocks
        for b0 in range(first, first + tail_blocks, FILL):
            blk = b0 + tl.arange(0, FILL)
            tl.store(block_expert_ptr + blk, tl.full([FILL], -1, tl.int32),
                     mask=(blk < first + tail_blocks) & (blk * BLOCK_M >= total) & (blk < num_blocks))

    @triton.jit(do_not_specialize=["num_pairs", "max_padded", "slots_per_prog"])
    def _align_count_kernel(ids_ptr, chunk_counts_ptr, sorted_ptr, num_pairs, num_experts, max_padded,
                            slots_per_prog, E_PAD: tl.constexpr, CHUNK: tl.constexpr, FILL: tl.constexpr):
        # Pass 1, one program per chunk of pairs: the chunk's pairs per expert; and this program's
        # share of the sentinel fill of sorted_ids (pass 3 overwrites the slots that hold pairs).
        c = tl.program_id(0)
        offs = c * CHUNK + tl.arange(0, CHUNK)
        e, keep = _load_experts(ids_ptr, offs, num_pairs, num_experts)
        counts = tl.histogram(e, E_PAD)
        dropped = tl.sum((~keep).to(tl.int32), 0)  # dropped pairs and the lanes past the end
        counts = tl.where(tl.arange(0, E_PAD) == 0, counts - dropped, counts)
        tl.store(chunk_counts_ptr + c * E_PAD + tl.arange(0, E_PAD), counts)
        first = c * slots_per_prog
        for s in range(first, first + slots_per_prog, FILL):
            slots = s + tl.arange(0, FILL)
            tl.store(sorted_ptr + slots, tl.zeros([FILL], tl.int32) + num_pairs,
                     mask=(slots < first + slots_per_prog) & (slots < max_padded))

    @triton.jit(do_not_specialize=["num_chunks"])
    def _align_offsets_kernel(chunk_counts_ptr, pad_end_ptr, num_padded_ptr, num_chunks, num_experts,
                              BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, ROWS: tl.constexpr):
        # Pass 2, one program: padded run of each expert, and for each chunk and expert (written over
        # the counts) the slot where the chunk's pairs of that expert start (run start + pairs of
        # that expert in earlier chunks) minus where they start in the chunk sorted by expert (the
        # chunk's pairs of lower experts): pass 3 adds a pair's place in its sorted chunk.
        experts = tl.arange(0, E_PAD)
        counts = tl.zeros([E_PAD], tl.int32)
        for r in range(0, num_chunks, ROWS):
            rows = r + tl.arange(0, ROWS)
            tile = tl.load(chunk_counts_ptr + rows[:, None] * E_PAD + experts[None, :],
                           mask=rows[:, None] < num_chunks, other=0)
            counts += tl.sum(tile, axis=0)
        counts = tl.where(experts < num_experts, counts, 0)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        pad_end = tl.cumsum(padded, 0)
        tl.store(pad_end_ptr + experts, pad_end)
        tl.store(num_padded_ptr, tl.sum(padded, 0))
        start = pad_end - padded
        for r in range(0, num_chunks, ROWS):
            rows = r + tl.arange(0, ROWS)
            ptrs = chunk_counts_ptr + rows[:, None] * E_PAD + experts[None, :]
            tile = tl.load(ptrs, mask=rows[:, None] < num_chunks, other=0)
            lower = tl.cumsum(tile, axis=1) - tile
            tl.store(ptrs, start[None, :] + tl.cumsum(tile, axis=0) - tile - lower, mask=rows[:, None] < num_chunks)
            start += tl.sum(tile, axis=0)

    @triton.jit(do_not_specialize=["num_pairs", "num_blocks"])
    def _align_scatter_kernel(ids_ptr, chunk_shift_ptr, pad_end_ptr, num_padded_ptr, sorted_ptr,
                              block_expert_ptr, num_pairs, num_experts, num_blocks,
                              BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr,
                              BLOCKS_PER_PROG: tl.constexpr):
        # Pass 3, one program per chunk: place the chunk's pairs (in order within an expert), and
        # name the expert of this program's share of the row blocks.
        c = tl.program_id(0)
        lanes = tl.arange(0, CHUNK)
        e, keep = _load_experts(ids_ptr, c * CHUNK + lanes, num_pairs, num_experts)
        # the chunk sorted by expert, then by pair (unique keys: pairs stay in order within an expert);
        # dropped pairs last
        key = tl.sort(tl.where(keep, e, E_PAD) * CHUNK + lanes)
        key_e = key // CHUNK
        placed = key_e < E_PAD
        dest = lanes + tl.load(chunk_shift_ptr + c * E_PAD + key_e, mask=placed, other=0)
        tl.store(sorted_ptr + dest, c * CHUNK + key % CHUNK, mask=placed)

        blocks = c * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)
        first_slot = blocks * BLOCK_M
        pad_end = tl.load(pad_end_ptr + tl.arange(0, E_PAD))
        # a block's expert = how many experts' runs end at or before the block's first slot
        e_of = tl.sum((pad_end[None, :] <= first_slot[:, None]).to(tl.int32), axis=1)
        e_of = tl.where(first_slot < tl.load(num_padded_ptr), e_of, -1)
        tl.store(block_expert_ptr + blocks, e_of, mask=blocks < num_blocks)


# The one-launch path's bound: each of its programs (one an expert) reads all the ids, so its time
# grows with experts x pairs, while the three-pass path spreads the pairs over chunks. Measured on an
# H200 (kernel_bench_moe.py --align; docs/perf/kernels_align_per_expert*.json), one launch against
# three passes, us: V2-Lite's 66 experts 2.2 / 2.6 / 3.4 / 5.3 / 8.7 against 9.2-9.5 / 12.6 at 512 /
# 1,024 / 2,048 / 4,096 / 8,192 pairs; DeepSeek-V3's 256 experts 2.6 / 3.7 / 7.7 / 11.7 against
# 15.0 / 10.8 / 9.6 / 9.5 at 512 / 1,024 / 2,048 / 4,096. The bound sits between the crossings
# (V3's 257 fused slots at 2,048 padded pairs, a decode batch of 128 at top-9, stay in one launch).
# A program holds all the pairs in registers, so their number is capped too: 8,192, the most measured.
ONE_LAUNCH_MAX_WORK = 768 * 1024  # experts x next_power_of_2(pairs)
ONE_LAUNCH_MAX_PAIRS = 8192


def _padded_pairs(num_pairs: int) -> int:
    """Lanes for num_pairs pairs in a program: the next power of two, at least 16 (both paths)."""
    return triton.next_power_of_2(max(num_pairs, 16))


def one_launch(num_pairs: int, num_experts: int) -> bool:
    """Whether moe_align_block_size_triton takes the one-launch path for this many pairs and experts."""
    n_pad = _padded_pairs(num_pairs)
    return n_pad <= ONE_LAUNCH_MAX_PAIRS and max(num_experts, 1) * n_pad <= ONE_LAUNCH_MAX_WORK


def _launch_per_expert(ids, sorted_ids, block_expert, num_padded, block_m, num_experts):
    num_pairs = ids.numel()
    n_pad = _padded_pairs(num_pairs)
    grid = max(num_experts, 1)
    _align_per_expert_kernel[(grid,)](
        ids, sorted_ids, block_expert, num_padded, num_pairs, num_experts, sorted_ids.numel(), block_expert.numel(),
        triton.cdiv(sorted_ids.numel(), grid), triton.cdiv(block_expert.numel(), grid), BLOCK_M=block_m,
        E_PAD=triton.next_power_of_2(max(num_experts, 2)), N_PAD=n_pad,
        RUN_BLOCKS=triton.next_power_of_2(triton.cdiv(n_pad, block_m)), FILL=64,
        num_warps=4 if n_pad <= 512 else 8, **pdl_launch(ids.device))


PATHS = ("one_launch", "three_pass")


def moe_align_block_size_triton(topk_ids: torch.Tensor, block_m: int, num_experts: int, path: str | None = None):
    """One launch (a program per expert) where one_launch() says so, else three: count per chunk,
    offsets (one program), scatter per chunk. path: force one of PATHS (tests, benchmarks)."""
    ids = topk_ids.reshape(-1)
    ids = ids if ids.is_contiguous() else ids.contiguous()
    num_pairs = ids.numel()
    max_padded = max_padded_size(num_pairs, num_experts, block_m)
    num_blocks = max_padded // block_m
    device = topk_ids.device
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=device)
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    if path is None:
        path = "one_launch" if one_launch(num_pairs, num_experts) else "three_pass"
    assert path in PATHS, f"unknown align path {path!r}"
    if path == "one_launch":
        _launch_per_expert(ids, sorted_ids, block_expert, num_padded, block_m, num_experts)
        return sorted_ids, block_expert, num_padded
    e_pad = triton.next_power_of_2(max(num_experts, 2))
    chunk = min(256, _padded_pairs(num_pairs))
    num_chunks = max(1, triton.cdiv(num_pairs, chunk))
    chunk_shift = torch.empty(num_chunks, e_pad, dtype=torch.int32, device=device)
    pad_end = torch.empty(e_pad, dtype=torch.int32, device=device)
    fill = 512
    _align_count_kernel[(num_chunks,)](ids, chunk_shift, sorted_ids, num_pairs, num_experts, max_padded,
                                       triton.cdiv(max_padded, num_chunks), E_PAD=e_pad, CHUNK=chunk, FILL=fill,
                                       num_warps=4)
    rows = max(1, min(16, 8192 // e_pad))
    _align_offsets_kernel[(1,)](chunk_shift, pad_end, num_padded, num_chunks, num_experts, BLOCK_M=block_m,
                                E_PAD=e_pad, ROWS=rows, num_warps=8)
    blocks_per_prog = triton.next_power_of_2(max(1, triton.cdiv(num_blocks, num_chunks)))  # 1: no pairs
    _align_scatter_kernel[(num_chunks,)](ids, chunk_shift, pad_end, num_padded, sorted_ids, block_expert, num_pairs,
                                         num_experts, num_blocks, BLOCK_M=block_m, E_PAD=e_pad, CHUNK=chunk,
                                         BLOCKS_PER_PROG=blocks_per_prog, num_warps=4 if chunk <= 64 else 8)
    return sorted_ids, block_expert, num_padded
