"""Fused MoE: route each token to its top-k experts, run gate_up -> SiLU*mul -> down, and
sum the expert outputs weighted by the router. Expert weights are stacked:
w13 [E, 2*I, H] (gate rows, then up rows) and w2 [E, H, I].
An expert id < 0 means "not computed here" (an expert on another rank) and adds nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeserve.kernels.fp8 import dequant_block_fp8_ref


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, w13_scale: torch.Tensor | None = None,
                  w2_scale: torch.Tensor | None = None, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """x [T, H], topk_weights [T, k] (fp32), topk_ids [T, k] -> [T, H] in x.dtype.

    With w13_scale/w2_scale the weights are e4m3 with one scale per `block` (DeepSeek's format).
    Computes in fp32 per expert, looping only over experts that received tokens.
    """
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    if x.shape[0] == 0:
        return out.to(x.dtype)
    flat_ids = topk_ids.reshape(-1)
    token_of = torch.arange(x.shape[0], device=x.device).repeat_interleave(topk_ids.shape[1])
    weight_of = topk_weights.reshape(-1).to(torch.float32)
    for e in torch.unique(flat_ids).tolist():
        if e < 0:
            continue
        sel = (flat_ids == e).nonzero(as_tuple=True)[0]
        tok = token_of[sel]
        w_gate_up = w13[e] if w13_scale is None else dequant_block_fp8_ref(w13[e], w13_scale[e], block)
        w_down = w2[e] if w2_scale is None else dequant_block_fp8_ref(w2[e], w2_scale[e], block)
        h = x[tok].to(torch.float32) @ w_gate_up.to(torch.float32).t()
        gate, up = h.chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ w_down.to(torch.float32).t()
        out.index_add_(0, tok, y * weight_of[sel, None])
    return out.to(x.dtype)


fused_moe = fused_moe_ref
