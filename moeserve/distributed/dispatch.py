"""Expert-parallel dispatch/combine: send each token to the ranks holding its top-k experts and
bring the weighted expert outputs back, over one EP process group.

Placement: experts are logical ids 0..E-1; physical slots 0..S-1 (S = E + redundant) live on
ranks in contiguous blocks of S / ep slots (slot s on rank s // (S/ep), local slot s % (S/ep)).
A logical expert may own several slots (replicas); a token picks replica
(token index + rank) % replica count, so replicas share an expert's load.

One message row per (token, destination rank), not per (token, expert): a token whose experts
share a rank travels there once (dedupe). Its row carries, after the codec payload,
    k int32 local slot ids (-1: expert not on this rank) and k fp32 router weights,
so the receiver runs fused_moe on [rows, k] exactly as a single rank would; the expert side
applies the router weights, and combine sends back one partial sum per row, which the
source adds up: y[t] = sum over ranks of partial[t, rank].

Backends, behind Dispatcher:
- "ht" (high-throughput): per-rank row counts go first (all_to_all of counts, one host sync),
  then variable-split all_to_all of just the rows that exist, and back.
- "ll" (low-latency): a fixed buffer of `capacity` rows per destination rank, row t holding
  token t; no host sync, static shapes -> CUDA-graph capturable. Padding rows, and rows of tokens
  with no expert on that rank, carry ids -1 and are left out of the sum. It cannot overflow: a
  rank sends a token at most once per rank, so capacity = max tokens per rank suffices (tokens
  beyond it raise). Two transports (`ll_transport`, env MOESERVE_EP_LL_TRANSPORT):
    "collective" (default): one equal-split all_to_all of the whole buffer (zero payloads in the
      rows that carry nothing), NCCL on GPU, gloo on CPU;
    "peer": every rank's receive buffer is mapped into its peers (peer_memory.py, one host), the
      encode kernel stores each row straight into the receiving rank's buffer (the payload only
      where the row carries a token, the metadata always), and a device barrier replaces the
      collective; combine stores the partial sums back the same way. No NCCL, nothing on the
      host: the codec pass and the transfer are one pass.

Both backends make one pass over the activations per step of the way (wire_codecs' row kernels:
gather + encode + pack into the send buffer, decode from the receive buffer, decode + sum per
token), in Triton on CUDA and with the plain-torch references elsewhere (`kernels` forces either).

All ranks of the group must use the same backend in a step: `begin_step` decides from the
max tokens per rank over the group (one all_reduce), or from a max the caller already shares.
A rank with zero tokens still takes part in every collective.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moeserve.distributed.peer_memory import DEFAULT_TIMEOUT_S, PeerBuffers
from moeserve.distributed.wire import Codec, make_codec
from moeserve.kernels import wire_codecs

BACKENDS = ("ht", "ll")
KERNELS = ("auto", "triton", "torch")
LL_TRANSPORTS = ("collective", "peer")
ENV_BACKEND = "MOESERVE_DISPATCH"
ENV_HT_CHUNKS = "MOESERVE_EP_HT_CHUNKS"
ENV_LL_CHUNKS = "MOESERVE_EP_LL_CHUNKS"
ENV_LL_TRANSPORT = "MOESERVE_EP_LL_TRANSPORT"


# ----------------------------------------------------------------------------- placement


@dataclass
class Placement:
    """slot_expert[s] = logical expert held by physical slot s (slot s on rank s // slots_per_rank)."""

    slot_expert: torch.Tensor  # [num_slots] int64, on CPU
    num_experts: int
    num_ranks: int

    def __post_init__(self) -> None:
        self.slot_expert = self.slot_expert.to(torch.int64).cpu()
        num_slots = self.slot_expert.numel()
        if num_slots % self.num_ranks:
            raise ValueError(f"{num_slots} physical slots do not split evenly over {self.num_ranks} ranks")
        counts = torch.bincount(self.slot_expert, minlength=self.num_experts)
        if counts.numel() != self.num_experts or (counts == 0).any():
            raise ValueError("every logical expert needs at least one slot, and ids must be < num_experts")

    @classmethod
    def contiguous(cls, num_experts: int, num_ranks: int, num_redundant: int = 0) -> "Placement":
        """Expert e in slot e (E/ep consecutive experts per rank); redundant slots copy experts 0, 1, ..."""
        slots = torch.cat([torch.arange(num_experts), torch.arange(num_redundant) % num_experts])
        return cls(slots, num_experts, num_ranks)

    @property
    def num_slots(self) -> int:
        return self.slot_expert.numel()

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.num_ranks

    @property
    def max_replicas(self) -> int:
        """Upper bound on replicas of one expert for any placement with this many slots."""
        return self.num_slots - self.num_experts + 1

    def rank_experts(self, rank: int) -> list[int]:
        spr = self.slots_per_rank
        return self.slot_expert[rank * spr:(rank + 1) * spr].tolist()

    def replica_count(self) -> torch.Tensor:
        return torch.bincount(self.slot_expert, minlength=self.num_experts)

    def replica_slots(self) -> torch.Tensor:
        """[E, max_replicas] physical slots of each expert, ascending, padded with -1."""
        table = torch.full((self.num_experts, self.max_replicas), -1, dtype=torch.int64)
        filled = [0] * self.num_experts
        for slot, e in enumerate(self.slot_expert.tolist()):
            table[e, filled[e]] = slot
            filled[e] += 1
        return table


class RoutingTable:
    """Device copies of a placement's lookup tables, updated in place (stable addresses for CUDA graphs)."""

    def __init__(self, placement: Placement, device: torch.device | str = "cpu"):
        self.placement = placement
        self.replica_slots = placement.replica_slots().to(device)
        self.replica_count = placement.replica_count().to(device)

    def load(self, placement: Placement) -> None:
        if placement.replica_slots().shape != self.replica_slots.shape:
            raise ValueError("a new placement must keep the number of experts, slots and ranks")
        self.placement = placement
        self.replica_slots.copy_(placement.replica_slots())
        self.replica_count.copy_(placement.replica_count())

    def physical_slots(self, topk_ids: torch.Tensor, rank: int) -> torch.Tensor:
        """topk_ids [T, k] logical (< 0: none) -> physical slots [T, k] (-1 where none)."""
        return wire_codecs.physical_slots_ref(topk_ids, self.replica_slots, self.replica_count, rank)

    def route(self, topk_ids: torch.Tensor, rank: int, num_ranks: int, with_hit: bool = False,
              triton_ok: bool | None = None):
        """-> dest rank [T, k] (num_ranks where none), local slot [T, k] (-1 where none), and with_hit
        [R, T] bool: token t has an expert on rank r."""
        return wire_codecs.route(topk_ids, self.replica_slots, self.replica_count, rank,
                                 self.placement.slots_per_rank, num_ranks, with_hit, triton_ok)


# ----------------------------------------------------------------------------- backends
# Rows are written by the wire_codecs row kernels: encode_rows gathers, encodes and packs each
# (token, rank) row straight into the send buffer, decode_rows reads the receive buffer in place,
# combine_rows decodes the returned partial sums and adds them per token, in one pass each.


def _in_dtype(recv_x, dtype: torch.dtype):
    """Received activations in the caller's dtype; FP8 groups (a tuple) as they are."""
    return recv_x if isinstance(recv_x, tuple) else recv_x.to(dtype)


@dataclass
class HTHandle:
    slots: torch.Tensor  # [R, T] int32: row of the send buffer that carried token t to rank r, -1 if none
    chunks: list[tuple[int, int]]  # token range of each chunk
    send_counts: list[list[int]]  # [R][C] rows sent to each rank, per chunk
    recv_counts: list[list[int]]  # [R][C] rows received from each rank, per chunk
    num_tokens: int
    dtype: torch.dtype


@dataclass
class LLHandle:
    dest: torch.Tensor  # [T, k] rank of each of token t's experts (R where none): row r * cap + t went to r
    num_tokens: int
    dtype: torch.dtype
    recv_ids: torch.Tensor | None = None  # peer transport: the received rows' ids (rows to send back)


class HighThroughputBackend:
    """Counts first, then variable-split all_to_all of only the rows that exist.

    With ht_chunks C > 1 the tokens go in C ranges, one all_to_all each (asynchronous): chunk i + 1
    is encoded while chunk i travels, and each chunk is decoded (or summed, in combine) as soon as
    it lands, so the codec passes overlap the transfers instead of adding to them."""

    name = "ht"

    def __init__(self, d: "Dispatcher"):
        self.d = d

    def dispatch(self, x, topk_ids, topk_weights, table, fp8_groups=False):
        d = self.d
        t, k, r, c = x.shape[0], topk_ids.shape[1], d.num_ranks, d.ht_chunks
        dest, local, hit = table.route(topk_ids, d.rank, r, with_hit=True, triton_ok=d.triton_ok)
        # Send rows grouped by chunk, then destination rank, then token: the row of (r, t) is the
        # number of hits before it in that order.
        f = -(-t // c)  # tokens per chunk
        hits = torch.nn.functional.pad(hit, (0, c * f - t)).view(r, c, f)
        order = hits.transpose(0, 1).reshape(-1).cumsum(0, dtype=torch.int32).view(c, r, f).transpose(0, 1)
        slots = torch.where(hit, order.reshape(r, c * f)[:, :t] - 1, -1)
        send_counts, recv_counts = d.exchange_counts(hits.sum(dim=-1))
        chunks = [(min(i * f, t), min((i + 1) * f, t)) for i in range(c)]
        codec = d.dispatch_codec
        rows = x.new_empty(sum(map(sum, send_counts)), d.bytes_per_row(k)[0], dtype=torch.uint8)
        recv = rows.new_empty(sum(map(sum, recv_counts)), rows.shape[1])
        works, spans, s0, r0 = [], [], 0, 0
        for i, (a, b) in enumerate(chunks):
            sc, rc = [n[i] for n in send_counts], [n[i] for n in recv_counts]
            d.encode_rows(x[a:b], codec, slots=slots[:, a:b], dest=dest[a:b], local=local[a:b],
                          weights=topk_weights[a:b], out=rows)
            works.append(d.all_to_all(recv[r0:r0 + sum(rc)], rows[s0:s0 + sum(sc)], rc, sc, async_op=True))
            spans.append((r0, r0 + sum(rc)))
            s0, r0 = s0 + sum(sc), r0 + sum(rc)
        recv_x, recv_ids, recv_w = d.decode_as_they_land(recv, works, spans, k, fp8_groups)
        handle = HTHandle(slots, chunks, send_counts, recv_counts, t, x.dtype)
        return _in_dtype(recv_x, x.dtype), recv_ids, recv_w, handle

    def combine(self, expert_out, h: HTHandle):
        d = self.d
        y = torch.empty(h.num_tokens, d.hidden, dtype=h.dtype, device=expert_out.device)
        back = expert_out.new_empty(sum(map(sum, h.send_counts)), d.bytes_per_row(0)[1], dtype=torch.uint8)
        works, s0, r0 = [], 0, 0
        for i in range(len(h.chunks)):
            sc, rc = [n[i] for n in h.send_counts], [n[i] for n in h.recv_counts]
            enc = d.encode_rows(expert_out[r0:r0 + sum(rc)], d.combine_codec)
            works.append(d.all_to_all(back[s0:s0 + sum(sc)], enc, sc, rc, async_op=True))
            s0, r0 = s0 + sum(sc), r0 + sum(rc)
        for work, (a, b) in zip(works, h.chunks):
            if work is not None:
                work.wait()
            d.combine_rows(back, b - a, h.dtype, slots=h.slots[:, a:b], out=y[a:b])
        return y


class LowLatencyBackend:
    """Fixed `capacity` rows per destination rank (row t = token t), equal splits, no host sync.

    With ll_chunks C > 1 the capacity is cut into C token ranges of ceil(capacity / C) rows per
    rank, laid out range by range ([C, R, rows], so each range is one contiguous equal-split
    all_to_all) and sent asynchronously: range i + 1 is encoded while range i travels, and each
    range is decoded (summed, in combine) as it lands. Shapes stay static and nothing waits on the
    host, so the whole pipeline is captured in one CUDA graph, the transfers running on NCCL's
    stream beside the codec kernels. A rank whose tokens end before a range still sends its
    padding rows: every rank joins every range's collective."""

    name = "ll"

    def __init__(self, d: "Dispatcher"):
        self.d = d

    def layout(self) -> tuple[int, int]:
        """(ranges, rows per rank in each range)."""
        c = self.d.ll_chunks
        return c, -(-self.d.ll_capacity // c)

    def dispatch(self, x, topk_ids, topk_weights, table, fp8_groups=False):
        d = self.d
        t, k, r = x.shape[0], topk_ids.shape[1], d.num_ranks
        if t > d.ll_capacity:
            raise ValueError(f"low-latency dispatch got {t} tokens on rank {d.rank}, capacity {d.ll_capacity}: "
                             f"raise ll_capacity or use the high-throughput backend")
        dest, local, _ = table.route(topk_ids, d.rank, r, triton_ok=d.triton_ok)
        if d.uses_peer_memory:
            return self.dispatch_peer(x, dest, local, topk_weights, fp8_groups)
        c, f = self.layout()
        n = r * f  # rows of one range
        codec = d.dispatch_codec
        # Rows of tokens that have no expert on a rank, and padding rows, carry zeros and ids -1.
        rows = x.new_empty(c * n, d.bytes_per_row(k)[0], dtype=torch.uint8)
        recv = torch.empty_like(rows)
        works = []
        for i in range(c):
            a, b = min(i * f, t), min((i + 1) * f, t)
            d.encode_rows(x[a:b], codec, n, cap=f, dest=dest[a:b], local=local[a:b], weights=topk_weights[a:b],
                          out=rows[i * n:(i + 1) * n])
            works.append(d.all_to_all(recv[i * n:(i + 1) * n], rows[i * n:(i + 1) * n], async_op=c > 1))
        recv_x, recv_ids, recv_w = d.decode_as_they_land(recv, works, [(i * n, (i + 1) * n) for i in range(c)], k,
                                                         fp8_groups)
        return _in_dtype(recv_x, x.dtype), recv_ids, recv_w, LLHandle(dest, t, x.dtype)

    def dispatch_peer(self, x, dest, local, topk_weights, fp8_groups=False):
        d, k = self.d, dest.shape[1]
        codec = d.dispatch_codec
        kernels = d.row_kernels(x, codec.dtype)
        rows = d.peer_rows("dispatch", k)
        wire_codecs.encode_peers(x, codec.name, codec.dtype, d.ll_capacity, dest, local, topk_weights, rows,
                                 triton_ok=kernels)
        d.peer_memory.barrier(kernel=x.is_cuda or kernels)
        recv_x, recv_ids, recv_w = wire_codecs.decode_rows(rows.views[d.rank], codec.name, d.hidden, codec.dtype, k,
                                                           triton_ok=kernels, live_only=True, fp8_groups=fp8_groups)
        return _in_dtype(recv_x, x.dtype), recv_ids, recv_w, LLHandle(dest, x.shape[0], x.dtype, recv_ids)

    def combine_peer(self, expert_out, h: LLHandle):
        d, codec = self.d, self.d.combine_codec
        kernels = d.row_kernels(expert_out, codec.dtype, h.dtype)
        rows = d.peer_rows("combine", h.recv_ids.shape[1])
        wire_codecs.encode_back(expert_out, codec.name, codec.dtype, h.recv_ids, d.ll_capacity, rows,
                                triton_ok=kernels)
        d.peer_memory.barrier(kernel=expert_out.is_cuda or kernels)
        return wire_codecs.combine_rows(rows.views[d.rank], codec.name, d.hidden, codec.dtype, h.dtype, h.num_tokens,
                                        cap=d.ll_capacity, dest=h.dest, triton_ok=kernels)

    def combine(self, expert_out, h: LLHandle):
        d = self.d
        if h.recv_ids is not None:
            return self.combine_peer(expert_out, h)
        c, f = self.layout()
        n = d.num_ranks * f
        sent, works = [], []  # sent: the encoded ranges, alive until their transfers are waited for
        back = expert_out.new_empty(c * n, d.bytes_per_row(0)[1], dtype=torch.uint8)
        for i in range(c):
            sent.append(d.encode_rows(expert_out[i * n:(i + 1) * n], d.combine_codec))
            works.append(d.all_to_all(back[i * n:(i + 1) * n], sent[-1], async_op=c > 1))
        y = torch.empty(h.num_tokens, d.hidden, dtype=h.dtype, device=expert_out.device)
        for i, work in enumerate(works):
            if work is not None:
                work.wait()
            a, b = min(i * f, h.num_tokens), min((i + 1) * f, h.num_tokens)
            d.combine_rows(back[i * n:(i + 1) * n], b - a, h.dtype, cap=f, dest=h.dest[a:b], out=y[a:b])
        return y


# ----------------------------------------------------------------------------- the interface


def select_backend(num_tokens_per_rank: int, threshold: int) -> str:
    """'ll' for decode-sized steps (max tokens per rank <= threshold), else 'ht'.

    Pass a value every rank agrees on (the max over the EP group), or ranks would pick
    different collectives and hang.
    """
    return "ll" if num_tokens_per_rank <= threshold else "ht"


def resolve_ll_transport(transport: str | None) -> str:
    """Argument, else env MOESERVE_EP_LL_TRANSPORT, else 'collective'."""
    transport = transport or os.environ.get(ENV_LL_TRANSPORT) or "collective"
    if transport not in LL_TRANSPORTS:
        raise ValueError(f"ll_transport {transport!r}: use one of {LL_TRANSPORTS}")
    return transport


def resolve_mode(mode: str | None) -> str:
    """Argument, else env MOESERVE_DISPATCH, else 'auto'."""
    mode = mode or os.environ.get(ENV_BACKEND) or "auto"
    if mode not in BACKENDS + ("auto",):
        raise ValueError(f"dispatch mode {mode!r}: use ht, ll or auto")
    return mode


class Dispatcher:
    """dispatch(x, topk_ids, topk_weights) -> (recv_x, recv_local_expert_ids, recv_weights, handle);
    run the local experts on the received rows (ids are this rank's local slots, -1 = skip,
    weights already applied by the expert compute); combine(expert_out, handle) -> y [T, H].

    group: the EP process group; None means a single rank (no communication).
    kernels: "auto" (Triton where it runs), "triton" or "torch" (the references) for the row work.
    ht_chunks: token ranges the high-throughput backend pipelines (default env MOESERVE_EP_HT_CHUNKS
    or 1); ll_chunks: token ranges the low-latency backend pipelines (env MOESERVE_EP_LL_CHUNKS or 1;
    for wires slower than the codecs: on one NVLink host it measured slower at every count, even at
    4096 tokens per rank, docs/perf/ep.md). ll_transport: "collective" or "peer" (env
    MOESERVE_EP_LL_TRANSPORT, default collective; peer needs the group on one host and maps its
    buffers at the first low-latency dispatch, a collective: not inside a CUDA graph capture).
    peer_timeout_s: the peer barrier's deadline. Every rank of the group must use the same settings.
    One Dispatcher serves every MoE layer of a rank; each layer passes its own RoutingTable.
    """

    def __init__(self, group: dist.ProcessGroup | None, placement: Placement, hidden: int,
                 dtype: torch.dtype = torch.bfloat16, dispatch_codec: str | Codec = "none",
                 combine_codec: str | Codec = "none", mode: str | None = None, threshold: int = 128,
                 ll_capacity: int | None = None, device: torch.device | str = "cpu", kernels: str = "auto",
                 ht_chunks: int | None = None, ll_chunks: int | None = None, ll_transport: str | None = None,
                 peer_timeout_s: float = DEFAULT_TIMEOUT_S):
        self.group = group
        self.rank = dist.get_rank(group) if group is not None else 0
        self.num_ranks = dist.get_world_size(group) if group is not None else 1
        if placement.num_ranks != self.num_ranks:
            raise ValueError(f"placement is for {placement.num_ranks} ranks, the EP group has {self.num_ranks}")
        self.hidden, self.dtype, self.device = hidden, dtype, torch.device(device)
        self.dispatch_codec = dispatch_codec if isinstance(dispatch_codec, Codec) else make_codec(dispatch_codec, dtype)
        self.combine_codec = combine_codec if isinstance(combine_codec, Codec) else make_codec(combine_codec, dtype)
        for codec in (self.dispatch_codec, self.combine_codec):
            if codec.name not in wire_codecs.KINDS:
                raise ValueError(f"codec {codec!r}: the row kernels know {wire_codecs.KINDS}")
        if kernels not in KERNELS:
            raise ValueError(f"kernels {kernels!r}: use one of {KERNELS}")
        # auto: Triton on CUDA (and under the interpreter in fp32/fp16), the torch references elsewhere
        self.triton_ok = {"auto": None, "triton": True, "torch": False}[kernels]
        # Same on every rank (it sets the number of collectives): from the config, not the load.
        self.ht_chunks = int(ht_chunks or os.environ.get(ENV_HT_CHUNKS) or 1)
        self.ll_chunks = int(ll_chunks or os.environ.get(ENV_LL_CHUNKS) or 1)
        if self.ht_chunks < 1 or self.ll_chunks < 1:
            raise ValueError(f"ht_chunks and ll_chunks must be >= 1, got {self.ht_chunks}, {self.ll_chunks}")
        self.ll_transport = resolve_ll_transport(ll_transport)
        if self.ll_transport == "peer" and self.ll_chunks > 1:
            raise ValueError("ll_chunks pipelines the collective transport's transfers; the peer transport has none")
        self.uses_peer_memory = self.ll_transport == "peer" and self.group is not None
        self.peer_timeout_s = peer_timeout_s
        self.peer_memory: PeerBuffers | None = None  # mapped at the first low-latency dispatch
        self.peer_k: int | None = None  # the top_k its dispatch rows are laid out for
        self._peer_rows: dict[str, wire_codecs.PeerRows] = {}
        self.mode = resolve_mode(mode)
        self.threshold = threshold
        # In auto mode 'll' runs only when max tokens per rank <= threshold, so that is enough room.
        self.ll_capacity = ll_capacity or threshold
        self.table = RoutingTable(placement, self.device)
        self.backends = {"ht": HighThroughputBackend(self), "ll": LowLatencyBackend(self)}
        self.step_backend: str | None = None

    # -- choosing the backend -------------------------------------------------------------

    def begin_step(self, num_tokens: int, global_max: int | None = None) -> str:
        """Pick the backend for every MoE layer of this step; call on every rank of the group.

        With global_max (a max over ranks the caller already shares) no communication happens;
        otherwise one all_reduce(MAX) of num_tokens over the group (a host sync, once per step).
        """
        if self.mode != "auto":
            self.step_backend = self.mode
            return self.mode
        if global_max is None:
            global_max = self.max_over_ranks(num_tokens)
        self.step_backend = select_backend(global_max, min(self.threshold, self.ll_capacity))
        return self.step_backend

    def max_over_ranks(self, value: int) -> int:
        if self.group is None:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())

    def _backend(self, num_tokens: int) -> str:
        if self.step_backend is not None:
            return self.step_backend
        if self.mode != "auto":
            return self.mode
        # No begin_step this step: agree on the spot (one extra all_reduce per call).
        return select_backend(self.max_over_ranks(num_tokens), min(self.threshold, self.ll_capacity))

    # -- the interface ----------------------------------------------------------------------

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 table: RoutingTable | None = None, fp8_groups: bool = False):
        """fp8_groups: hand the received activations over as FP8 experts take them, (e4m3 values,
        fp32 scales per 128) as fused_moe's x_fp8: an fp8 dispatch payload as it arrived (views,
        nothing decoded), others decoded and quantized in one pass."""
        if x.shape[1] != self.hidden:
            raise ValueError(f"dispatcher built for hidden {self.hidden}, got {x.shape[1]}")
        backend = self.backends[self._backend(x.shape[0])]
        return backend.dispatch(x, topk_ids, topk_weights, table or self.table, fp8_groups)

    def combine(self, expert_out: torch.Tensor, handle: HTHandle | LLHandle) -> torch.Tensor:
        backend = self.backends["ht" if isinstance(handle, HTHandle) else "ll"]
        return backend.combine(expert_out, handle)

    # -- collectives (skipped for a single rank) -------------------------------------------

    def exchange_counts(self, send_counts: torch.Tensor) -> tuple[list, list]:
        """Rows this rank sends to each rank ([R, ...]) -> (that, rows it receives from each rank),
        as lists; one host sync."""
        if self.group is None:
            counts = send_counts.tolist()
            return counts, counts
        send_counts = send_counts.contiguous()
        recv = torch.empty_like(send_counts)
        dist.all_to_all_single(recv, send_counts, group=self.group)
        send, recv = torch.stack([send_counts, recv]).tolist()
        return send, recv

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int] | None = None,
                   in_splits: list[int] | None = None, async_op: bool = False):
        """Rows of inp to the ranks (in_splits rows each), rows from them into out; with async_op the
        work to wait on (None for a single rank, which copies at once)."""
        if self.group is None:
            out.copy_(inp)
            return None
        return dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group, async_op=async_op)

    # -- the peer transport's buffers --------------------------------------------------------

    def peer_rows(self, direction: str, k: int) -> wire_codecs.PeerRows:
        """The low-latency layout's rows in every rank's buffer, for "dispatch" (rows of top_k = k)
        or "combine". The first call maps the buffers (a collective over the group)."""
        if self.peer_memory is None:
            if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("the peer transport maps its buffers at the first low-latency dispatch, which "
                                   "must run before any CUDA graph capture (warm up eagerly first)")
            rows = self.num_ranks * self.ll_capacity
            d_row, c_row = self.bytes_per_row(k)
            self.peer_memory = PeerBuffers(self.group, {"dispatch": rows * d_row, "combine": rows * c_row},
                                           self.device, self.peer_timeout_s)
            self.peer_k = k
        if direction == "dispatch" and k != self.peer_k:
            raise ValueError(f"the peer buffers hold rows of top_k {self.peer_k}, got {k}")
        if direction not in self._peer_rows:
            rows = self.num_ranks * self.ll_capacity
            views = [v.view(rows, -1) for v in self.peer_memory.peer_views(direction)]
            self._peer_rows[direction] = wire_codecs.PeerRows(views, self.peer_memory.table(direction), self.rank)
        return self._peer_rows[direction]

    def close(self) -> None:
        """Give back the peer transport's mappings of the other ranks' buffers (a collective: every
        rank, after its last dispatch); a later low-latency dispatch maps them again."""
        self._peer_rows.clear()
        if self.peer_memory is not None:
            self.peer_memory.release()
            self.peer_memory = None

    def check_transport(self) -> None:
        """Raise if a peer barrier timed out (a peer died or hung); call between steps."""
        if self.peer_memory is not None:
            self.peer_memory.check()

    # -- the row kernels, with this dispatcher's hidden size and kernel choice ----------------

    def row_kernels(self, t: torch.Tensor, *dtypes: torch.dtype) -> bool:
        """True: the Triton row kernels run on t (of these wire dtypes); False: the torch references."""
        return self.triton_ok if self.triton_ok is not None else wire_codecs.use_triton(t, t.dtype, *dtypes)

    def encode_rows(self, x, codec: Codec, num_rows=None, **row_map) -> torch.Tensor:
        return wire_codecs.encode_rows(x, codec.name, codec.dtype, num_rows, triton_ok=self.triton_ok, **row_map)

    def decode_as_they_land(self, recv: torch.Tensor, works: list, spans: list[tuple[int, int]], k: int,
                            fp8_groups: bool = False):
        """Decode the receive buffer range by range, each once its transfer (works[i], None if done)
        is in: -> (x, local expert ids, weights) for all of recv's rows (x a view of a payload
        handed over as it lies; FP8 groups (values, scales) with fp8_groups)."""
        codec, n = self.dispatch_codec, recv.shape[0]
        x = (wire_codecs.payload_view(recv, codec.name, self.hidden, codec.dtype)
             if wire_codecs.in_place(codec.name, fp8_groups)
             else wire_codecs.empty_decoded(n, self.hidden, codec.dtype, fp8_groups, recv.device))
        ids = torch.empty(n, k, dtype=torch.int64, device=recv.device)
        w = torch.empty(n, k, dtype=torch.float32, device=recv.device)
        for work, (a, b) in zip(works, spans):
            if work is not None:
                work.wait()
            part = tuple(t[a:b] for t in x) if isinstance(x, tuple) else x[a:b]
            self.decode_rows(recv[a:b], codec, k, out=(part, ids[a:b], w[a:b]), fp8_groups=fp8_groups)
        return x, ids, w

    def decode_rows(self, rows, codec: Codec, k: int, out=None, fp8_groups: bool = False):
        return wire_codecs.decode_rows(rows, codec.name, self.hidden, codec.dtype, k, out, triton_ok=self.triton_ok,
                                       fp8_groups=fp8_groups)

    def combine_rows(self, rows, num_tokens: int, out_dtype: torch.dtype, **row_map) -> torch.Tensor:
        c = self.combine_codec
        return wire_codecs.combine_rows(rows, c.name, self.hidden, c.dtype, out_dtype, num_tokens,
                                        triton_ok=self.triton_ok, **row_map)

    def bytes_per_row(self, k: int) -> tuple[int, int]:
        """(dispatch row bytes, combine row bytes) on the wire, metadata included."""
        return (self.dispatch_codec.bytes_per_token(self.hidden) + 8 * k,
                self.combine_codec.bytes_per_token(self.hidden))
