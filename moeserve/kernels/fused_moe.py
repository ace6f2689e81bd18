"""Fused MoE: route each token to its top-k experts, run gate_up -> SiLU*mul -> down, and
sum the expert outputs weighted by the router. Expert weights are stacked:
w13 [E, 2*I, H] (gate rows, then up rows) and w2 [E, H, I].
An expert id < 0 means "not computed here" (an expert on another rank) and adds nothing.

The Triton path (`fused_moe_triton`):
  1. moe_align: sort (token, expert) pairs by expert into blocks of BLOCK_M rows (moe_align.py);
     a single token skips it: its pairs have distinct experts, so each is a block of its own;
  2. grouped GEMM x @ w13[e].T for each block's expert, SiLU(gate) * up in the epilogue -> [pairs, I];
  3. grouped GEMM act @ w2[e].T, times the pair's router weight -> [pairs, H];
  4. sum over each token's top-k pairs, skipping pairs of experts < 0 -> [T, H].
The block-size config (moe_config.moe_config, or `config`) is the gate_up GEMM's; its optional
"down" sub-dict overrides BLOCK_N, BLOCK_K, GROUP_SIZE_M, num_warps or num_stages for the down GEMM
(moe_config.down_config). BLOCK_M is one for both: they share step 1's blocks.
With FP8 weights (block scales given) the activations entering each GEMM are quantized per
1 x block[1] group (W8A8, DeepSeek's recipe; `fp8_activations=False` keeps them in x.dtype and
converts weight tiles instead, W8A16, which is what fused_moe_ref computes). A config's
FUSE_QUANT (default: moe_config.moe_fuse_quant, off after the H200 measurements) quantizes those
activations inside the GEMMs instead of in two separate launches, bit-identically; each GEMM whose
BLOCK_K covers one scale group does, the other keeps its separate quant launch. Two launches go
another way, also bit-identically: `x_fp8`, x already quantized by the RMSNorm that made it, and
ACT_QUANT_IN_GATE_UP (default moe_config.ACT_QUANT_IN_GATE_UP), gate_up quantizing its own output in
its epilogue (its N tile is then one scale group), which also halves the intermediate's bytes.
Per-block flags (moe_config.DOWN_WAITS_PER_BLOCK, ACT_QUANT_BY_LAST_TILE; bit-identical too): the
down GEMM waits for gate_up block of rows by block instead of for its whole grid, so with PDL it
streams its weights during gate_up's last wave, and in W8A8 gate_up's last tile of each block
quantizes the block's intermediate rows, so no quant launch sits between the two GEMMs.
Tiled FP8 weights (`w_tile_n`, tile_weights; layers/moe.py stores its FP8 experts so): each expert's
[N, K] stored as [N/w_tile_n, K/block[1], w_tile_n, block[1]], so a GEMM's K step reads contiguous
w_tile_n x 128-byte chunks instead of 128 bytes from each of its rows, K bytes apart. Same values, same
products in the same order: bit-identical outputs. Measured (H200, V2-Lite FP8, batch 64): 0.10-0.15 ms
off a decode step; bf16's 256-byte row segments gain nothing (docs/perf/engine_v2lite.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moeserve.kernels import moe_config
from moeserve.kernels.fp8 import (FP8_DTYPE, FP8_MAX, _fp8_shapes_ok, dequant_block_fp8_ref, kept_counters,
                                  per_token_group_quant_fp8_ref, per_token_group_quant_fp8_triton, triton_runs_on)
from moeserve.kernels.moe_align import moe_align_block_size_triton

try:
    import triton
    import triton.language as tl
    from moeserve.kernels.pdl import pdl_begin, pdl_begin_no_wait, pdl_launch

    from moeserve.kernels.fp8 import _grouped_pid, _quant_group_tile
    from moeserve.kernels.peer_sync import clock_ns
except ImportError:  # pragma: no cover
    triton = None


@dataclass
class ExpertRows:
    """The fused MoE's output before its last launch, the sum over each token's experts: what fused_moe
    returns with sum_rows=False, for an RMSNorm to take as its input (it sums the rows itself, one launch
    and one [T, H] round trip less: kernels/rmsnorm.py). sum() is the tensor fused_moe returns otherwise."""
    rows: torch.Tensor  # [T * k, H]: row t * k + j is token t's j-th expert's output, times its router weight
    ids: torch.Tensor  # [T, k]: the experts; rows of ids < 0 (experts elsewhere) were never written
    addend: torch.Tensor | None = None  # [T, H], added to the rounded sum (an unfused shared MLP's output)

    @property
    def shape(self) -> tuple[int, int]:
        return self.ids.shape[0], self.rows.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.dtype

    @property
    def device(self) -> torch.device:
        return self.rows.device

    def sum(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.rows.dtype, device=self.rows.device)
        return moe_sum(self.rows, self.ids, out, self.addend)


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None,
                  w2_scale: torch.Tensor | None = None, block: tuple[int, int] = (128, 128),
                  addend: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H], topk_weights [T, k] (fp32), topk_ids [T, k] -> [T, H] in x.dtype.

    With w13_scale/w2_scale the weights are e4m3 with one scale per `block` (DeepSeek's format).
    Computes in fp32 per expert, looping only over experts that received tokens. `addend` [T, H]
    (the shared experts' output) is added to the routed sum after it is rounded to x.dtype.
    """
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    if x.shape[0] == 0:
        return out.to(x.dtype)
    if addend is not None:
        return fused_moe_ref(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, block) + addend
    flat_ids = topk_ids.reshape(-1)
    token_of = torch.arange(x.shape[0], device=x.device).repeat_interleave(topk_ids.shape[1])
    weight_of = topk_weights.reshape(-1).to(torch.float32)
    for e in torch.unique(flat_ids).tolist():
        if e < 0:
            continue
        sel = (flat_ids == e).nonzero(as_tuple=True)[0]
        tok = token_of[sel]
        w_gate_up = w13[e] if w13_scale is None else dequant_block_fp8_ref(w13[e], w13_scale[e], block)
        w_down = w2[e] if w2_scale is None else dequant_block_fp8_ref(w2[e], w2_scale[e], block)
        h = x[tok].to(torch.float32) @ w_gate_up.to(torch.float32).t()
        gate, up = h.chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ w_down.to(torch.float32).t()
        out.index_add_(0, tok, y * weight_of[sel, None])
    return out.to(x.dtype)


