"""MoE routing: router logits [T, E] -> top-k expert weights and ids, in fp32.

Scoring and selection, as DeepSeek and Qwen3 define them (RoutingConfig says which):
- softmax scores (DeepSeek-V2, Qwen3): greedy top-k, or group_limited_greedy (keep the topk_group
  groups with the highest max score, then top-k inside them);
- sigmoid scores with e_score_correction_bias (DeepSeek-V3 noaux_tc): the bias only chooses
  experts (groups ranked by the sum of their top-2 biased scores, unchosen groups masked with
  -inf); the weights are the unbiased scores.
Then optionally renormalised over the k chosen, times routed_scaling_factor.

With num_fused_shared = S > 0 (DeepSeek's shared experts run as S extra expert slots E..E+S-1 of
the fused MoE pass, layers/moe.py) every row gets S more columns after its k: ids E, ..., E+S-1 and
weight 1.0 (the scaling factor applies to the routed weights only), so the outputs are [T, k+S].

select_experts_ref is about ten torch kernels (casts, softmax, topk, gather, the group masks,
the sums); the Triton kernel does it all in one launch, one program per token row (E <= 1024).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeserve.kernels.rmsnorm import _use_triton, triton

MAX_TRITON_EXPERTS = 1024  # one program holds a row of scores in registers


@dataclass(frozen=True)
class RoutingConfig:
    top_k: int
    scoring: str = "softmax"  # "softmax" | "sigmoid"
    topk_method: str = "greedy"  # "greedy" | "group_limited_greedy" | "noaux_tc"
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    num_fused_shared: int = 0  # trailing columns: ids E..E+S-1 (the shared experts' slots), weight 1.0

    @classmethod
    def from_model(cls, cfg) -> "RoutingConfig":
        return cls(cfg.num_experts_per_tok, cfg.scoring_func, cfg.topk_method, cfg.n_group, cfg.topk_group,
                   cfg.norm_topk_prob, cfg.routed_scaling_factor)

    @property
    def grouped(self) -> bool:
        return self.topk_method in ("group_limited_greedy", "noaux_tc") and self.n_group > 1


def select_experts_ref(router_logits: torch.Tensor, cfg: RoutingConfig,
                       correction_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (topk_weights [T, k] fp32, topk_ids [T, k] int64), ids in no
    particular order within a row; then, with cfg.num_fused_shared = S, S more columns of ids
    E..E+S-1 (in order) and weight 1.0: [T, k+S]."""
    logits = router_logits.to(torch.float32)
    num_experts = logits.shape[-1]
    if cfg.scoring == "sigmoid":
        scores = logits.sigmoid()
    else:
        scores = logits.softmax(dim=-1)
    choice = scores if correction_bias is None else scores + correction_bias.to(torch.float32)
    if cfg.grouped:
        grouped = choice.view(-1, cfg.n_group, num_experts // cfg.n_group)
        if cfg.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.max(dim=-1).values
        group_idx = group_scores.topk(cfg.topk_group, dim=-1, sorted=False).indices
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(-1, num_experts).bool()
        # V3 masks unchosen groups with -inf; V2 with 0 (all its scores are positive softmax values).
        choice = choice.masked_fill(~expert_mask, float("-inf") if cfg.topk_method == "noaux_tc" else 0.0)
    topk_ids = choice.topk(cfg.top_k, dim=-1, sorted=False).indices
    topk_weights = scores.gather(1, topk_ids)
    if cfg.norm_topk_prob:
        denom = topk_weights.sum(dim=-1, keepdim=True)
        topk_weights = topk_weights / (denom + 1e-20 if cfg.scoring == "sigmoid" else denom)
    topk_weights = topk_weights * cfg.routed_scaling_factor
    if cfg.num_fused_shared:
        tokens, shared = logits.shape[0], cfg.num_fused_shared
        shared_ids = torch.arange(num_experts, num_experts + shared, device=logits.device).expand(tokens, shared)
        topk_ids = torch.cat((topk_ids, shared_ids), dim=1)
        topk_weights = torch.cat((topk_weights, topk_weights.new_ones(tokens, shared)), dim=1)
    return topk_weights, topk_ids


if triton is not None:
    import triton.language as tl
    from moeserve.kernels.pdl import pdl_begin, pdl_launch

    @triton.jit
    def _routing_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, n_group, group_size, stride_l, scale,
                        TOP_K: tl.constexpr, TOPK_GROUP: tl.constexpr, SIGMOID: tl.constexpr,
                        HAS_BIAS: tl.constexpr, GROUP_SCORE: tl.constexpr, MASK_NEG_INF: tl.constexpr,
                        RENORM: tl.constexpr, G_PAD: tl.constexpr, EG_PAD: tl.constexpr, K_PAD: tl.constexpr,
                        NUM_SHARED: tl.constexpr = 0, PDL: tl.constexpr = False):
        pdl_begin(PDL)
        # One token row. The row is held as a [group, expert in group] tile (one group when
        # ungrouped), so group scores are row reductions. GROUP_SCORE: 0 none, 1 max, 2 top-2 sum.
        # The output row is TOP_K + NUM_SHARED wide: the fused shared experts' columns come last.
        row = tl.program_id(0).to(tl.int64)
        g = tl.arange(0, G_PAD)
        j = tl.arange(0, EG_PAD)
        expert = g[:, None] * group_size + j[None, :]
        valid = (g[:, None] < n_group) & (j[None, :] < group_size)
        x = tl.load(logits_ptr + row * stride_l + expert, mask=valid, other=float("-inf")).to(tl.float32)
        if SIGMOID:
            scores = 1.0 / (1.0 + tl.exp(-x))
        else:
            p = tl.exp(x - tl.max(tl.max(x, axis=1), axis=0))
            scores = p / tl.sum(tl.sum(p, axis=1), axis=0)
        scores = tl.where(valid, scores, 0.0)
        choice = scores
        if HAS_BIAS:
            choice += tl.load(bias_ptr + expert, mask=valid, other=0.0).to(tl.float32)
        choice = tl.where(valid, choice, float("-inf"))

        if GROUP_SCORE != 0:
            top1 = tl.max(choice, axis=1)
            if GROUP_SCORE == 1:
                group_score = top1
            else:  # the two largest of each group: drop the first maximum, take the max again
                first = tl.argmax(choice, axis=1)
                second = tl.max(tl.where(j[None, :] == first[:, None], float("-inf"), choice), axis=1)
                group_score = top1 + second
            group_score = tl.where(g < n_group, group_score, float("-inf"))
            keep = g < 0
            for _ in tl.static_range(TOPK_GROUP):
                best = tl.argmax(group_score, axis=0)
                keep = keep | (g == best)
                group_score = tl.where(g == best, float("-inf"), group_score)
            fill = float("-inf") if MASK_NEG_INF else 0.0
            choice = tl.where(keep[:, None], choice, fill)
            choice = tl.where(valid, choice, float("-inf"))

        # top-k by repeated argmax over the flattened tile (largest first)
        flat_choice = tl.reshape(choice, (G_PAD * EG_PAD,))
        flat_scores = tl.reshape(scores, (G_PAD * EG_PAD,))
        flat_expert = tl.reshape(expert, (G_PAD * EG_PAD,))
        pos = tl.arange(0, G_PAD * EG_PAD)
        k = tl.arange(0, K_PAD)
        ids = tl.zeros((K_PAD,), dtype=tl.int64)
        weights = tl.zeros((K_PAD,), dtype=tl.float32)
        for i in tl.static_range(TOP_K):
            best = tl.argmax(flat_choice, axis=0)
            hit = pos == best
            ids = tl.where(k == i, tl.sum(tl.where(hit, flat_expert, 0), axis=0).to(tl.int64), ids)
            weights = tl.where(k == i, tl.sum(tl.where(hit, flat_scores, 0.0), axis=0), weights)
            flat_choice = tl.where(hit, float("-inf"), flat_choice)
        if RENORM == 1:  # softmax weights: plain sum
            weights = weights / tl.sum(weights, axis=0)
        elif RENORM == 2:  # sigmoid weights: DeepSeek-V3 guards the division
            weights = weights / (tl.sum(weights, axis=0) + 1e-20)
        weights = weights * scale
        if NUM_SHARED > 0:  # the shared experts' slots E..E+S-1 (E = n_group * group_size), weight 1
            shared = k >= TOP_K
            ids = tl.where(shared, (n_group * group_size + k - TOP_K).to(tl.int64), ids)
            weights = tl.where(shared, 1.0, weights)
        width = TOP_K + NUM_SHARED
        out = k < width
        tl.store(w_ptr + row * width + k, weights, mask=out)
        tl.store(ids_ptr + row * width + k, ids, mask=out)


