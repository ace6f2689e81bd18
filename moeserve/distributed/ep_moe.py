"""Expert-parallel routed experts: dispatch the local tokens, run this rank's expert slots, combine.

Given the router's (topk_ids, topk_weights) for this rank's tokens and the weights of this
rank's physical slots (w13 [S_local, 2I, H], w2 [S_local, H, I], FP8 scales alike), forward
returns the routed experts' weighted output for the local tokens, as the single-rank
fused_moe over all experts would. Shared experts are not communicated: the caller adds them.

Each forward also adds its per-expert token counts (logical ids, (token, expert) pairs) to the
balancer if one is attached; apply_placement moves expert weights to a new placement.

Inside a tensor-parallel group (tp > 1 with ep = dp * tp) all tp ranks hold the same hidden
states after attention; so that no token travels tp times, each rank takes only its share of
the rows (`row_share`: consecutive rows, the remainder to the first ranks, possibly none) through
the MoE block, and `gather_shares` (one all_gather over the TP group) rebuilds every row on every
rank. Each token is then dispatched, computed and counted by the balancer exactly once.

Under the engine, rows past the step's real token count (the padding of a CUDA-graph batch, the
one-token dummy batch of a rank with no requests) route to no expert: they are not sent, not
computed and not counted, so they neither cost wire bytes in the high-throughput path nor skew
the balancer towards the experts that token id 0 happens to pick.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from moeserve.distributed.dispatch import Dispatcher, Placement, RoutingTable
from moeserve.distributed.eplb import Balancer, move_expert_weights
from moeserve.distributed.peer_memory import DEFAULT_TIMEOUT_S
from moeserve.kernels.fused_moe import fused_moe, takes_fp8_input
from moeserve.kernels.wire_codecs import FP8_GROUP


def expert_counts(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, k] logical ids (< 0: none) -> [E] int64 (token, expert) pairs; no host sync."""
    ids = torch.where(topk_ids >= 0, topk_ids, num_experts).reshape(-1)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=topk_ids.device)
    counts.scatter_add_(0, ids, torch.ones_like(ids))
    return counts[:num_experts]


def row_share(num_rows: int, tp: int, tp_rank: int) -> tuple[int, int]:
    """(first row, rows) of TP rank tp_rank's share of num_rows: num_rows // tp each, the first
    num_rows % tp ranks one more."""
    base, extra = divmod(num_rows, tp)
    return tp_rank * base + min(tp_rank, extra), base + (tp_rank < extra)


def gather_shares(share: torch.Tensor, num_rows: int, tp: int, group) -> torch.Tensor:
    """Every TP rank's share [rows_r, H] -> all num_rows rows [num_rows, H] on every rank (one
    equal-size all_gather: shares are padded to the largest, ceil(num_rows / tp) rows)."""
    if tp == 1:
        return share
    if num_rows == 0:  # every rank of the group knows the row count: all skip alike
        return share.new_empty(0, *share.shape[1:])
    most = -(-num_rows // tp)
    if share.shape[0] < most:
        share = torch.cat([share, share.new_zeros(most - share.shape[0], *share.shape[1:])])
    full = share.new_empty(tp * most, *share.shape[1:])
    dist.all_gather_into_tensor(full, share.contiguous(), group=group)
    if num_rows % tp == 0:
        return full
    return torch.cat([full[r * most:r * most + row_share(num_rows, tp, r)[1]] for r in range(tp)])


class ExpertParallelMoE:
    """Not an nn.Module: the weights belong to the model's Experts module, this only routes."""

    def __init__(self, dispatcher: Dispatcher, placement: Placement, w13: torch.Tensor, w2: torch.Tensor,
                 w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                 block: tuple[int, int] = (128, 128), balancer: Balancer | None = None, layer: int = 0,
                 valid_tokens: torch.Tensor | None = None):
        spr = placement.slots_per_rank
        if w13.shape[0] != spr or w2.shape[0] != spr:
            raise ValueError(f"this rank holds {spr} expert slots; got w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
        self.dispatcher = dispatcher
        self.placement = placement
        self.table = RoutingTable(placement, w13.device)
        self.w13, self.w2, self.w13_scale, self.w2_scale = w13, w2, w13_scale, w2_scale
        self.block = tuple(block)
        self.balancer, self.layer = balancer, layer
        self.valid_tokens = valid_tokens  # [1] int64 on the device: rows at or past it are padding
        self._fp8_input: dict = {}  # (dtype, device) -> takes_fp8_input's answer

    @property
    def rank(self) -> int:
        return self.dispatcher.rank

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 row_offset: int = 0) -> torch.Tensor:
        return self.forward(x, topk_ids, topk_weights, row_offset)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                row_offset: int = 0) -> torch.Tensor:
        """row_offset: where x's rows start in the step's batch (a TP rank's share starts past row 0)."""
        if self.valid_tokens is not None:  # a device-side compare: no host sync, graph-capturable
            rows = torch.arange(row_offset, row_offset + topk_ids.shape[0], device=topk_ids.device)
            topk_ids = torch.where((rows < self.valid_tokens)[:, None], topk_ids, -1)
        if self.balancer is not None:
            self.balancer.record(expert_counts(topk_ids, self.placement.num_experts), self.layer)
        fp8_in = self.takes_fp8_groups(x)
        recv_x, recv_ids, recv_w, handle = self.dispatcher.dispatch(x, topk_ids, topk_weights, self.table,
                                                                    fp8_groups=fp8_in)
        out = fused_moe(None if fp8_in else recv_x, self.w13, self.w2, recv_w, recv_ids, self.w13_scale,
                        self.w2_scale, self.block, x_fp8=recv_x if fp8_in else None, out_dtype=x.dtype)
        return self.dispatcher.combine(out, handle)

    def takes_fp8_groups(self, x: torch.Tensor) -> bool:
        """Whether this layer's experts take the received rows as FP8 groups (FP8 experts on fused_moe's
        W8A8 path): an fp8 payload as it arrived (it is their own activation quantization), others
        decoded straight into it (no bf16 copy, no quant launch). Decided once per dtype and device."""
        key = (x.dtype, x.device)
        if key not in self._fp8_input:
            self._fp8_input[key] = self.block[1] == FP8_GROUP and takes_fp8_input(
                x, self.w13, self.w2, self.w13_scale, self.w2_scale, self.block)
        return self._fp8_input[key]

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


