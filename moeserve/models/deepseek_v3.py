"""DeepSeek-V3/R1 and DeepSeek-V2: MLA attention, DeepSeekMoE (grouped top-k, shared experts), MTP.

The decoder itself is models/base.py; this module holds what is DeepSeek-specific: the
architectures' names and where the MTP layers live in DeepSeek's checkpoints.
"""

from __future__ import annotations

import re

from moeserve.config import ModelConfig
from moeserve.models.base import CausalLM


class DeepseekV3ForCausalLM(CausalLM):
    pass


class DeepseekV2ForCausalLM(CausalLM):
    pass


def mtp_param_name(cfg: ModelConfig, name: str) -> str | None:
    """Map a checkpoint name under model.layers.{num_hidden_layers + i} to our MTP module's name.

    Returns "" for tensors to skip (the MTP layer's copy of the shared embedding), None when
    `name` is not an MTP tensor.
    """
    m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
    if not m or int(m.group(1)) < cfg.num_hidden_layers:
        return None
    idx, rest = int(m.group(1)) - cfg.num_hidden_layers, m.group(2)
    if rest.startswith("embed_tokens."):
        return ""
    if rest.split(".")[0] in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
        return f"mtp_layers.{idx}.block.{rest}"
    return f"mtp_layers.{idx}.{rest}"


def num_mtp_layers_in(cfg: ModelConfig, names: set[str]) -> int:
    """How many MTP layers the checkpoint actually holds (config may announce some it does not ship)."""
    count = 0
    while any(n.startswith(f"model.layers.{cfg.num_hidden_layers + count}.") for n in names):
        count += 1
    return min(count, cfg.num_nextn_predict_layers)
