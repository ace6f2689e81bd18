"""Attention layers over the paged KV cache: MLA (DeepSeek V2/V3) and GQA (Qwen3-MoE).

A step's batch is flat: T tokens from B sequences back to back, no padding. The first
`num_decodes` sequences contribute exactly one token each (decode); the rest are prefill
chunks, whose earlier tokens (prefix cache hits, earlier chunks) are already in the cache.
Every layer first writes its new tokens' cache entries at `slot_mapping`, then attends over
the cache: decode through the paged decode kernels, prefill through varlen attention.

MLA caches only the compressed latent: [kv_lora_rank normalised latent | rope key] per token,
never expanded K/V. Decode uses the weight-absorbed form (queries projected into the latent
space, values projected out of it after attention); prefill expands the latent with kv_b_proj.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moeserve.config import ModelConfig
from moeserve.host_copy import to_device
from moeserve.kernels.attention import gather_sequences, mla_decode, paged_decode, paged_prefill, varlen_attention
from moeserve.kernels.gqa_cache import gqa_qkv_write
from moeserve.kernels.head_matvec import head_matvec
from moeserve.kernels.mla_cache import mla_kv_write
from moeserve.layers.linear import LinearPart, MergedColumnLinear, column_parallel, row_parallel, tp_world
from moeserve.layers.norm import RMSNorm
from moeserve.layers.rotary import RotaryEmbedding, yarn_softmax_scale


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32: tokens in the cache for each sequence after this step
    query_lens: list[int]  # host copy: new tokens per sequence
    seq_lens_cpu: list[int]  # host copy of seq_lens
    num_decodes: int  # the first num_decodes sequences have query length 1
    # what the step's first layer derives for the prefill kernels (launch table, gather slots), for
    # the other layers to reuse
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_prefills(self) -> int:
        return len(self.query_lens) - self.num_decodes

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], block_size: int,
              device: torch.device | str) -> "AttentionMetadata":
        """From host lists. Decode sequences (query length 1) must come first."""
        num_decodes = 0
        while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
            num_decodes += 1
        if any(q == 1 for q in query_lens[num_decodes:]) and any(q > 1 for q in query_lens[:num_decodes]):
            raise ValueError("decode sequences must come before prefill sequences")
        slots: list[int] = []
        for q_len, s_len, table in zip(query_lens, seq_lens, block_tables):
            for pos in range(s_len - q_len, s_len):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        width = max((len(t) for t in block_tables), default=0)
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        return cls(
            slot_mapping=to_device(slots, torch.int64, device),
            block_tables=to_device(padded, torch.int32, device).reshape(len(block_tables), width),
            seq_lens=to_device(seq_lens, torch.int32, device),
            query_lens=list(query_lens),
            seq_lens_cpu=list(seq_lens),
            num_decodes=num_decodes,
        )


def gather_sequence(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first seq_len cache entries of one sequence, in order: [seq_len, *entry]. (A whole
    batch's prefill sequences in one call: kernels.attention.gather_sequences.)"""
    block_size = cache.shape[1]
    nblk = -(-seq_len // block_size)
    return cache[block_table[:nblk].long()].reshape(nblk * block_size, *cache.shape[2:])[:seq_len]


def _prefill_cu_lens(meta: AttentionMetadata) -> tuple[list[int], list[int]]:
    cu_q, cu_k = [0], [0]
    for q_len, s_len in zip(meta.query_lens[meta.num_decodes:], meta.seq_lens_cpu[meta.num_decodes:]):
        cu_q.append(cu_q[-1] + q_len)
        cu_k.append(cu_k[-1] + s_len)
    return cu_q, cu_k


class MLAAttention(nn.Module):
    """Under tensor parallelism each rank holds num_heads / tp heads: q_proj (or q_b_proj) and
    kv_b_proj split by heads, o_proj row-parallel; q_a / kv_a projections and the latent KV cache
    are replicated (the latent is per token, not per head), and the absorbed decode form uses
    the local heads' slices of kv_b_proj."""

    def __init__(self, cfg: ModelConfig, quant: str | None = None):
        super().__init__()
        tp = tp_world()[0]
        if cfg.num_attention_heads % tp:
            raise ValueError(f"num_attention_heads {cfg.num_attention_heads} does not split over tp={tp}")
        self.num_heads = cfg.num_attention_heads // tp  # this rank's heads
        heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        block = cfg.weight_block_size
        # Both projections of the layer input, the query's (q_proj, split by heads; or q_a_proj,
        # replicated) and the latent KV's (kv_a_proj_with_mqa, replicated), in one GEMM.
        if cfg.q_lora_rank is None:
            q_part = LinearPart("q_proj", heads * qk_dim, split=True)
        else:
            q_part = LinearPart("q_a_proj", cfg.q_lora_rank, split=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = column_parallel(cfg.q_lora_rank, heads * qk_dim, quant=quant, block=block,
                                            name="q_b_proj")
        kv_part = LinearPart("kv_a_proj_with_mqa", self.kv_lora_rank + self.rope_dim, split=False)
        self.q_kv_a_proj = MergedColumnLinear(cfg.hidden_size, [q_part, kv_part], bias=cfg.attention_bias,
                                              quant=quant, block=block, name="q_kv_a_proj")
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = column_parallel(self.kv_lora_rank, heads * (self.nope_dim + self.v_dim), quant=quant,
                                         block=block, name="kv_b_proj")
        self.o_proj = row_parallel(heads * self.v_dim, cfg.hidden_size, bias=cfg.attention_bias, quant=quant,
                                   block=block, name="o_proj")
        self.rotary = RotaryEmbedding(cfg.rope, self.rope_dim, cfg.max_position_embeddings, cfg.rope_interleave)
        self.scale = yarn_softmax_scale(cfg.rope, qk_dim)
        self.kv_cache: torch.Tensor | None = None  # [num_blocks, block_size, kv_lora_rank + rope_dim]
        self.w_uk: torch.Tensor | None = None  # [H, nope_dim, kv_lora_rank], absorbed into queries
        self.w_uv: torch.Tensor | None = None  # [H, v_dim, kv_lora_rank], absorbed into outputs

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (num_blocks, block_size, self.kv_lora_rank + self.rope_dim)

    def process_weights_after_loading(self, dtype: torch.dtype) -> None:
        w = self.kv_b_proj.dequantized_weight(dtype).view(self.num_heads, self.nope_dim + self.v_dim,
                                                          self.kv_lora_rank)
        self.w_uk = w[:, : self.nope_dim].contiguous()
        self.w_uv = w[:, self.nope_dim:].contiguous()

    @property
    def fp8_input_group(self) -> int:
        return self.q_kv_a_proj.fp8_input_group

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x_fp8: x quantized per 1 x fp8_input_group, when the caller has it (the RMSNorm before)."""
        num_tokens = x.shape[0]
        q, kv_a = self.q_kv_a_proj.split(self.q_kv_a_proj(x, x_fp8))
        if self.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.reshape(num_tokens, self.num_heads, self.nope_dim + self.rope_dim)  # a view: rows of unit stride
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        # the latent's norm, the rope key's and the query's rotation and the cache write: one kernel
        q_pe = mla_kv_write(kv_a, self.kv_a_layernorm.weight, self.kv_a_layernorm.eps, positions,
                            self.rotary.cos_sin_cache, self.rotary.interleaved, self.kv_cache, meta.slot_mapping,
                            q_pe)

        out = x.new_empty(num_tokens, self.num_heads, self.v_dim)
        nd = meta.num_decodes
        if nd:
            q_latent = head_matvec(q_nope[:nd], self.w_uk)  # per head [nd, nope] x [nope, L]
            o_latent = mla_decode(q_latent, q_pe[:nd], self.kv_cache, meta.block_tables[:nd],
                                  meta.seq_lens[:nd], self.scale)
            # per head [nd, L] x [L, v], written straight into out's rows (no copy kernel)
            head_matvec(o_latent, self.w_uv, w_transposed=True, out=out[:nd])
        if meta.num_prefills:
            out[nd:] = self._prefill(q_nope[nd:], q_pe[nd:], meta)
        return self.o_proj(out.view(num_tokens, self.num_heads * self.v_dim))

    def _prefill(self, q_nope: torch.Tensor, q_pe: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Expanded form: the prefill sequences' whole latent (prefix + new) through kv_b_proj."""
        nd = meta.num_decodes
        entries = gather_sequences(self.kv_cache, meta.block_tables[nd:], meta.seq_lens_cpu[nd:],
                                   meta.memo).to(q_nope.dtype)
        latent, k_pe = entries.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(latent).view(-1, self.num_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.unsqueeze(1).expand(-1, self.num_heads, -1)), dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        cu_q, cu_k = _prefill_cu_lens(meta)
        return varlen_attention(q, k, v, cu_q, cu_k, self.scale, meta.memo)


class GQAAttention(nn.Module):
    """Grouped-query attention with per-head q/k RMSNorm (Qwen3).

    Under tensor parallelism each rank holds num_heads / tp query heads and the KV heads they
    read: num_kv_heads / tp of them, or, when tp > num_kv_heads (tp a multiple of it), one KV
    head replicated on the tp / num_kv_heads ranks whose query heads share it (as vLLM does).
    The KV cache holds the local KV heads only."""

    def __init__(self, cfg: ModelConfig, quant: str | None = None):
        super().__init__()
        tp, rank, _ = tp_world()
        heads, kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        if heads % tp:
            raise ValueError(f"num_attention_heads {heads} does not split over tp={tp}")
        if kv_heads % tp and tp % kv_heads:
            raise ValueError(f"num_key_value_heads {kv_heads} and tp={tp}: one must divide the other")
        self.num_heads = heads // tp
        self.num_kv_heads = max(1, kv_heads // tp)
        kv_start = rank * kv_heads // tp  # first KV head of this rank (shared with others when tp > kv_heads)
        hd = self.head_dim
        kv_rows = (kv_start * hd, self.num_kv_heads * hd)
        block = cfg.weight_block_size
        bias = cfg.attention_bias
        # q, k and v of the layer input in one GEMM; k and v take this rank's KV heads, not the
        # rank-th of tp slices.
        parts = [LinearPart("q_proj", heads * hd), LinearPart("k_proj", kv_heads * hd, segment=kv_rows),
                 LinearPart("v_proj", kv_heads * hd, segment=kv_rows)]
        self.qkv_proj = MergedColumnLinear(cfg.hidden_size, parts, bias=bias, quant=quant, block=block,
                                           name="qkv_proj")
        self.o_proj = row_parallel(heads * hd, cfg.hidden_size, bias=bias, quant=quant, block=block, name="o_proj")
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.rope, self.head_dim, cfg.max_position_embeddings, interleaved=False)
        self.scale = self.head_dim**-0.5
        self.kv_cache: torch.Tensor | None = None  # [2, num_blocks, block_size, num_kv_heads, head_dim]

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_dim)  # K and V

    def process_weights_after_loading(self, dtype: torch.dtype) -> None:
        pass

    @property
    def fp8_input_group(self) -> int:
        return self.qkv_proj.fp8_input_group

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(x, x_fp8))  # views: rows of unit stride
        k_cache, v_cache = self.kv_cache[0], self.kv_cache[1]
        # q and k's per-head norms, their rotation and the k/v cache writes: one kernel; q comes back
        # new and contiguous
        q = gqa_qkv_write(q.view(t, self.num_heads, self.head_dim), k.view(t, self.num_kv_heads, self.head_dim),
                          v.view(t, self.num_kv_heads, self.head_dim), self.q_norm.weight, self.k_norm.weight,
                          self.q_norm.eps, positions, self.rotary.cos_sin_cache, self.rotary.interleaved, k_cache,
                          v_cache, meta.slot_mapping)

        out = x.new_empty(t, self.num_heads, self.head_dim)
        nd = meta.num_decodes
        if nd:
            paged_decode(q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd],
                         self.scale, out=out[:nd])
        if meta.num_prefills:
            out[nd:] = paged_prefill(q[nd:], k_cache, v_cache, meta.block_tables[nd:], meta.query_lens[nd:],
                                     meta.seq_lens_cpu[nd:], self.scale, meta.memo)
        return self.o_proj(out.view(t, self.num_heads * self.head_dim))
