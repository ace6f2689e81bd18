"""DeepSeekMoE / Qwen3-MoE block: router, routed experts, shared experts; and the dense MLP.

Routing (all in fp32):
- softmax scoring (DeepSeek-V2, Qwen3): greedy top-k, or group_limited_greedy (keep the
  topk_group groups with the highest max score, then top-k inside them);
- sigmoid scoring with e_score_correction_bias (DeepSeek-V3 noaux_tc): the bias only chooses
  experts (groups ranked by the sum of their top-2 biased scores); weights are the unbiased
  sigmoid scores, optionally renormalised, times routed_scaling_factor.
Routed experts are stacked ([E, 2I, H] gate|up, [E, H, I] down) and run by the fused MoE kernel.
Under expert parallelism (a rank's ParallelState carries an EPRuntime) a rank stacks only its
own expert slots, and the routed tokens travel to the ranks that hold their experts and back;
the router and the shared experts always run on the token's own rank.
Under tensor parallelism (ep == 1) every rank holds every expert's slice of the intermediate
dimension (w13 [E, 2I/tp, H], w2 [E, H, I/tp]) and the shared experts likewise; the routed and
shared partial sums are added and summed over the TP group in one all_reduce.
Under both (tp > 1 inside ep = dp * tp) experts are whole and spread over all ranks; each TP rank
runs the whole block (router, routed and shared experts) on its share of the rows only, and one
all_gather over the TP group gives every rank every row (distributed/ep_moe.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moeserve.config import ModelConfig
from moeserve.distributed.ep_moe import gather_shares, row_share
from moeserve.distributed.groups import get_parallel_state
from moeserve.kernels.fp8 import FP8_DTYPE
from moeserve.kernels.fused_moe import fused_moe
from moeserve.layers.linear import _ceil_div, _shard, column_parallel, row_parallel, tp_world


class MLP(nn.Module):
    """SiLU-gated MLP (dense layers and shared experts). Tensor parallel: gate/up column-parallel,
    down row-parallel (summed over the TP group unless reduce=False: the caller sums); with
    parallel=False whole on every rank."""

    def __init__(self, hidden: int, intermediate: int, quant: str | None = None, block=(128, 128),
                 name: str = "mlp", reduce: bool = True, parallel: bool = True):
        super().__init__()
        tp = dict(quant=quant, block=block, parallel=parallel)
        self.gate_proj = column_parallel(hidden, intermediate, name=f"{name}.gate_proj", **tp)
        self.up_proj = column_parallel(hidden, intermediate, name=f"{name}.up_proj", **tp)
        self.down_proj = row_parallel(intermediate, hidden, name=f"{name}.down_proj", reduce=reduce, **tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def select_experts(router_logits: torch.Tensor, top_k: int, scoring: str, topk_method: str, n_group: int,
                   topk_group: int, norm_topk_prob: bool, routed_scaling_factor: float,
                   correction_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (topk_weights [T, k] fp32, topk_ids [T, k] int64)."""
    logits = router_logits.to(torch.float32)
    num_experts = logits.shape[-1]
    if scoring == "sigmoid":
        scores = logits.sigmoid()
    else:
        scores = logits.softmax(dim=-1)
    choice = scores if correction_bias is None else scores + correction_bias.to(torch.float32)
    if topk_method in ("group_limited_greedy", "noaux_tc") and n_group > 1:
        grouped = choice.view(-1, n_group, num_experts // n_group)
        if topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.max(dim=-1).values
        group_idx = group_scores.topk(topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, num_experts).bool()
        # V3 masks unchosen groups with -inf; V2 with 0 (all its scores are positive softmax values).
        choice = choice.masked_fill(~expert_mask, float("-inf") if topk_method == "noaux_tc" else 0.0)
    topk_ids = choice.topk(top_k, dim=-1, sorted=False).indices
    topk_weights = scores.gather(1, topk_ids)
    if norm_topk_prob:
        denom = topk_weights.sum(dim=-1, keepdim=True)
        topk_weights = topk_weights / (denom + 1e-20 if scoring == "sigmoid" else denom)
    return topk_weights * routed_scaling_factor, topk_ids


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size), requires_grad=False)
        if cfg.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts, dtype=torch.float32),
                                                        requires_grad=False)
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        if cfg.arch == "qwen3_moe":
            logits = F.linear(x, self.weight)  # transformers' Qwen3 gate runs in the model dtype
        else:
            logits = F.linear(x.to(torch.float32), self.weight.to(torch.float32))
        return select_experts(logits, cfg.num_experts_per_tok, cfg.scoring_func, cfg.topk_method, cfg.n_group,
                              cfg.topk_group, cfg.norm_topk_prob, cfg.routed_scaling_factor,
                              self.e_score_correction_bias)


