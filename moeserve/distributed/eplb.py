"""Expert-parallel load balancing, after DeepSeek's EPLB.

From each logical expert's load (tokens routed to it over a sliding window of steps):
1. replicate: give the spare slots, one at a time, to the expert with the highest load per replica;
2. pack: place the replicas (weight = load / replicas) on ranks, heaviest first, each on the
   least-loaded rank that has a free slot (and no replica of the same expert, when possible);
3. keep weights still: new rank bins are matched to the old ranks with the most experts in common,
   and an expert a rank keeps stays in its slot, so few weights move.
Hierarchical mode (num_nodes > 1) first packs expert groups onto nodes, then does 1-3 inside
each node, so replicas and group-limited routing stay within a node; the nodes' new group sets
are matched to the old nodes first, so weights cross nodes only for groups that really move.

All ranks compute the same placement: the load is summed over the EP group (all_reduce of
integer counts) and every step below is deterministic.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moeserve.distributed.dispatch import Placement

# ----------------------------------------------------------------------------- the algorithm


def replicate_experts(load: list[float], num_slots: int, max_replicas: int | None = None) -> list[int]:
    """Replica count per expert: one each, then each spare slot to the highest load per replica.

    max_replicas (the number of ranks): more replicas than ranks would share a rank and not help.
    """
    counts = [1] * len(load)
    for _ in range(num_slots - len(load)):
        open_ = [e for e in range(len(load)) if max_replicas is None or counts[e] < max_replicas]
        hottest = max(open_ or range(len(load)), key=lambda e: (load[e] / counts[e], -e))
        counts[hottest] += 1
    return counts


def pack_replicas(load: list[float], counts: list[int], experts: list[int], num_bins: int,
                  bin_size: int) -> list[list[int]]:
    """Balanced packing of the replicas of `experts` into num_bins bins of bin_size slots each."""
    items = [(load[e] / counts[e], e) for e in experts for _ in range(counts[e])]
    items.sort(key=lambda item: (-item[0], item[1]))
    bins: list[list[int]] = [[] for _ in range(num_bins)]
    totals = [0.0] * num_bins
    for weight, e in items:
        free = [b for b in range(num_bins) if len(bins[b]) < bin_size]
        fresh = [b for b in free if e not in bins[b]] or free
        b = min(fresh, key=lambda i: (totals[i], i))
        bins[b].append(e)
        totals[b] += weight
    return bins


def pack_groups(load: list[float], num_groups: int, num_nodes: int) -> list[list[int]]:
    """Expert groups (consecutive ids) -> nodes, num_groups / num_nodes groups per node, balanced."""
    size = len(load) // num_groups
    group_load = [sum(load[g * size:(g + 1) * size]) for g in range(num_groups)]
    nodes = pack_replicas(group_load, [1] * num_groups, list(range(num_groups)), num_nodes, num_groups // num_nodes)
    return [[e for g in sorted(groups) for e in range(g * size, (g + 1) * size)] for groups in nodes]


def _match_sets(new: list[set[int]], old: list[set[int]]) -> list[int]:
    """Where each new set goes among the old ones' places: greedy, largest overlap first (ties:
    lower new, then lower old), so a place keeps as much of what it held as it can."""
    pairs = sorted((-len(a & b), i, j) for i, a in enumerate(new) for j, b in enumerate(old))
    place: dict[int, int] = {}
    for _, i, j in pairs:
        if i not in place and j not in place.values():
            place[i] = j
    return [place[i] for i in range(len(new))]


def _match_bins(bins: list[list[int]], old_sets: list[list[int]]) -> list[list[int]]:
    """Order bins over the ranks whose old experts are old_sets, so each rank keeps as many of
    its experts as possible, and put a kept expert back in its old local slot."""
    ordered: list[list[int]] = [[] for _ in bins]
    for i, r in enumerate(_match_sets([set(b) for b in bins], [set(o) for o in old_sets])):
        slots: list[int | None] = [None] * len(bins[i])
        rest = list(bins[i])
        for j, e in enumerate(old_sets[r]):
            if e in rest:
                slots[j] = e
                rest.remove(e)
        ordered[r] = [e if e is not None else rest.pop(0) for e in slots]
    return ordered


def rebalance(load: torch.Tensor, old: Placement, num_nodes: int = 1, num_groups: int = 1) -> Placement:
    """A new placement with old's shape (experts, slots, ranks) that evens out per-rank load
    (old itself when the new one would not be more even)."""
    load_list = [float(v) for v in load.tolist()]
    num_ranks, spr = old.num_ranks, old.slots_per_rank
    old_sets = [old.rank_experts(r) for r in range(num_ranks)]
    if num_nodes > 1:
        if num_ranks % num_nodes or num_groups % num_nodes or len(load_list) % num_groups:
            raise ValueError("hierarchical EPLB needs ranks and expert groups divisible by nodes")
        rpn = num_ranks // num_nodes
        node_experts = pack_groups(load_list, num_groups, num_nodes)
        # Each node's new groups go to the node that held most of them: weights cross nodes only
        # for groups that really move.
        old_nodes = [set().union(*old_sets[n * rpn:(n + 1) * rpn]) for n in range(num_nodes)]
        bins = [[] for _ in range(num_ranks)]
        for experts, n in zip(node_experts, _match_sets([set(x) for x in node_experts], old_nodes)):
            sub = [load_list[e] for e in experts]
            counts = replicate_experts(sub, rpn * spr, rpn)
            node_bins = [[experts[i] for i in b] for b in pack_replicas(sub, counts, list(range(len(experts))), rpn,
                                                                         spr)]
            bins[n * rpn:(n + 1) * rpn] = _match_bins(node_bins, old_sets[n * rpn:(n + 1) * rpn])
    else:
        counts = replicate_experts(load_list, old.num_slots, num_ranks)
        bins = pack_replicas(load_list, counts, list(range(len(load_list))), num_ranks, spr)
        bins = _match_bins(bins, old_sets)
    new = Placement(torch.tensor([e for b in bins for e in b]), old.num_experts, num_ranks)
    # Greedy packing is not optimal: never trade the current placement for a worse one.
    if imbalance(rank_loads(load, new)) >= imbalance(rank_loads(load, old)) and num_nodes == 1:
        return old
    return new


def rank_loads(load: torch.Tensor, placement: Placement) -> torch.Tensor:
    """Expected load per rank when each expert's load splits evenly over its replicas."""
    per_slot = load.to(torch.float64)[placement.slot_expert] / placement.replica_count()[placement.slot_expert]
    return per_slot.view(placement.num_ranks, -1).sum(dim=1)


