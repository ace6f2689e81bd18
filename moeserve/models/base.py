"""The decoder shared by every supported model: embed -> N x (attention, MLP/MoE) -> norm -> lm_head.

Architectures differ only in the attention they build (MLA or GQA), which layers are MoE,
and DeepSeek-V3's optional MTP layers; they plug in through `build_attention` and `build_mlp`.
Module names follow the Hugging Face checkpoints, so most weights load by name.

Interface the engine uses:
  forward(input_ids [T], positions [T], meta) -> hidden [T, H] (final-normed)
  compute_logits(hidden [N, H]) -> fp32 logits [N, V]
  attention_layers() -> attention modules in cache order; each has `kv_cache` (set by the engine)
  and `kv_cache_shape(num_blocks, block_size)`.
"""

from __future__ import annotations

import torch
from torch import nn

from moeserve.config import ModelConfig
from moeserve.layers.attention import AttentionMetadata, GQAAttention, MLAAttention
from moeserve.layers.linear import Linear, lm_head, vocab_embedding
from moeserve.layers.moe import MLP, Experts, MoE
from moeserve.layers.norm import RMSNorm


def build_attention(cfg: ModelConfig, quant: str | None) -> nn.Module:
    return MLAAttention(cfg, quant) if cfg.is_mla else GQAAttention(cfg, quant)


def build_mlp(cfg: ModelConfig, layer_idx: int, quant: str | None) -> nn.Module:
    if cfg.is_moe_layer(layer_idx):
        return MoE(cfg, quant)
    return MLP(cfg.hidden_size, cfg.intermediate_size, quant, cfg.weight_block_size)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, quant: str | None):
        super().__init__()
        self.self_attn = build_attention(cfg, quant)
        self.mlp = build_mlp(cfg, layer_idx, quant)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm block with the residual add fused into the next norm; returns (out, residual), out a
        tensor or a MoE's fused_moe.ExpertRows (for that norm, which takes either).
        Where attention or MLP starts with an FP8 GEMM, its norm also hands it the quantized input."""
        h, residual, h_fp8 = self.input_layernorm.norm_residual(x, residual, self.self_attn.fp8_input_group)
        h = self.self_attn(h, positions, meta, h_fp8)
        h, residual, h_fp8 = self.post_attention_layernorm.norm_residual(h, residual, self.mlp.fp8_input_group)
        # A MoE may hand back its rows before their sum (fused_moe.ExpertRows): the next norm, which
        # every layer's output goes to, sums them itself (one launch less a layer).
        return (self.mlp(h, h_fp8, sum_rows=False) if isinstance(self.mlp, MoE) else self.mlp(h, h_fp8)), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: str | None):
        super().__init__()
        self.embed_tokens = vocab_embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, quant) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, meta)
        return self.norm(x, residual)[0]


class MTPLayer(nn.Module):
    """DeepSeek-V3 multi-token prediction module (checkpoint: model.layers.{num_hidden_layers + i}.*).

    Predicts token t+2 from the main model's hidden state at t and the embedding of token t+1.
    Loaded and kept for speculative decoding; the embedding is shared with the main model.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, quant: str | None):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size)
        self.block = DecoderLayer(cfg, layer_idx, quant)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.shared_head.head = lm_head(cfg.hidden_size, cfg.vocab_size)

    def forward(self, input_embeds: torch.Tensor, prev_hidden: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x = self.eh_proj(torch.cat((self.enorm(input_embeds), self.hnorm(prev_hidden)), dim=-1))
        x, residual = self.block(x, None, positions, meta)
        return self.shared_head.norm(x, residual)[0]


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: str | None = None, num_mtp_layers: int = 0):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, quant)
        self.lm_head = lm_head(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.mtp_layers = nn.ModuleList(MTPLayer(cfg, cfg.num_hidden_layers + i, quant)
                                        for i in range(num_mtp_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).to(torch.float32)

    def attention_layers(self) -> list[nn.Module]:
        """Attention modules that own a KV cache: the decoder layers', then the MTP layers'."""
        return [layer.self_attn for layer in self.model.layers] + [m.block.self_attn for m in self.mtp_layers]

    def process_weights_after_loading(self, dtype: torch.dtype) -> None:
        for attn in self.attention_layers():
            attn.process_weights_after_loading(dtype)
        for module in self.modules():
            if isinstance(module, Experts):
                module.tile_for_kernels()
