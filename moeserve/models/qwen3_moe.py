"""Qwen3-MoE: GQA attention with per-head q/k RMSNorm, MoE blocks every `decoder_sparse_step`
layers except `mlp_only_layers`, softmax top-k routing with optional renormalisation, no
shared experts. The decoder itself is models/base.py."""

from __future__ import annotations

from moeserve.models.base import CausalLM


class Qwen3MoeForCausalLM(CausalLM):
    pass