def tile_weights(w: torch.Tensor, tile_n: int, tile_k: int) -> torch.Tensor:
    """w [..., N, K] -> the same values with each [tile_n, tile_k] tile contiguous: storage order
    [..., N/tile_n, K/tile_k, tile_n, tile_k], returned in w's shape (so a row's values are not
    where w[..., r, :] says any more: only kernels told w_tile_n read it). N and K multiples of the tile."""
    *lead, n, k = w.shape
    tiles = w.reshape(*lead, n // tile_n, tile_n, k // tile_k, tile_k).transpose(-3, -2)
    return tiles.contiguous().reshape(w.shape)


def untile_weights(w: torch.Tensor, tile_n: int, tile_k: int) -> torch.Tensor:
    """tile_weights undone."""
    *lead, n, k = w.shape
    tiles = w.reshape(*lead, n // tile_n, k // tile_k, tile_n, tile_k).transpose(-3, -2)
    return tiles.contiguous().reshape(w.shape)


def can_tile_weights(w13: torch.Tensor, w2: torch.Tensor, tile_n: int, block: tuple[int, int]) -> bool:
    """Whether both expert stacks split into [tile_n, block[1]] tiles, w13's gate and up halves each whole
    tiles, with a scale group the Triton path takes (the K tile is the group)."""
    bk = block[1]
    return (tile_n > 0 and _fp8_shapes_ok(block) and w13.shape[-2] % (2 * tile_n) == 0
            and w2.shape[-2] % tile_n == 0 and w13.shape[-1] % bk == 0 and w2.shape[-1] % bk == 0)


def _fake_quant_act(a: torch.Tensor, group: int) -> torch.Tensor:
    q, s = per_token_group_quant_fp8_ref(a, group)
    return q.to(torch.float32) * s.repeat_interleave(group, dim=1)[:, :a.shape[1]]


def fused_moe_w8a8_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                       topk_ids: torch.Tensor, w13_scale: torch.Tensor, w2_scale: torch.Tensor,
                       block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """fused_moe_ref with each GEMM's activations also quantized per 1 x block[1] group, as the
    Triton W8A8 path computes it (the intermediate rounded to x.dtype first, as the kernel stores it)."""
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1)
    token_of = torch.arange(x.shape[0], device=x.device).repeat_interleave(topk_ids.shape[1])
    weight_of = topk_weights.reshape(-1).to(torch.float32)
    xq = _fake_quant_act(x, block[1])
    for e in torch.unique(flat_ids).tolist():
        if e < 0:
            continue
        sel = (flat_ids == e).nonzero(as_tuple=True)[0]
        tok = token_of[sel]
        h = xq[tok] @ dequant_block_fp8_ref(w13[e], w13_scale[e], block).t()
        gate, up = h.chunk(2, dim=-1)
        act = _fake_quant_act((F.silu(gate) * up).to(x.dtype), block[1])
        y = act @ dequant_block_fp8_ref(w2[e], w2_scale[e], block).t()
        out.index_add_(0, tok, y * weight_of[sel, None])
    return out.to(x.dtype)



if triton is not None:

    @triton.jit
    def _quant_block_rows(x_ptr, q_ptr, s_ptr, rows, row_mask, width, stride_xm, stride_qm, stride_sm,
                          ROWS: tl.constexpr, GROUPS: tl.constexpr, GROUP: tl.constexpr, FP8_MAX_C: tl.constexpr,
                          FAST: tl.constexpr):
        # q/s of x's ROWS rows, one scale per GROUP columns: what _group_quant_kernel makes of them,
        # bit for bit (the same _quant_group_tile on the same stored values). GROUPS groups of every
        # row at a time: each pass is a round trip to L2 on the block's critical path. x is read
        # from L2 (.cg): other programs wrote it, and L1 is not coherent.
        rows = rows.to(tl.int64)
        num_groups = tl.cdiv(width, GROUP)
        for g0 in range(0, num_groups, GROUPS):
            grp = g0 + tl.arange(0, GROUPS)
            cols = grp[None, :, None] * GROUP + tl.arange(0, GROUP)[None, None, :]
            mask = row_mask[:, None, None] & (cols < width)
            x = tl.load(x_ptr + rows[:, None, None] * stride_xm + cols, mask=mask, other=0.0, cache_modifier=".cg")
            q, scale = _quant_group_tile(tl.reshape(x.to(tl.float32), [ROWS * GROUPS, GROUP]), FP8_MAX_C, FAST)
            q = tl.reshape(q, [ROWS, GROUPS, GROUP]).to(q_ptr.dtype.element_ty)
            tl.store(q_ptr + rows[:, None, None] * stride_qm + cols, q, mask=mask)
            tl.store(s_ptr + rows[:, None] * stride_sm + grp[None, :], tl.reshape(scale, [ROWS, GROUPS]),
                     mask=row_mask[:, None] & (grp[None, :] < num_groups))

    @triton.jit
    def _wait_for_block(flags_ptr, block, ready_count, num_tiles, timeout_ns, MAX_BLOCKS: tl.constexpr,
                        FAST: tl.constexpr):
        # Spin until `ready_count` arrivals of the block's gate_up programs (acquire: their stores
        # are visible after it). Each of the block's num_tiles down programs then departs; the last
        # one resets both counters to 0 for the next call (all of this block's programs have passed).
        # Returns 1 if it gave up past timeout_ns (peer_sync.clock_ns), else 0.
        polls = tl.full([], 0, tl.int64)
        start = clock_ns(polls, FAST)
        late = tl.full([], 0, tl.int32)
        seen = tl.atomic_add(flags_ptr + block, 0, sem="acquire")
        while (seen < ready_count) & (late == 0):
            polls += 1
            if clock_ns(polls, FAST) - start > timeout_ns:
                late = tl.full([], 1, tl.int32)
            seen = tl.atomic_add(flags_ptr + block, 0, sem="acquire")
        if late == 0:
            if tl.atomic_add(flags_ptr + MAX_BLOCKS + block, 1, sem="relaxed") == num_tiles - 1:
                tl.atomic_xchg(flags_ptr + block, 0, sem="relaxed")
                tl.atomic_xchg(flags_ptr + MAX_BLOCKS + block, 0, sem="relaxed")
        tl.debug_barrier()
        return late

    @triton.jit
    def _abort(FAST: tl.constexpr):
        # A wait past its deadline: the kernel traps, the stream reports a CUDA error to the host at
        # its next synchronization (a failed step, not a hung one). The interpreter cannot trap.
        if FAST:
            tl.inline_asm_elementwise("trap;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit(do_not_specialize=["num_pairs", "max_padded", "ready_count", "wait_timeout_ns"])
    def _moe_gemm_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, out_ptr, outs_ptr, route_w_ptr,
                         sorted_ids_ptr, block_expert_ptr, num_padded_ptr, flags_ptr, outq_ptr,
                         num_pairs, n, k, a_row_div, max_padded, ready_count, wait_timeout_ns,
                         stride_am, stride_asm, stride_we, stride_wn, stride_wse, stride_wsn, stride_om, stride_osm,
                         stride_oqm,
                         GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_SIZE_M: tl.constexpr, GATE_UP: tl.constexpr, W_FP8: tl.constexpr,
                         A_FP8: tl.constexpr, A_QUANT: tl.constexpr = False, FP8_MAX_C: tl.constexpr = 448.0,
                         FAST: tl.constexpr = False, PAIR_BLOCKS: tl.constexpr = False,
                         OUT_QUANT: tl.constexpr = False, ACT_DTYPE: tl.constexpr = tl.float32,
                         ARRIVE: tl.constexpr = False, QUANT_ROWS: tl.constexpr = False,
                         QUANT_GROUPS: tl.constexpr = 1, LAST_RESETS: tl.constexpr = False,
                         WAIT_BLOCK: tl.constexpr = False, MAX_BLOCKS: tl.constexpr = 0,
                         W_TILE_N: tl.constexpr = 0, EVEN_K: tl.constexpr = False, PDL: tl.constexpr = False):
        """One program: BLOCK_M sorted pairs (all of one expert) x BLOCK_N output columns.
        PAIR_BLOCKS: no align pass, one pair a block (one token: its top-k experts are distinct).

        GATE_UP: out[pair, j] = silu(a @ w[e, j].T) * (a @ w[e, n + j].T), a row = pair // a_row_div.
        else:    out[pair, j] = route_w[pair] * (a[pair] @ w[e, j].T).
        A_QUANT (FP8 weights, BLOCK_K == GROUP_K): a is unquantized; each K step quantizes its A tile
        per row and group exactly as the separate quant kernel would (W8A8 without its launch).
        OUT_QUANT (GATE_UP, BLOCK_N == GROUP_K): out gets the e4m3 of the output rounded to ACT_DTYPE,
        outs [pair, pid_n] its scale: what the separate quant kernel makes of the stored output.
        EVEN_K: BLOCK_K divides k, so no K step needs a bound on its columns.

        Per-block flags (flags_ptr: arrivals [MAX_BLOCKS], departures [MAX_BLOCKS], int32, zero
        between calls):
        ARRIVE (gate_up): each program counts itself into its block's arrivals once its tile is
          stored. With QUANT_ROWS the block's last program then quantizes the block's rows of out
          (outq [pair, :] e4m3, outs [pair, group] scales, QUANT_GROUPS groups a pass: the down
          GEMM's W8A8 input, no quant launch) and arrives once more, or with LAST_RESETS (nothing
          waits on the block) sets the block's arrivals back to 0.
        WAIT_BLOCK (down): no grid-wide wait for the predecessor; each program spins on its block's
          arrivals reaching ready_count before it reads a row of a, so with PDL the down GEMM runs
          the blocks gate_up has finished during gate_up's last wave (PDL launches it only once
          every gate_up program has started, so what it waits for is running). Past
          wait_timeout_ns the kernel traps (_abort).
        """
        if WAIT_BLOCK:
            pdl_begin_no_wait(PDL)
        else:
            pdl_begin(PDL)
        pid = tl.program_id(0)
        pid_m, pid_n = _grouped_pid(pid, max_padded // BLOCK_M, tl.cdiv(n, BLOCK_N), GROUP_SIZE_M)
        if PAIR_BLOCKS:  # block i is pair i alone (its expert: block_expert[i], the flat topk ids)
            expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
            if expert < 0:
                return
            pair = tl.where(tl.arange(0, BLOCK_M) == 0, pid_m, num_pairs)
        else:
            if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
                return
            expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
            pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        if WAIT_BLOCK:  # a block that returned above has no arrivals to wait for, in either GEMM
            if _wait_for_block(flags_ptr, pid_m, ready_count, tl.cdiv(n, BLOCK_N), wait_timeout_ns, MAX_BLOCKS,
                               FAST):
                _abort(FAST)
                return
        mask_m = pair < num_pairs
        a_row = (pair // a_row_div).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n
        offs_k = tl.arange(0, BLOCK_K)

        a_rows = a_ptr + a_row[:, None] * stride_am
        if W_TILE_N > 0:  # tiled weights (tile_weights): row r's K step s at (r // T * K/BK + s) * T*BK + r % T * BK
            w_row = (offs_n // W_TILE_N).to(tl.int64) * (W_TILE_N * k) + (offs_n % W_TILE_N) * BLOCK_K
            w_gate = w_ptr + expert * stride_we + w_row[None, :]
        else:
            w_gate = w_ptr + expert * stride_we + offs_n.to(tl.int64)[None, :] * stride_wn
        ws_gate = ws_ptr + expert * stride_wse + (offs_n // GROUP_N) * stride_wsn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if GATE_UP:  # up rows sit n rows below the gate rows (tiled: n is a multiple of W_TILE_N)
            w_up = w_gate + n * stride_wn
            ws_up = ws_ptr + expert * stride_wse + ((offs_n + n) // GROUP_N) * stride_wsn
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            kk = k0 + offs_k
            if EVEN_K:
                a_mask, w_mask = mask_m[:, None], mask_n[None, :]
            else:
                a_mask, w_mask = mask_m[:, None] & (kk < k)[None, :], mask_n[None, :] & (kk < k)[:, None]
            a = tl.load(a_rows + kk[None, :], mask=a_mask, other=0.0)
            wk = k0 * W_TILE_N + offs_k if W_TILE_N > 0 else kk
            b = tl.load(w_gate + wk[:, None], mask=w_mask, other=0.0)
            if GATE_UP:
                b_up = tl.load(w_up + wk[:, None], mask=w_mask, other=0.0)
            if W_FP8:
                # A weight scale a column, even where a tile's columns share one: the dense FP8 GEMM's
                # scalar form (fp8.scale_per_tile) made this kernel slower at 64 tokens on an H200, in both
                # GEMMs 4% (gate_up then took 146 registers a thread, not 128), in down alone 2% and
                # +0.05 ms a step (though down's registers fell from 142 to 110; docs/perf/kernels_moe.md).
                kg = k0 // GROUP_K
                s_gate = tl.load(ws_gate + kg, mask=mask_n, other=0.0)
                if GATE_UP:
                    s_up = tl.load(ws_up + kg, mask=mask_n, other=0.0)
                if A_QUANT:
                    aq, a_s = _quant_group_tile(a.to(tl.float32), FP8_MAX_C, FAST)
                    a = aq.to(w_ptr.dtype.element_ty)
                    a_s = a_s[:, None]
                    acc += tl.dot(a, b) * a_s * s_gate[None, :]
                    if GATE_UP:
                        acc_up += tl.dot(a, b_up) * a_s * s_up[None, :]
                elif A_FP8:
                    a_s = tl.load(as_ptr + a_row * stride_asm + kg, mask=mask_m, other=0.0)[:, None]
                    acc += tl.dot(a, b) * a_s * s_gate[None, :]
                    if GATE_UP:
                        acc_up += tl.dot(a, b_up) * a_s * s_up[None, :]
                else:
                    acc += tl.dot(a, b.to(a.dtype)) * s_gate[None, :]
                    if GATE_UP:
                        acc_up += tl.dot(a, b_up.to(a.dtype)) * s_up[None, :]
            else:
                acc = tl.dot(a, b, acc)
                if GATE_UP:
                    acc_up = tl.dot(a, b_up, acc_up)
        if GATE_UP:
            acc = acc * tl.sigmoid(acc) * acc_up
        else:
            acc = acc * tl.load(route_w_ptr + pair, mask=mask_m, other=0.0)[:, None]
        out = out_ptr + pair.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        if OUT_QUANT:  # this tile's columns are one scale group of the row (columns past n are zeros)
            q, scale = _quant_group_tile(acc.to(ACT_DTYPE).to(tl.float32), FP8_MAX_C, FAST)
            tl.store(out, q.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
            tl.store(outs_ptr + pair.to(tl.int64) * stride_osm + pid_n, scale, mask=mask_m)
        else:
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
        if ARRIVE:
            # every thread's stores before the (release) arrival; the block's last arrival sees all
            # of them (acquire), as the split-K sum in the dense FP8 GEMM does
            tl.debug_barrier()
            arrived = tl.atomic_add(flags_ptr + pid_m, 1, sem="acq_rel")
            if QUANT_ROWS:
                if arrived == tl.cdiv(n, BLOCK_N) - 1:
                    _quant_block_rows(out_ptr, outq_ptr, outs_ptr, pair, mask_m, n, stride_om, stride_oqm,
                                      stride_osm, BLOCK_M, QUANT_GROUPS, GROUP_K, FP8_MAX_C, FAST)
                    tl.debug_barrier()
                    if LAST_RESETS:
                        tl.atomic_xchg(flags_ptr + pid_m, 0, sem="relaxed")
                    else:
                        tl.atomic_add(flags_ptr + pid_m, 1, sem="release")

    @triton.jit
    def _sum_expert_rows(x_ptr, ids_ptr, add_ptr, rows, cols, mask, num_rows, stride_xt, stride_add,
                         SUM_ROWS: tl.constexpr, HAS_ADD: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        # ROWS tokens' sums, [ROWS, BLOCK] columns: token t's SUM_ROWS expert rows x[t * SUM_ROWS + j] summed in
        # fp32 in order of j, rows of ids < 0 skipped (never written), rounded to x's dtype; plus add[t] after
        # that rounding (as the reference adds the shared experts' output), rounded again. The sum kernel
        # below and the RMSNorm that reads ExpertRows (kernels/rmsnorm.py) both sum with this, so their
        # results are the same bits.
        acc = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for j in tl.static_range(SUM_ROWS):
            pair = rows * SUM_ROWS + j
            kept = tl.load(ids_ptr + pair, mask=rows < num_rows, other=-1) >= 0
            acc += tl.load(x_ptr + pair[:, None] * stride_xt + cols[None, :], mask=mask & kept[:, None],
                           other=0.0).to(tl.float32)
        if HAS_ADD:
            acc = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
            acc += tl.load(add_ptr + rows[:, None] * stride_add + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        return acc.to(x_ptr.dtype.element_ty).to(tl.float32)

    @triton.jit
    def _moe_sum_kernel(y_ptr, ids_ptr, add_ptr, out_ptr, num_tokens, h, stride_ym, stride_am, stride_om,
                        TOP_K: tl.constexpr, HAS_ADD: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr = False):
        pdl_begin(PDL)
        # out[t] = sum of y[t * TOP_K + j] over the j whose expert id is >= 0, plus add[t] when given
        # (the shared experts: one launch less); out has y's dtype
        t = tl.program_id(0).to(tl.int64) + tl.arange(0, 1)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = cols[None, :] < h
        acc = _sum_expert_rows(y_ptr, ids_ptr, add_ptr, t, cols, mask, num_tokens, stride_ym, stride_am, TOP_K,
                               HAS_ADD, 1, BLOCK_H)
        tl.store(out_ptr + t[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


QUANT_TILE_VALUES = 8192  # _quant_block_rows's tile: 64 fp32 registers a thread at 4 warps


def _quant_groups(rows: int, width: int, group: int) -> int:
    """Scale groups of each row a pass of _quant_block_rows: all of them, or as many as fit the tile."""
    return max(1, min(triton.next_power_of_2(triton.cdiv(width, group)), QUANT_TILE_VALUES // (rows * group)))


def _launch_moe_gemm(a, a_scale, w, w_scale, out, route_w, align, num_pairs, a_row_div, gate_up, cfg, block,
                     a_quant=False, out_scale=None, act_dtype=torch.float32, flags=None, rows_quant=None,
                     wait_count=0, last_resets=False, w_tile_n=0):
    """align: moe_align's (sorted ids, block experts, padded count), or (None, flat topk ids, None):
    one pair a block, no align pass. out_scale: out is e4m3 and gets the output's quantization (the
    output rounded to act_dtype first), one scale a BLOCK_N = block[1] tile.
    flags (block_flags): gate_up arrives per block (rows_quant: (q, scales) the block's last
    program fills from out; last_resets: no down GEMM waits on the flags, that program resets
    them), down (wait_count > 0) waits per block for wait_count arrivals. w_tile_n: w is FP8 in
    tile_weights' layout of [w_tile_n, block[1]] tiles."""
    sorted_ids, block_expert, num_padded = align
    pair_blocks = sorted_ids is None
    n = w.shape[1] // 2 if gate_up else w.shape[1]
    k = w.shape[2]
    w_fp8 = w_scale is not None
    grid = (block_expert.numel() * triton.cdiv(n, cfg["BLOCK_N"]),)
    max_padded = block_expert.numel() * cfg["BLOCK_M"] if pair_blocks else sorted_ids.numel()
    dummy = out  # stands in for pointers a variant does not read
    act_tl = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[act_dtype]
    rows_q, rows_s = rows_quant if rows_quant is not None else (dummy, out_scale)
    block_k = min(cfg["BLOCK_K"], block[1]) if w_fp8 else cfg["BLOCK_K"]
    if w_tile_n:  # a K step is one tile of the layout (tile_weights: block[1] wide), N tiles whole ones
        assert w_fp8 and cfg["BLOCK_N"] % w_tile_n == 0 and n % w_tile_n == 0, (cfg["BLOCK_N"], n, w_tile_n)
        block_k = block[1]
    _moe_gemm_kernel[grid](
        a, a_scale if a_scale is not None else dummy, w, w_scale if w_fp8 else dummy, out,
        rows_s if rows_s is not None else dummy,
        route_w if route_w is not None else dummy, dummy if pair_blocks else sorted_ids, block_expert,
        dummy if pair_blocks else num_padded, flags if flags is not None else dummy, rows_q,
        num_pairs, n, k, a_row_div, max_padded, wait_count, int(BLOCK_WAIT_TIMEOUT_S * 1e9),
        a.stride(0), a_scale.stride(0) if a_scale is not None else 0, w.stride(0), w.stride(1),
        w_scale.stride(0) if w_fp8 else 0, w_scale.stride(1) if w_fp8 else 0, out.stride(0),
        rows_s.stride(0) if rows_s is not None else 0, rows_q.stride(0),
        GROUP_N=block[0], GROUP_K=block[1], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=block_k, GROUP_SIZE_M=cfg["GROUP_SIZE_M"],
        GATE_UP=gate_up, W_FP8=w_fp8, A_FP8=a.dtype == FP8_DTYPE, A_QUANT=a_quant, FP8_MAX_C=FP8_MAX, FAST=a.is_cuda,
        PAIR_BLOCKS=pair_blocks, OUT_QUANT=out_scale is not None, ACT_DTYPE=act_tl,
        ARRIVE=flags is not None and gate_up, QUANT_ROWS=rows_quant is not None,
        QUANT_GROUPS=_quant_groups(cfg["BLOCK_M"], n, block[1]), LAST_RESETS=last_resets,
        WAIT_BLOCK=wait_count > 0, MAX_BLOCKS=MAX_FLAG_BLOCKS, W_TILE_N=w_tile_n, EVEN_K=k % block_k == 0,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **register_cap(cfg, a.device),
        **pdl_launch(a.device))


def register_cap(cfg: dict, device: torch.device) -> dict:
    """A config's "maxnreg" (registers a thread at most, ptxas's .maxnreg) as launch options: fewer
    registers a program let more programs share an SM (GPU compiles only; the interpreter has none)."""
    return {"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") and device.type == "cuda" else {}


# Per-block flags of the two MoE GEMMs (_moe_gemm_kernel's ARRIVE / WAIT_BLOCK): arrivals and
# departures, MAX_FLAG_BLOCKS int32 each, one set a device (fp8.kept_counters; the runner warms up
# before it captures), zero between calls (each block's last down program resets its pair). A call
# with more blocks, or a first call inside a capture, takes the grid-wide wait instead. One set a
# device: one stream at a time may run the fused MoE on it (the engine's case), as with
# fp8.split_counters.
MAX_FLAG_BLOCKS = 16384
BLOCK_WAIT_TIMEOUT_S = 10.0  # a down program's wait for its block (a whole MoE layer takes < 1 ms)
_block_flags: dict[torch.device, torch.Tensor] = {}


def block_flags(device: torch.device, blocks: int) -> torch.Tensor | None:
    return kept_counters(_block_flags, device, 2 * MAX_FLAG_BLOCKS) if blocks <= MAX_FLAG_BLOCKS else None


def moe_sum(y: torch.Tensor, topk_ids: torch.Tensor, out: torch.Tensor, addend: torch.Tensor | None = None) -> torch.Tensor:
    t, top_k = topk_ids.shape
    h = y.shape[1]
    block_h = min(1024, triton.next_power_of_2(h))
    if addend is not None and addend.stride(-1) != 1:
        addend = addend.contiguous()
    assert out.dtype == y.dtype, "the sum is rounded to the rows' dtype"
    _moe_sum_kernel[(t, triton.cdiv(h, block_h))](
        y, topk_ids, addend if addend is not None else out, out, t, h, y.stride(0),
        addend.stride(0) if addend is not None else 0, out.stride(0), TOP_K=top_k, HAS_ADD=addend is not None,
        BLOCK_H=block_h, num_warps=4, **pdl_launch(y.device))
    return out


def fused_moe_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None,
                     w2_scale: torch.Tensor | None = None, block: tuple[int, int] = (128, 128),
                     fp8_activations: bool = True, config: dict | None = None,
                     addend: torch.Tensor | None = None, num_fused_shared: int = 0,
                     x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
                     out_dtype: torch.dtype | None = None, sum_rows: bool = True,
                     w_tile_n: int = 0) -> torch.Tensor | ExpertRows:
    # x None: the activations are x_fp8 alone (expert parallelism's received rows), out_dtype the result's.
    # sum_rows False: the result before the last sum (ExpertRows), for the RMSNorm after the MoE.
    # w_tile_n: w13 and w2 are FP8 in tile_weights' layout of [w_tile_n, block[1]] tiles.
    tokens, hidden = (x if x is not None else x_fp8[0]).shape
    dtype, device = (x.dtype, x.device) if x is not None else (out_dtype, x_fp8[0].device)
    num_experts, intermediate = w13.shape[0], w13.shape[1] // 2
    top_k = topk_ids.shape[1]
    num_pairs = tokens * top_k
    out = torch.empty(tokens, hidden, dtype=dtype, device=device)
    if tokens == 0:
        return out
    w_fp8 = w13_scale is not None
    wdtype = "fp8" if w_fp8 else str(w13.dtype).removeprefix("torch.")
    cfg = config or moe_config.moe_config(tokens, num_experts, hidden, intermediate, top_k, wdtype, device,
                                          num_fused_shared)
    down_cfg = moe_config.down_config(cfg)
    if w_tile_n and not w_fp8:
        raise ValueError("tiled expert weights (w_tile_n) are FP8 only")
    x = x if x is None or x.stride(-1) == 1 else x.contiguous()
    topk_ids = topk_ids.contiguous()
    route_w = topk_weights.to(torch.float32).contiguous()
    if tokens == 1:  # its top-k experts are distinct: one pair a block as they come, no align launch
        align = (None, topk_ids.view(-1), None)
    else:
        align = moe_align_block_size_triton(topk_ids, cfg["BLOCK_M"], num_experts)
    quant = w_fp8 and fp8_activations
    # Quantize the activations inside a GEMM (no quant launch) where its K step is one scale group;
    # the config (or moe_config's default: decode sizes only) says whether it pays.
    fuse = quant and cfg.get("FUSE_QUANT", moe_config.moe_fuse_quant(tokens, num_experts, top_k))
    fuse_gate_up = fuse and min(cfg["BLOCK_K"], block[1]) == block[1] and x_fp8 is None
    # gate_up's epilogue quantizes the intermediate for the down GEMM: its N tile is one scale group.
    act_quant = quant and cfg.get("ACT_QUANT_IN_GATE_UP", moe_config.ACT_QUANT_IN_GATE_UP)
    fuse_down = fuse and min(down_cfg["BLOCK_K"], block[1]) == block[1] and not act_quant
    # Per-block flags (moe_config): the down GEMM waiting for gate_up per block of rows, and in W8A8
    # gate_up's last program of a block quantizing the block's intermediate rows (no quant launch).
    # A single token keeps the quant launch: its blocks are one row each, and quantizing that row after
    # the block's last tile cost more than the launch (H200, V2-Lite: 33.5 vs 29.9 us the layer).
    decode = tokens <= moe_config.PER_BLOCK_MAX_TOKENS
    per_block = decode and cfg.get("DOWN_WAITS_PER_BLOCK", moe_config.DOWN_WAITS_PER_BLOCK)
    quant_rows = (decode and quant and not act_quant and not fuse_down and tokens > 1
                  and cfg.get("ACT_QUANT_BY_LAST_TILE", moe_config.ACT_QUANT_BY_LAST_TILE))
    # The down GEMM may wait on gate_up's flags only where gate_up makes its input (not a quant launch).
    per_block = per_block and (not quant or quant_rows or act_quant or fuse_down)
    flags = block_flags(device, align[1].numel()) if per_block or quant_rows else None
    per_block, quant_rows = per_block and flags is not None, quant_rows and flags is not None

    if quant and x_fp8 is not None:
        a, a_scale = x_fp8
    else:
        a, a_scale = per_token_group_quant_fp8_triton(x, block[1]) if quant and not fuse_gate_up else (x, None)
    if act_quant:
        cfg = dict(cfg, BLOCK_N=block[1])
        act = torch.empty(num_pairs, intermediate, dtype=FP8_DTYPE, device=device)
        act_scale = torch.empty(num_pairs, triton.cdiv(intermediate, block[1]), dtype=torch.float32, device=device)
    else:
        act = torch.empty(num_pairs, intermediate, dtype=dtype, device=device)
        act_scale = None
    rows_quant = (torch.empty(num_pairs, intermediate, dtype=FP8_DTYPE, device=device),
                  torch.empty(num_pairs, triton.cdiv(intermediate, block[1]), dtype=torch.float32, device=device)
                  ) if quant_rows else None
    _launch_moe_gemm(a, a_scale, w13, w13_scale, act, None, align, num_pairs, top_k, True, cfg, block, fuse_gate_up,
                     out_scale=act_scale, act_dtype=dtype, flags=flags, rows_quant=rows_quant,
                     last_resets=not per_block, w_tile_n=w_tile_n)

    if act_quant:
        a, a_scale = act, act_scale
    elif quant_rows:
        a, a_scale = rows_quant
    else:
        a, a_scale = per_token_group_quant_fp8_triton(act, block[1]) if quant and not fuse_down else (act, None)
    y = torch.empty(num_pairs, hidden, dtype=dtype, device=device)
    # per block: gate_up's tiles (+ the quant)
    wait_count = triton.cdiv(intermediate, cfg["BLOCK_N"]) + quant_rows if per_block else 0
    _launch_moe_gemm(a, a_scale, w2, w2_scale, y, route_w, align, num_pairs, 1, False, down_cfg, block, fuse_down,
                     flags=flags if per_block else None, wait_count=wait_count, w_tile_n=w_tile_n)
    if not sum_rows:
        return ExpertRows(y, topk_ids, addend)
    return moe_sum(y, topk_ids, out, addend)


def _triton_supports(x, w13, w2, w13_scale, w2_scale, block) -> bool:
    if x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    if w13_scale is not None:
        return (w13.dtype == FP8_DTYPE and w2.dtype == FP8_DTYPE and w2_scale is not None
                and _fp8_shapes_ok(block))
    return w13.dtype == x.dtype and w2.dtype == x.dtype


def _runs_triton(x, w13, w2, w13_scale, w2_scale, block, *others) -> bool:
    """Whether fused_moe takes its Triton path on these arguments."""
    return triton_runs_on(x, w13, w2, *others) and _triton_supports(x, w13, w2, w13_scale, w2_scale, block)


def takes_fp8_input(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, w13_scale: torch.Tensor | None,
                    w2_scale: torch.Tensor | None, block: tuple[int, int]) -> bool:
    """Whether fused_moe runs its W8A8 Triton path on these arguments, so that it can be given the
    activations as x_fp8 alone (x=None)."""
    return w13_scale is not None and _runs_triton(x, w13, w2, w13_scale, w2_scale, block)


def fused_moe(x: torch.Tensor | None, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
              block: tuple[int, int] = (128, 128), fp8_activations: bool = True,
              addend: torch.Tensor | None = None, num_fused_shared: int = 0,
              x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
              out_dtype: torch.dtype | None = None, sum_rows: bool = True,
              w_tile_n: int = 0) -> torch.Tensor | ExpertRows:
    """Triton where it can run (CUDA, or CPU under TRITON_INTERPRET=1), else fused_moe_ref. The
    result plus `addend` [T, H] when given (added in the final sum kernel). num_fused_shared: the
    last S of the experts are shared experts that every token names last in its row (layers/moe.py);
    the math is the same, only the block-size config is looked up for the routed shape too.
    x_fp8: x's quantization per 1 x block[1] (the RMSNorm before made it), for the W8A8 path; the
    reference (W8A16, unquantized activations) does not use it. x None: x_fp8 is the input (only where
    takes_fp8_input holds), and out_dtype the result's dtype. sum_rows False: on the Triton path the
    result before its last sum (ExpertRows; an RMSNorm takes it as input), else the tensor as always.
    w_tile_n: w13 and w2 are FP8 in tile_weights' layout (the reference untiles a copy)."""
    if x is None:
        if x_fp8 is None or out_dtype is None or w13_scale is None:
            raise ValueError("fused_moe without x needs x_fp8, out_dtype and FP8 expert weights")
        return fused_moe_triton(None, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, tuple(block), True,
                                addend=addend, num_fused_shared=num_fused_shared, x_fp8=x_fp8, out_dtype=out_dtype,
                                sum_rows=sum_rows, w_tile_n=w_tile_n)
    if _runs_triton(x, w13, w2, w13_scale, w2_scale, block, topk_ids):
        return fused_moe_triton(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, tuple(block),
                                fp8_activations, addend=addend, num_fused_shared=num_fused_shared, x_fp8=x_fp8,
                                sum_rows=sum_rows, w_tile_n=w_tile_n)
    if w_tile_n:
        w13, w2 = (untile_weights(w, w_tile_n, block[1]) for w in (w13, w2))
    return fused_moe_ref(x, w13, w2, topk_weights, topk_ids, w13_scale, w2_scale, block, addend)
