"""Expert-parallel routed experts: dispatch the local tokens, run this rank's expert slots, combine.

Given the router's (topk_ids, topk_weights) for this rank's tokens and the weights of this
rank's physical slots (w13 [S_local, 2I, H], w2 [S_local, H, I], FP8 scales alike), forward
returns the routed experts' weighted output for the local tokens, as the single-rank
fused_moe over all experts would. Shared experts are not communicated: the caller adds them.

Each forward also adds its per-expert token counts (logical ids, (token, expert) pairs) to the
balancer if one is attached; apply_placement moves expert weights to a new placement.
"""

from __future__ import annotations

import torch
from torch import nn

from moeserve.distributed.dispatch import Dispatcher, Placement, RoutingTable
from moeserve.distributed.eplb import Balancer, move_expert_weights
from moeserve.kernels.fused_moe import fused_moe


def expert_counts(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, k] logical ids (< 0: none) -> [E] int64 (token, expert) pairs; no host sync."""
    ids = torch.where(topk_ids >= 0, topk_ids, num_experts).reshape(-1)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=topk_ids.device)
    counts.scatter_add_(0, ids, torch.ones_like(ids))
    return counts[:num_experts]


class ExpertParallelMoE(nn.Module):
    def __init__(self, dispatcher: Dispatcher, placement: Placement, w13: torch.Tensor, w2: torch.Tensor,
                 w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                 block: tuple[int, int] = (128, 128), balancer: Balancer | None = None, layer: int = 0):
        super().__init__()
        spr = placement.slots_per_rank
        if w13.shape[0] != spr or w2.shape[0] != spr:
            raise ValueError(f"this rank holds {spr} expert slots; got w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
        self.dispatcher = dispatcher
        self.placement = placement
        self.table = RoutingTable(placement, w13.device)
        self.w13, self.w2, self.w13_scale, self.w2_scale = w13, w2, w13_scale, w2_scale
        self.block = tuple(block)
        self.balancer, self.layer = balancer, layer

    @property
    def rank(self) -> int:
        return self.dispatcher.rank

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        if self.balancer is not None:
            self.balancer.record(expert_counts(topk_ids, self.placement.num_experts), self.layer)
        recv_x, recv_ids, recv_w, handle = self.dispatcher.dispatch(x, topk_ids, topk_weights, self.table)
        out = fused_moe(recv_x, self.w13, self.w2, recv_w, recv_ids, self.w13_scale, self.w2_scale, self.block)
        return self.dispatcher.combine(out, handle)

    def expert_weights(self) -> list[torch.Tensor]:
        return [t for t in (self.w13, self.w2, self.w13_scale, self.w2_scale) if t is not None]

    @torch.no_grad()
    def apply_placement(self, new: Placement) -> int:
        """Move expert weights to `new` (collective over the EP group; call between steps on
        every rank). Tensors are updated in place. Returns the bytes this rank received."""
        moved = move_expert_weights(self.expert_weights(), self.placement, new, self.dispatcher.group, self.rank)
        self.placement = new
        self.table.load(new)
        return moved
