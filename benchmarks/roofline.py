"""The memory roofline of a decode step: the bytes one step must read from HBM, over the copy
bandwidth measured on the same device in the same run.

A decode step at batch B and context C reads every dense weight once, the routed experts that
at least one of the B tokens picked (expected count under uniform routing: E * (1 - (1 - k/E)^B)),
the shared experts (every token's; also when fused into the routed experts' stacks as their last
slots, layers/moe.py), the lm_head, and each sequence's KV cache (C tokens x cache bytes per token
per layer).
"""

from __future__ import annotations

import torch

from moeserve.config import ModelConfig


def expected_experts_hit(num_experts: int, top_k: int, batch: int) -> float:
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)


def decode_step_bytes(model: torch.nn.Module, cfg: ModelConfig, batch: int, context: int,
                      kv_bytes_per_token_per_layer: int) -> dict[str, float]:
    """Bytes a decode step must read, split into weights, experts and KV cache."""
    expert_bytes = other_bytes = 0
    for name, p in model.named_parameters():
        if name.startswith("mtp_layers") or name.endswith("embed_tokens.weight"):
            continue  # MTP is not run; the embedding reads only B rows
        nbytes = p.numel() * p.element_size()
        if ".mlp.experts." in name:
            # fused shared experts: the last num_shared slots of the stack, always read
            shared = getattr(model.get_submodule(name.rsplit(".", 1)[0]), "num_shared", 0)
            shared_bytes = nbytes * shared // p.shape[0]
            expert_bytes += nbytes - shared_bytes
            other_bytes += shared_bytes
        else:
            other_bytes += nbytes
    hit = expected_experts_hit(cfg.n_routed_experts, cfg.num_experts_per_tok, batch) / max(cfg.n_routed_experts, 1)
    kv = batch * context * kv_bytes_per_token_per_layer * cfg.num_hidden_layers
    return {"weights": other_bytes, "experts": expert_bytes * hit, "kv": kv,
            "total": other_bytes + expert_bytes * hit + kv}


def kv_bytes_per_token_per_layer(cfg: ModelConfig, dtype_bytes: int) -> int:
    if cfg.is_mla:
        return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * dtype_bytes
    return 2 * cfg.num_key_value_heads * cfg.head_dim * dtype_bytes


def measure_copy_bandwidth(device: str = "cuda", nbytes: int = 2 << 30, iters: int = 20) -> float:
    """Bytes moved per second (read + write counted) by a large device-to-device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * nbytes / times[len(times) // 2]