class Experts(nn.Module):
    """Stacked routed-expert weights; FP8 with per-expert 128x128 block scales when quantized.

    slot_experts[s]: the logical expert held in slot s (all experts in order on one rank; this
    rank's share under expert parallelism, where the loader fills each slot from its expert).
    """

    def __init__(self, num_experts: int, hidden: int, intermediate: int, quant: str | None, block=(128, 128)):
        super().__init__()
        ep = get_parallel_state()
        self.ep_runtime = ep.ep_runtime if ep is not None else None
        self.slot_experts = (self.ep_runtime.local_slot_experts() if self.ep_runtime is not None
                             else list(range(num_experts)))
        num_experts = len(self.slot_experts)
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
        self.num_experts, self.hidden, self.intermediate = num_experts, hidden, intermediate
        dtype = FP8_DTYPE if self.quant else None
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, intermediate, dtype=dtype), requires_grad=False)
        if self.quant:
            bn, bk = block
            self.w13_scale = nn.Parameter(torch.empty(num_experts, _ceil_div(2 * intermediate, bn),
                                                      _ceil_div(hidden, bk)), requires_grad=False)
            self.w2_scale = nn.Parameter(torch.empty(num_experts, _ceil_div(hidden, bn), _ceil_div(intermediate, bk)),
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
                    bn, (num_experts, _ceil_div(2 * full, bn), _ceil_div(hidden, bk)))
                self.w2_scale.tp_shard = self.w2.tp_shard.in_blocks(
                    bk, (num_experts, _ceil_div(hidden, bn), _ceil_div(full, bk)))
        self.ep = None
        if self.ep_runtime is not None:
            self.ep = self.ep_runtime.register(self.w13, self.w2, self.w13_scale, self.w2_scale, self.block)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                row_offset: int = 0) -> torch.Tensor:
        if self.ep is not None:
            return self.ep(x, topk_ids, topk_weights, row_offset)
        return fused_moe(x, self.w13, self.w2, topk_weights, topk_ids, self.w13_scale, self.w2_scale, self.block)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: str | None = None):
        super().__init__()
        block = cfg.weight_block_size
        self.gate = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, quant, block)
        self.tp, self.tp_rank, tp_group = tp_world()
        # TP inside EP: this rank takes its share of the rows through the block, then all_gather.
        self.token_shares = self.tp > 1 and self.experts.ep_runtime is not None
        self.tp_group = tp_group if self.tp > 1 else None
        # Shared experts under token shares: replicated (whole weights on every TP rank), run on
        # the rank's own share. Sharding them instead would need every row on every rank and one
        # more all_reduce per layer; replicated they cost no communication (the gather of the routed
        # output carries them) and 1/tp of the FLOPs, for tp copies of small weights (one or two
        # experts' worth per layer against E / (dp * tp) routed experts per rank).
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, quant, block,
                                   name="shared_experts", reduce=self.tp_group is None, parallel=not self.token_shares)
                               if cfg.n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_shares:
            num_rows = x.shape[0]
            start, rows = row_share(num_rows, self.tp, self.tp_rank)
            out = self._block(x[start:start + rows], start)
            return gather_shares(out, num_rows, self.tp, self.tp_group)
        out = self._block(x)
        if self.tp_group is not None:  # routed + shared partial sums, one all_reduce
            dist.all_reduce(out, group=self.tp_group)
        return out

    def _block(self, x: torch.Tensor, row_offset: int = 0) -> torch.Tensor:
        topk_weights, topk_ids = self.gate(x)
        out = self.experts(x, topk_weights, topk_ids, row_offset)
        if self.shared_experts is not None and x.shape[0]:  # a TP rank's share may be empty (FP8 GEMMs need rows)
            out = out + self.shared_experts(x)
        return out
