"""Linear layers: plain, or FP8 block-scaled (DeepSeek's checkpoint format) kept in FP8; and their
tensor-parallel forms (column- and row-parallel linears, vocabulary-parallel embedding and head)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moeserve.distributed.groups import get_parallel_state

from moeserve.kernels.fp8 import FP8_DTYPE, block_fp8_matmul, dequant_block_fp8_ref
from moeserve.kernels.gemv import linear as gemv_linear


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class Embedding(nn.Module):
    """Token embedding table; allocated uninitialised (the loader fills it)."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class Linear(nn.Module):
    """y = x W^T (+ b). With quant="fp8" the weight is e4m3 [out, in] with one fp32
    `weight_scale_inv` per block; activations are quantized per 1 x block[1] group on the fly."""

    # Unquantized: decode-sized inputs on a GPU go through the small-M Triton GEMM (kernels/gemv.py)
    # instead of cuBLAS. Off until measured faster; use_gemv_kernel sets it (EngineConfig.dense_gemv).
    gemv = False

    def __init__(self, in_features: int, out_features: int, bias: bool = False, quant: str | None = None,
                 block: tuple[int, int] = (128, 128)):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quant, self.block = quant, tuple(block)
        if quant == "fp8":
            self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
            scale_shape = (_ceil_div(out_features, block[0]), _ceil_div(in_features, block[1]))
            self.weight_scale_inv = nn.Parameter(torch.empty(scale_shape, dtype=torch.float32), requires_grad=False)
        else:
            self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    @property
    def fp8_input_group(self) -> int:
        """The activation group an FP8 GEMM quantizes its input in (0: it takes the input as it is);
        a producer that quantizes x so (the RMSNorm before) passes the result as forward's x_fp8."""
        return self.block[1] if self.quant == "fp8" else 0

    def forward(self, x: torch.Tensor, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if self.quant != "fp8":
            return self.unquantized(x, self.bias)
        y = block_fp8_matmul(x.reshape(-1, x.shape[-1]), self.weight, self.weight_scale_inv, self.block, x_fp8)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def unquantized(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return gemv_linear(x, self.weight, bias) if self.gemv else F.linear(x, self.weight, bias)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self.quant != "fp8":
            return self.weight.to(dtype)
        return dequant_block_fp8_ref(self.weight, self.weight_scale_inv, self.block, dtype)


def use_gemv_kernel(model: nn.Module, enabled: bool) -> None:
    """Send the unquantized Linears of `model` through the small-M Triton GEMM where it fits (CUDA,
    <= moe_config.GEMV_MAX_M rows, bf16/fp16), or back to cuBLAS everywhere."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.gemv = enabled


# ---- tensor parallelism ---------------------------------------------------------------------
# Under tensor parallelism (tp > 1) a sharded parameter carries `tp_shard`: which slice of the
# full (checkpoint-shaped) tensor this rank holds, so the loader reads only that slice and the
# dummy initialiser writes exactly what a single process would hold there. At tp == 1 the
# factories below return the plain layers above: no extra module, collective or branch.


@dataclass(frozen=True)
class TPShard:
    """This rank's part of a full tensor of shape `full_shape`: along `dim`, the concatenation of
    the (start, length) `segments` (full-tensor coordinates). The local tensor may be longer along
    `dim` than the segments (vocabulary padding); the extra rows stay zero."""

    dim: int
    segments: tuple[tuple[int, int], ...]
    full_shape: tuple[int, ...]

    @property
    def length(self) -> int:
        return sum(n for _, n in self.segments)

    def in_blocks(self, block: int, full_shape: tuple[int, ...]) -> "TPShard":
        """The same shard of a per-block scale tensor (block-aligned segments)."""
        segs = tuple((s // block, _ceil_div(n, block)) for s, n in self.segments)
        return TPShard(self.dim, segs, tuple(full_shape))


def tp_world() -> tuple[int, int, object]:
    """(tp size, tp rank, tp group) of this process; (1, 0, None) in a single process."""
    state = get_parallel_state()
    if state is None or state.tp == 1:
        return 1, 0, None
    return state.tp, state.tp_rank, state.tp_group


def _shard(param: torch.Tensor | None, dim: int, segments, full_size: int) -> None:
    if param is None:
        return
    full = list(param.shape)
    full[dim] = full_size
    param.tp_shard = TPShard(dim, tuple(segments), tuple(full))


def _check_block(name: str, what: str, full: int, segments, tp: int, block: int) -> None:
    for start, length in segments:
        if start % block or length % block:
            raise ValueError(f"{name}: {what} {full} split over tp={tp} gives {length} per rank, not a multiple of "
                             f"the FP8 weight block {block}; choose a tp that keeps shards on {block} boundaries")


def _rank_slice(name: str, what: str, size: int, quant: str | None, block: int) -> tuple[int, tuple]:
    """This rank's equal share of `size` features: (its length, its one (start, length) segment);
    a clear error when tp does not divide them, or when the share would cut an FP8 weight block."""
    tp, rank, _ = tp_world()
    if size % tp:
        raise ValueError(f"{name}: {what} {size} does not split over tp={tp}")
    local = size // tp
    segments = ((rank * local, local),)
    if quant == "fp8":
        _check_block(name, what, size, segments, tp, block)
    return local, segments


class ColumnParallelLinear(Linear):
    """Output features split over the TP ranks (no communication): rank r holds the r-th of tp
    equal parts of the rows. The output stays sharded: [.., out / tp]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, quant: str | None = None,
                 block: tuple[int, int] = (128, 128), name: str = "linear"):
        local, segments = _rank_slice(name, "output size", out_features, quant, block[0])
        super().__init__(in_features, local, bias, quant, block)
        self.full_out_features = out_features
        _shard(self.weight, 0, segments, out_features)
        _shard(self.bias, 0, segments, out_features)
        if quant == "fp8":
            shard = self.weight.tp_shard.in_blocks(block[0], (_ceil_div(out_features, block[0]),
                                                             _ceil_div(in_features, block[1])))
            self.weight_scale_inv.tp_shard = shard


class RowParallelLinear(Linear):
    """Input features split over the TP ranks; each rank's partial product is summed by an
    all_reduce over the TP group (reduce=False leaves that to the caller, who may fold several
    partial sums into one all_reduce). The bias is added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, quant: str | None = None,
                 block: tuple[int, int] = (128, 128), name: str = "linear", reduce: bool = True):
        local, segments = _rank_slice(name, "input size", in_features, quant, block[1])
        super().__init__(local, out_features, bias, quant, block)
        self.full_in_features = in_features
        self.group, self.reduce = tp_world()[2], reduce
        _shard(self.weight, 1, segments, in_features)
        if quant == "fp8":
            self.weight_scale_inv.tp_shard = self.weight.tp_shard.in_blocks(
                block[1], (_ceil_div(out_features, block[0]), _ceil_div(in_features, block[1])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant != "fp8":
            y = self.unquantized(x, None)
        else:
            y = block_fp8_matmul(x.reshape(-1, x.shape[-1]), self.weight, self.weight_scale_inv, self.block)
            y = y.reshape(*x.shape[:-1], self.out_features)
        if self.reduce:
            dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


@dataclass(frozen=True)
class LinearPart:
    """One projection inside a MergedColumnLinear: its checkpoint name relative to the merged
    module's parent (e.g. "gate_proj"), its full output size, and whether tensor parallelism splits
    it over the ranks (column-parallel) or every rank holds all of it (replicated). A split part's
    rank holds the rank-th of tp equal slices, or `segment`: this rank's (first row, rows) of the
    part, for slices that are not that (GQA's KV heads, one of which several ranks may share)."""

    name: str
    out_features: int
    split: bool = True
    segment: tuple[int, int] | None = None


def _round_up(n: int, multiple: int) -> int:
    return _ceil_div(n, multiple) * multiple


def _equal_slice(part: LinearPart, tp: int, rank: int, name: str) -> tuple[int, int]:
    """(first row, rows) of the rank-th of tp equal slices of a split part."""
    if part.out_features % tp:
        raise ValueError(f"{name}: {part.name} output size {part.out_features} does not split over tp={tp}")
    n = part.out_features // tp
    return rank * n, n


class MergedColumnLinear(Linear):
    """Several projections of the same input as one GEMM: the parts' weights stacked along the
    output dimension ([gate; up] of a SiLU MLP, [q; kv_a] of MLA, [q; k; v] of GQA). `split(y)`
    returns each part's columns of the output (views).

    The checkpoint keeps the parts apart; the loader writes each into its rows (`part_rows`).
    With FP8 block scales a part other than the last starts a new block: its rows are padded to
    the weight block (zero rows, ignored by `split`), so each part keeps its own scales; a split
    part's slices must lie on block boundaries (ValueError otherwise). Under tensor parallelism a
    rank holds, in part order, its slice of each split part and all of each replicated part: its
    weight is the concatenation of those row ranges of the full merged tensor (`tp_shard` with one
    segment per part), so dummy weights match the single process; with parallel=False every rank
    holds all of every part."""

    def __init__(self, in_features: int, parts: list[LinearPart], bias: bool = False, quant: str | None = None,
                 block: tuple[int, int] = (128, 128), name: str = "linear", parallel: bool = True):
        tp, rank, _ = tp_world() if parallel else (1, 0, None)  # not parallel: whole on every rank
        align = block[0] if quant == "fp8" else 1
        self.parts = tuple(parts)
        segments, local_rows, ckpt_shards = [], [], []
        full_start = local_start = 0
        for i, part in enumerate(self.parts):
            full_rows = part.out_features if i == len(self.parts) - 1 else _round_up(part.out_features, align)
            if part.split and tp > 1:
                start, n = part.segment or _equal_slice(part, tp, rank, name)
                if quant == "fp8":
                    _check_block(name, f"{part.name} output size", part.out_features, ((start, n),), tp, align)
                held = (full_start + start, n)
                ckpt_shards.append(TPShard(0, ((start, n),), (part.out_features, in_features)))
            else:
                n = part.out_features
                held = (full_start, full_rows)
                ckpt_shards.append(None)
            segments.append(held)
            local_rows.append((local_start, n))
            full_start += full_rows
            local_start += held[1]
        super().__init__(in_features, local_start, bias, quant, block)
        self.part_rows = tuple(local_rows)  # (first local row, rows) of each part
        self.part_shards = tuple(ckpt_shards)  # each part's slice of its checkpoint tensor (None: all)
        if sum(n for _, n in local_rows) != local_start:  # padded: the padding rows stay zero
            for p in (self.weight, self.bias):
                if p is not None:
                    p.data.zero_()
        if tp > 1 and any(part.split for part in self.parts):
            _shard(self.weight, 0, segments, full_start)
            _shard(self.bias, 0, segments, full_start)
            if quant == "fp8":
                self.weight_scale_inv.tp_shard = self.weight.tp_shard.in_blocks(
                    block[0], (_ceil_div(full_start, block[0]), _ceil_div(in_features, block[1])))

    def split(self, y: torch.Tensor) -> list[torch.Tensor]:
        return [y[..., start:start + n] for start, n in self.part_rows]

    def part_target(self, index: int, kind: str) -> tuple[torch.Tensor, TPShard | None]:
        """Where the loader writes part `index`'s checkpoint tensor `kind` (weight,
        weight_scale_inv or bias): the rows of the local parameter, and the slice of the
        checkpoint tensor this rank reads (None: all of it)."""
        start, n = self.part_rows[index]
        shard = self.part_shards[index]
        param = getattr(self, kind)
        if kind == "weight_scale_inv":
            bn = self.block[0]
            start, n = start // bn, _ceil_div(n, bn)
            if shard is not None:
                shard = shard.in_blocks(bn, (_ceil_div(shard.full_shape[0], bn),
                                             _ceil_div(self.in_features, self.block[1])))
        elif kind == "bias" and shard is not None:
            shard = TPShard(0, shard.segments, shard.full_shape[:1])
        return param.data.narrow(0, start, n), shard


def _vocab_segments(vocab: int, tp: int, rank: int) -> tuple[int, int, int]:
    """(rows per rank, first id of this rank, ids this rank really holds): contiguous ranges of
    ceil(vocab / tp) ids, the last one padded."""
    per = _ceil_div(vocab, tp)
    start = min(rank * per, vocab)
    return per, start, min(per, vocab - start)


class VocabParallelEmbedding(nn.Module):
    """The embedding table split by token id: rank r holds ids [r * V/tp, (r + 1) * V/tp); a token
    outside the range embeds to zeros here and the all_reduce over the TP group sums in the row."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        tp, rank, self.group = tp_world()
        per, self.start, self.num_local = _vocab_segments(num_embeddings, tp, rank)
        self.num_embeddings = num_embeddings
        self.weight = nn.Parameter(torch.zeros(per, dim), requires_grad=False)
        _shard(self.weight, 0, ((self.start, self.num_local),), num_embeddings)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_local)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        dist.all_reduce(out, group=self.group)
        return out


class ParallelLMHead(nn.Module):
    """The output projection split by vocabulary like VocabParallelEmbedding (so a tied head
    shares its shard); each rank computes its ids' logits and an all_gather over the TP group
    assembles the full vocabulary on every rank before sampling."""

    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        tp, rank, self.group = tp_world()
        self.tp = tp
        per, start, num_local = _vocab_segments(vocab, tp, rank)
        self.vocab = vocab
        self.weight = nn.Parameter(torch.zeros(per, hidden), requires_grad=False)
        _shard(self.weight, 0, ((start, num_local),), vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local = F.linear(x, self.weight).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.tp)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)[..., : self.vocab]


def column_parallel(in_features: int, out_features: int, bias: bool = False, quant: str | None = None,
                    block: tuple[int, int] = (128, 128), name: str = "linear", parallel: bool = True) -> Linear:
    """A Linear whose output features are split over the TP ranks (a plain Linear at tp == 1, or
    when not parallel: replicated on every rank)."""
    if tp_world()[0] == 1 or not parallel:
        return Linear(in_features, out_features, bias, quant, block)
    return ColumnParallelLinear(in_features, out_features, bias, quant, block, name)


def row_parallel(in_features: int, out_features: int, bias: bool = False, quant: str | None = None,
                 block: tuple[int, int] = (128, 128), name: str = "linear", reduce: bool = True,
                 parallel: bool = True) -> Linear:
    """A Linear whose input features are split over the TP ranks, summed over them when reduce
    (a plain Linear at tp == 1, or when not parallel: replicated on every rank)."""
    if tp_world()[0] == 1 or not parallel:
        return Linear(in_features, out_features, bias, quant, block)
    return RowParallelLinear(in_features, out_features, bias, quant, block, name, reduce)


def vocab_embedding(num_embeddings: int, dim: int) -> nn.Module:
    return Embedding(num_embeddings, dim) if tp_world()[0] == 1 else VocabParallelEmbedding(num_embeddings, dim)


def lm_head(hidden: int, vocab: int) -> nn.Module:
    return Linear(hidden, vocab) if tp_world()[0] == 1 else ParallelLMHead(hidden, vocab)