def imbalance(per_rank: torch.Tensor) -> float:
    """max / mean of a per-rank load (1.0 = perfectly even)."""
    per_rank = per_rank.to(torch.float64)
    return float(per_rank.max() / per_rank.mean().clamp(min=1e-12))


# ----------------------------------------------------------------------------- moving weights


def _transfer_plan(old: Placement, new: Placement) -> list[tuple[int, int, int, int]]:
    """(src rank, src local slot, dst rank, dst local slot) for every slot of `new`.
    A rank that already holds the expert copies locally; otherwise replicas take turns as source."""
    spr = old.slots_per_rank
    holders: dict[int, list[int]] = {}
    for slot, e in enumerate(old.slot_expert.tolist()):
        holders.setdefault(e, []).append(slot)
    plan = []
    for slot, e in enumerate(new.slot_expert.tolist()):
        dst = slot // spr
        local = [s for s in holders[e] if s // spr == dst]
        src = local[0] if local else holders[e][slot % len(holders[e])]
        plan.append((src // spr, src % spr, dst, slot % spr))
    return plan


def move_expert_weights(tensors: list[torch.Tensor], old: Placement, new: Placement,
                        group: dist.ProcessGroup | None, rank: int) -> int:
    """Rewrite this rank's expert tensors (each [slots_per_rank, ...]) in place for `new`.

    All tensors' bytes travel together in one variable-split all_to_all over the EP group.
    Returns the bytes received from other ranks.
    """
    spr = old.slots_per_rank
    packed = torch.cat([t.contiguous().view(torch.uint8).reshape(spr, -1) for t in tensors], dim=1)
    plan = _transfer_plan(old, new)
    sends = sorted((dst, dst_slot, src_slot) for src, src_slot, dst, dst_slot in plan if src == rank and dst != rank)
    recvs = sorted((src, dst_slot) for src, _, dst, dst_slot in plan if dst == rank and src != rank)
    fresh = packed.clone()
    for src, src_slot, dst, dst_slot in plan:
        if src == rank and dst == rank:
            fresh[dst_slot] = packed[src_slot]
    if group is not None:
        num_ranks = dist.get_world_size(group)
        send_rows = packed[torch.tensor([s for _, _, s in sends], dtype=torch.int64)]
        recv_rows = packed.new_empty(len(recvs), packed.shape[1])
        send_splits = [sum(1 for d, _, _ in sends if d == r) for r in range(num_ranks)]
        recv_splits = [sum(1 for s, _ in recvs if s == r) for r in range(num_ranks)]
        dist.all_to_all_single(recv_rows, send_rows, recv_splits, send_splits, group=group)
        if recvs:
            fresh[torch.tensor([slot for _, slot in recvs], dtype=torch.int64)] = recv_rows
    offset = 0
    for t in tensors:
        width = t.numel() * t.element_size() // spr
        t.view(torch.uint8).reshape(spr, -1).copy_(fresh[:, offset:offset + width])
        offset += width
    return len(recvs) * packed.shape[1]


# ----------------------------------------------------------------------------- the balancer


class Balancer:
    """Collects per-expert loads over a sliding window and proposes new placements.

    record(counts [E], layer): add one MoE layer's local counts for the current step (no sync).
    maybe_rebalance(step): call once after every step on every rank of the EP group; closes the
    step's counts into the window and, every `interval` steps, sums the window over the group
    and returns one new Placement per layer (None otherwise). Apply each with
    ExpertParallelMoE.apply_placement before the next step.
    """

    def __init__(self, placements: list[Placement], group: dist.ProcessGroup | None, window: int = 1000,
                 interval: int = 1000, num_nodes: int = 1, num_groups: int = 1,
                 device: torch.device | str = "cpu"):
        if interval <= 0 or window <= 0:
            raise ValueError("eplb interval and window must be positive")
        self.placements = list(placements)
        self.group, self.window, self.interval = group, window, interval
        self.num_nodes, self.num_groups = num_nodes, num_groups
        shape = (len(placements), placements[0].num_experts)
        self.current = torch.zeros(shape, dtype=torch.int64, device=device)
        self.history = torch.zeros((window, *shape), dtype=torch.int64, device=device)
        self.steps_seen = 0
        self.last_imbalance: list[tuple[float, float]] = []  # (before, after) per layer at the last rebalance

    def record(self, counts: torch.Tensor, layer: int = 0) -> None:
        self.current[layer] += counts.to(self.current.device)

    def window_load(self) -> torch.Tensor:
        """[layers, E] load summed over the window and over the group's ranks (a collective)."""
        load = self.history.sum(dim=0)
        if self.group is not None:
            dist.all_reduce(load, group=self.group)
        return load.cpu()

    def maybe_rebalance(self, step: int) -> list[Placement] | None:
        self.history[self.steps_seen % self.window] = self.current
        self.current.zero_()
        self.steps_seen += 1
        if step <= 0 or step % self.interval:
            return None
        load = self.window_load()
        new = [rebalance(load[i], p, self.num_nodes, self.num_groups) for i, p in enumerate(self.placements)]
        self.last_imbalance = [(imbalance(rank_loads(load[i], p)), imbalance(rank_loads(load[i], q)))
                               for i, (p, q) in enumerate(zip(self.placements, new))]
        self.placements = new
        return new