class EPRuntime:
    """A rank's expert-parallel machinery, shared by its MoE layers: one Dispatcher (one wire
    format and one backend choice per step), each layer's ExpertParallelMoE, and the balancer.

    Layers call `register` while the model is built; the engine calls `begin_step` before every
    forward (with the max tokens per data-parallel group it already agreed on) and `after_step`
    after it. tp: ranks per tensor-parallel group, each of which dispatches 1/tp of the group's rows.
    """

    def __init__(self, group, num_ranks: int, num_experts: int, hidden: int, dtype: torch.dtype,
                 device: torch.device, dispatch_codec: str = "none", combine_codec: str = "none",
                 mode: str | None = None, threshold: int = 128, ll_capacity: int | None = None,
                 num_redundant: int = 0, eplb_interval: int = 0, eplb_window: int = 1000, tp: int = 1,
                 eplb_layout: tuple[int, int] = (1, 1), ll_transport: str | None = None,
                 peer_timeout_s: float = DEFAULT_TIMEOUT_S):
        if (num_experts + num_redundant) % num_ranks:
            raise ValueError(f"{num_experts} experts + {num_redundant} redundant slots do not split evenly over "
                             f"{num_ranks} expert-parallel ranks; choose --num-redundant-experts to make them")
        self.placement = Placement.contiguous(num_experts, num_ranks, num_redundant)
        self.dispatcher = Dispatcher(group, self.placement, hidden, dtype, dispatch_codec, combine_codec, mode,
                                     threshold, ll_capacity, device, ll_transport=ll_transport,
                                     peer_timeout_s=peer_timeout_s)
        self.group, self.device, self.tp = group, device, tp
        self.eplb_interval, self.eplb_window = eplb_interval, eplb_window
        self.eplb_nodes, self.eplb_groups = eplb_layout  # hierarchical balancing over nodes (engine/dp.py)
        self.layers: list[ExpertParallelMoE] = []
        self.balancer: Balancer | None = None
        self.num_rebalances = 0
        self.bytes_moved = 0  # expert weight bytes this rank received in rebalances
        self.steps = 0
        # This step's real token count (begin_step); a fixed buffer, so CUDA graphs read the new value.
        self.valid_tokens = torch.full((1,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)

    @property
    def rank(self) -> int:
        return self.dispatcher.rank

    def local_slot_experts(self) -> list[int]:
        """The logical expert in each of this rank's slots (at start-up: the contiguous placement)."""
        spr = self.placement.slots_per_rank
        return self.placement.slot_expert[self.rank * spr:(self.rank + 1) * spr].tolist()

    def register(self, w13, w2, w13_scale=None, w2_scale=None, block=(128, 128)) -> ExpertParallelMoE:
        layer = ExpertParallelMoE(self.dispatcher, self.placement, w13, w2, w13_scale, w2_scale, block,
                                  layer=len(self.layers), valid_tokens=self.valid_tokens)
        self.layers.append(layer)
        return layer

    def start(self) -> None:
        """After the model is built, before any CUDA graph is captured (the graphs must capture
        the balancer's counting, whose buffers stay put from here on)."""
        if self.balancer is None and self.eplb_interval and self.layers:
            self.balancer = Balancer([layer.placement for layer in self.layers], self.group, self.eplb_window,
                                     self.eplb_interval, self.eplb_nodes, self.eplb_groups, device=self.device)
            for layer in self.layers:
                layer.balancer = self.balancer

    def graph_capacity(self) -> int:
        """Largest decode batch a CUDA graph may hold: graphs run the low-latency kernel, whose
        fixed buffers hold ll_capacity tokens per rank, and each of a TP group's ranks dispatches
        1/tp of the batch. 0: graphs impossible (forced ht)."""
        return 0 if self.dispatcher.mode == "ht" else self.dispatcher.ll_capacity * self.tp

    def min_over_ranks(self, value: int) -> int:
        """The smallest value any rank of the group holds (an all_reduce, a host sync)."""
        return -self.dispatcher.max_over_ranks(-value)

    def begin_step(self, num_tokens: int, global_max: int) -> str:
        """num_tokens: this group's real tokens this step (0 for a dummy batch); rows past it are
        padding. global_max: the most tokens any group runs; the backend follows the most rows
        any rank dispatches, its share of that: ceil(global_max / tp)."""
        self.start()
        self.valid_tokens.fill_(num_tokens)
        return self.dispatcher.begin_step(-(-num_tokens // self.tp), -(-global_max // self.tp))

    @torch.no_grad()
    def after_step(self) -> bool:
        """Every rank, after every forward: close the step's expert counts; every eplb_interval
        steps move the experts to a new placement (a collective). True if experts moved. Raises
        if the peer transport's barrier timed out (a peer rank died or hung)."""
        self.dispatcher.check_transport()
        self.steps += 1
        if self.balancer is None:
            return False
        new = self.balancer.maybe_rebalance(self.steps)
        if new is None:
            return False
        for layer, placement in zip(self.layers, new):
            self.bytes_moved += layer.apply_placement(placement)
        self.num_rebalances += 1
        return True
