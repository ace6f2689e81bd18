"""DeepSeekMoE / Qwen3-MoE block: router, routed experts, shared experts; and the dense MLP.

Routing (softmax or sigmoid scores, greedy or group-limited top-k, DeepSeek-V3's correction
bias) is one fused kernel over the router logits: kernels/routing.py, beside its torch reference.
The dense MLP (and the shared experts where they are not fused, below) run gate and up as one GEMM
over the merged [gate; up] weight (layers/linear.py MergedColumnLinear), then one SiLU-and-mul kernel.
Routed experts are stacked ([E, 2I, H] gate|up, [E, H, I] down) and run by the fused MoE kernel.

Shared experts, fused (ep == 1, the default; ModelConfig.fuse_shared_experts): DeepSeek's S shared
experts of width I are one MLP of intermediate S*I in the checkpoint. SiLU-and-mul is elementwise
over the intermediate dimension and down_proj sums over it, so that MLP is the sum of S experts,
the k-th taking gate/up rows and down columns [kI, (k+1)I). They are stacked as slots E..E+S-1
after the routed experts (w13 [E+S, 2I, H], w2 [E+S, H, I], FP8 block scales likewise; the loader
cuts the slices, models/loader.py), the routing kernel appends them to every token's top-k with
weight 1.0 ([T, k+S] ids and weights, the scaling factor on the routed weights only), and the
fused MoE's launches (align, two grouped GEMMs, sum) compute routed and shared experts together.
Not fused: a separate MLP whose output the MoE sum kernel adds (the `addend`).
Under expert parallelism (a rank's ParallelState carries an EPRuntime) a rank stacks only its
own expert slots, and the routed tokens travel to the ranks that hold their experts and back;
the router and the (never fused) shared experts always run on the token's own rank.
Under tensor parallelism (ep == 1) every rank holds every expert's slice of the intermediate
dimension (w13 [E(+S), 2I/tp, H], w2 [E(+S), H, I/tp]), the fused shared slots like any routed
expert (an unfused shared MLP is split over its S*I likewise); the partial sums of routed and
shared experts are summed over the TP group in one all_reduce.
Under both (tp > 1 inside ep = dp * tp) experts are whole and spread over all ranks; each TP rank
runs the whole block (router, routed and shared experts) on its share of the rows only, and one
all_gather over the TP group gives every rank every row (distributed/ep_moe.py).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moeserve.config import ModelConfig
from moeserve.distributed.ep_moe import gather_shares, row_share
from moeserve.distributed.groups import get_parallel_state
from moeserve.kernels import moe_config
from moeserve.kernels.fp8 import FP8_DTYPE, triton_runs_on
from moeserve.kernels.activation import silu_and_mul
from moeserve.kernels.fused_moe import can_tile_weights, fused_moe, tile_weights
from moeserve.kernels.router_gemm import router_logits
from moeserve.kernels.routing import RoutingConfig, select_experts
from moeserve.layers.linear import LinearPart, MergedColumnLinear, _ceil_div, _shard, row_parallel, tp_world


class MLP(nn.Module):
    """SiLU-gated MLP (dense layers and shared experts): one GEMM over the merged [gate; up] weight
    (checkpoint tensors gate_proj and up_proj), one SiLU-and-mul kernel, down_proj. Tensor
    parallel: gate/up column-parallel (a rank holds [its gate slice; its up slice]), down
    row-parallel (summed over the TP group unless reduce=False: the caller sums); with
    parallel=False whole on every rank."""

    def __init__(self, hidden: int, intermediate: int, quant: str | None = None, block=(128, 128),
                 name: str = "mlp", reduce: bool = True, parallel: bool = True):
        super().__init__()
        self.gate_up_proj = MergedColumnLinear(
            hidden, [LinearPart("gate_proj", intermediate), LinearPart("up_proj", intermediate)], quant=quant,
            block=block, name=f"{name}.gate_up_proj", parallel=parallel)
        (_, self.local_intermediate), (self.up_offset, _) = self.gate_up_proj.part_rows
        self.down_proj = row_parallel(intermediate, hidden, quant=quant, block=block, name=f"{name}.down_proj",
                                      reduce=reduce, parallel=parallel)

    @property
    def fp8_input_group(self) -> int:
        return self.gate_up_proj.fp8_input_group

    def forward(self, x: torch.Tensor, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x, x_fp8), self.local_intermediate, self.up_offset))


class Router(nn.Module):
    """Router logits, then the fused top-k selection (kernels/routing.py).

    DeepSeek's gate runs in fp32 (transformers casts input and weight every call): the weight is
    kept in fp32 from loading on, and the logits kernel (kernels/router_gemm.py) upcasts the
    activations in registers. Qwen3's gate runs in the model dtype."""

    def __init__(self, cfg: ModelConfig, num_fused_shared: int = 0):
        super().__init__()
        # num_fused_shared: append the shared experts' slots E..E+S-1 (weight 1.0) to every row
        self.routing = dataclasses.replace(RoutingConfig.from_model(cfg), num_fused_shared=num_fused_shared)
        self.fp32 = cfg.arch != "qwen3_moe"
        dtype = torch.float32 if self.fp32 else None
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size, dtype=dtype),
                                   requires_grad=False)
        if cfg.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts, dtype=torch.float32),
                                                        requires_grad=False)
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = router_logits(x, self.weight) if self.fp32 else F.linear(x, self.weight)
        return select_experts(logits, self.routing, self.e_score_correction_bias)