def select_experts_triton(router_logits: torch.Tensor, cfg: RoutingConfig,
                          correction_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """select_experts_ref in one launch; ids of a row largest choice first (then the fused shared
    experts' columns, written by the same launch)."""
    tokens, num_experts = router_logits.shape
    logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    width = cfg.top_k + cfg.num_fused_shared
    weights = torch.empty(tokens, width, dtype=torch.float32, device=logits.device)
    ids = torch.empty(tokens, width, dtype=torch.int64, device=logits.device)
    if tokens == 0:
        return weights, ids
    n_group = cfg.n_group if cfg.grouped else 1
    group_size = num_experts // n_group
    group_score = 0 if not cfg.grouped else (2 if cfg.topk_method == "noaux_tc" else 1)
    renorm = 0 if not cfg.norm_topk_prob else (2 if cfg.scoring == "sigmoid" else 1)
    bias = correction_bias if correction_bias is not None else weights  # a stand-in pointer when absent
    g_pad, eg_pad = triton.next_power_of_2(n_group), triton.next_power_of_2(group_size)
    _routing_kernel[(tokens,)](
        logits, bias, weights, ids, n_group, group_size, logits.stride(0), float(cfg.routed_scaling_factor),
        TOP_K=cfg.top_k, TOPK_GROUP=cfg.topk_group, SIGMOID=cfg.scoring == "sigmoid",
        HAS_BIAS=correction_bias is not None, GROUP_SCORE=group_score, MASK_NEG_INF=cfg.topk_method == "noaux_tc",
        RENORM=renorm, G_PAD=g_pad, EG_PAD=eg_pad, K_PAD=triton.next_power_of_2(width),
        NUM_SHARED=cfg.num_fused_shared, num_warps=1 if g_pad * eg_pad <= 128 else 2, **pdl_launch(logits.device))
    return weights, ids


def select_experts(router_logits: torch.Tensor, cfg: RoutingConfig,
                   correction_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel where it runs (CUDA; CPU under the interpreter in fp32/fp16), else the reference."""
    num_experts = router_logits.shape[-1]
    if (router_logits.dim() == 2 and _use_triton(*(t for t in (router_logits, correction_bias) if t is not None))
            and num_experts <= MAX_TRITON_EXPERTS and num_experts % (cfg.n_group if cfg.grouped else 1) == 0):
        return select_experts_triton(router_logits, cfg, correction_bias)
    return select_experts_ref(router_logits, cfg, correction_bias)