class Experts(nn.Module):
    """Stacked routed-expert weights; FP8 with per-expert 128x128 block scales when quantized.

    slot_experts[s]: the logical expert held in slot s (all experts in order on one rank; this
    rank's share under expert parallelism, where the loader fills each slot from its expert).
    num_shared: the shared experts fused in as slots E..E+S-1 after the routed ones (ep == 1 only;
    the loader fills them from the checkpoint's shared MLP); slot_experts lists the routed slots.
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, quant: str | None, block=(128, 128),
                 num_shared: int = 0):
        super().__init__()
        ep = get_parallel_state()
        self.ep_runtime = ep.ep_runtime if ep is not None else None
        self.slot_experts = (self.ep_runtime.local_slot_experts() if self.ep_runtime is not None
                             else list(range(num_experts)))
        if num_shared and self.ep_runtime is not None:
            raise ValueError("shared experts are fused into the routed experts' slots only without expert parallelism")
        self.num_shared = num_shared
        num_slots = len(self.slot_experts) + num_shared
        self.block = tuple(block)
        # FP8 gate|up stacking keeps each half's blocks aligned only if I is a multiple of the block.
        self.quant = quant if quant == "fp8" and intermediate % block[0] == 0 else None
        tp, tp_rank, _ = tp_world()
        if self.ep_runtime is not None:  # expert parallel: whole experts, whatever tp is
            tp, tp_rank = 1, 0
        full = intermediate
        if tp > 1:  # this rank's slice of every expert's intermediate dimension
            if intermediate % tp:
                raise ValueError(f"experts: moe_intermediate_size {intermediate} does not split over tp={tp}")
            intermediate //= tp
            if self.quant and intermediate % block[0]:
                raise ValueError(f"experts: moe_intermediate_size {full} split over tp={tp} gives {intermediate} per "
                                 f"rank, not a multiple of the FP8 weight block {block[0]}")
        self.num_experts, self.hidden, self.intermediate = len(self.slot_experts), hidden, intermediate
        dtype = FP8_DTYPE if self.quant else None
        self.w13 = nn.Parameter(torch.empty(num_slots, 2 * intermediate, hidden, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_slots, hidden, intermediate, dtype=dtype), requires_grad=False)
        if self.quant:
            bn, bk = block
            self.w13_scale = nn.Parameter(torch.empty(num_slots, _ceil_div(2 * intermediate, bn),
                                                      _ceil_div(hidden, bk)), requires_grad=False)
            self.w2_scale = nn.Parameter(torch.empty(num_slots, _ceil_div(hidden, bn), _ceil_div(intermediate, bk)),
                                         requires_grad=False)
        else:
            self.w13_scale = self.w2_scale = None
        if tp > 1:
            lo = tp_rank * intermediate
            _shard(self.w13, 1, ((lo, intermediate), (full + lo, intermediate)), 2 * full)
            _shard(self.w2, 2, ((lo, intermediate),), full)
            if self.quant:
                bn, bk = block
                self.w13_scale.tp_shard = self.w13.tp_shard.in_blocks(
                    bn, (num_slots, _ceil_div(2 * full, bn), _ceil_div(hidden, bk)))
                self.w2_scale.tp_shard = self.w2.tp_shard.in_blocks(
                    bk, (num_slots, _ceil_div(hidden, bn), _ceil_div(full, bk)))
        self.ep = None
        if self.ep_runtime is not None:
            self.ep = self.ep_runtime.register(self.w13, self.w2, self.w13_scale, self.w2_scale, self.block)
        self.w_tile_n = 0  # > 0 once tile_for_kernels has put w13 and w2 in fused_moe.tile_weights' layout

    def tile_for_kernels(self) -> None:
        """After loading: FP8 experts that the Triton fused MoE runs go into its tiled layout
        (moe_config.FP8_WEIGHT_TILE_ROWS; fused_moe.tile_weights), an expert at a time so the copy
        is one expert's bytes. Not under expert parallelism (its paths read the row-major stacks)."""
        tile_n = moe_config.FP8_WEIGHT_TILE_ROWS
        if (self.w_tile_n or not self.quant or self.ep is not None or not triton_runs_on(self.w13)
                or not can_tile_weights(self.w13, self.w2, tile_n, self.block)):
            return
        for w in (self.w13, self.w2):
            for e in range(w.shape[0]):
                w.data[e] = tile_weights(w.data[e], tile_n, self.block[1])
        self.w_tile_n = tile_n

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                row_offset: int = 0, addend: torch.Tensor | None = None,
                x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None, sum_rows: bool = True):
        """The routed experts' weighted sum (with the fused shared slots when the routing names
        them), plus `addend` (an unfused shared MLP's output) if given. x_fp8: x quantized per
        1 x block[1] (FP8 experts on this rank only; the expert-parallel path quantizes for the wire).
        sum_rows False: where the fused MoE runs its Triton kernels, its rows before the sum
        (fused_moe.ExpertRows) for the RMSNorm after the layer to sum."""
        if self.ep is not None:
            out = self.ep(x, topk_ids, topk_weights, row_offset)
            return out if addend is None else out + addend
        return fused_moe(x, self.w13, self.w2, topk_weights, topk_ids, self.w13_scale, self.w2_scale, self.block,
                         addend=addend, num_fused_shared=self.num_shared, x_fp8=x_fp8, sum_rows=sum_rows,
                         w_tile_n=self.w_tile_n)


def fuses_shared_experts(cfg: ModelConfig, quant: str | None) -> bool:
    """Whether MoE(cfg, quant) built now runs its shared experts as slots of the routed experts:
    asked for (cfg.fuse_shared_experts), shared experts present, no expert parallelism (an
    EPRuntime in this rank's ParallelState), and each of the S I-slices of the shared FP8 weights
    owns whole scale blocks where the experts keep FP8 (always for DeepSeek: I % 128 == 0)."""
    state = get_parallel_state()
    if not (cfg.fuse_shared_experts and cfg.n_shared_experts) or (state is not None and state.ep_runtime is not None):
        return False
    bn, bk = cfg.weight_block_size
    inter = cfg.moe_intermediate_size
    experts_fp8 = quant == "fp8" and inter % bn == 0  # as Experts decides
    return not experts_fp8 or inter % bk == 0


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: str | None = None):
        super().__init__()
        block = cfg.weight_block_size
        self.num_fused_shared = cfg.n_shared_experts if fuses_shared_experts(cfg, quant) else 0
        self.gate = Router(cfg, self.num_fused_shared)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, quant, block,
                               num_shared=self.num_fused_shared)
        self.tp, self.tp_rank, tp_group = tp_world()
        # TP inside EP: this rank takes its share of the rows through the block, then all_gather.
        self.token_shares = self.tp > 1 and self.experts.ep_runtime is not None
        self.tp_group = tp_group if self.tp > 1 else None
        # Shared experts under token shares: replicated (whole weights on every TP rank), run on
        # the rank's own share. Sharding them instead would need every row on every rank and one
        # more all_reduce per layer; replicated they cost no communication (the gather of the routed
        # output carries them) and 1/tp of the FLOPs, for tp copies of small weights (one or two
        # experts' worth per layer against E / (dp * tp) routed experts per rank).
        # Fused (num_fused_shared): no module of their own, they are slots of self.experts.
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, quant, block,
                                   name="shared_experts", reduce=self.tp_group is None, parallel=not self.token_shares)
                               if cfg.n_shared_experts and not self.num_fused_shared else None)

    @property
    def fp8_input_group(self) -> int:
        """FP8 experts on this rank take x quantized per 1 x block[1] from the norm before
        (forward's x_fp8); under expert parallelism x travels to other ranks unquantized: 0."""
        return self.experts.block[1] if self.experts.quant and self.experts.ep is None else 0

    def forward(self, x: torch.Tensor, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
                sum_rows: bool = True):
        """sum_rows False: the output may be the fused MoE's rows before their sum (fused_moe.ExpertRows),
        for an RMSNorm to sum (DecoderLayer's next norm); only without tensor parallelism, whose
        collectives need the sum."""
        if self.token_shares:
            num_rows = x.shape[0]
            start, rows = row_share(num_rows, self.tp, self.tp_rank)
            out = self._block(x[start:start + rows], start)
            return gather_shares(out, num_rows, self.tp, self.tp_group)
        out = self._block(x, x_fp8=x_fp8, sum_rows=sum_rows or self.tp_group is not None)
        if self.tp_group is not None:  # routed + shared partial sums, one all_reduce
            dist.all_reduce(out, group=self.tp_group)
        return out

    def _block(self, x: torch.Tensor, row_offset: int = 0,
               x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None, sum_rows: bool = True):
        topk_weights, topk_ids = self.gate(x)  # [T, k + num_fused_shared]
        shared = None  # a TP rank's share may be empty (FP8 GEMMs need rows)
        if self.shared_experts is not None and x.shape[0]:
            shared = self.shared_experts(x, x_fp8)  # same weight format and block as the experts
        return self.experts(x, topk_weights, topk_ids, row_offset, addend=shared, x_fp8=x_fp8,  # the sum adds it
                            sum_rows=sum_rows)
