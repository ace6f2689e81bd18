"""The MoE block with tensor parallelism inside data-parallel attention + expert parallelism
(4 gloo ranks: dp 2 x tp 2, ep 4) equals the single-process block (fp32 activations), for both
dispatch backends and FP8 block-scaled weights, with skewed routing (ranks 2 and 3 hold no
chosen expert), uneven row shares (a TP rank with no rows), a data-parallel group with no tokens
at all and a padding-only (dummy) row; both TP ranks of a group end with the same rows, and the
balancer counts each token once."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from ep_launch import run_ranks
from moeserve.config import ModelConfig
from moeserve.distributed.ep_moe import EPRuntime, expert_counts, gather_shares, row_share
from moeserve.distributed.groups import build_parallel_state, set_parallel_state
from moeserve.layers.moe import MoE
from moeserve.models.tiny import TINY_CONFIGS

DP, TP = 2, 2
# Per step: (real tokens, rows) of data-parallel groups 0 and 1. Step 1: shares 3+2, and 2+1 where
# the one row of group 1's TP rank 1 is padding (a CUDA-graph batch); step 2: group 0 has one
# token (its TP rank 1 gets no row), group 1 runs one padding row (the engine's dummy batch);
# step 3: group 1 has no rows at all; step 4: shares 2+2 and 4+3.
STEPS = [((5, 5), (2, 3)), ((1, 1), (0, 1)), ((2, 2), (0, 0)), ((4, 4), (7, 7))]
# (dispatch backend, weight format): FP8 is DeepSeek's block format with 16x16 blocks (the tiny
# shapes are 64 and 32 wide), for routed and shared experts alike.
VARIANTS = [("ht", None), ("ll", None), ("ht", "fp8")]


def _config() -> ModelConfig:
    # DeepSeek-V3 routing: sigmoid + correction bias, 4 groups (keep 2), top-4 of 16, one shared expert.
    cfg = ModelConfig.from_dict({"architectures": ["DeepseekV3ForCausalLM"], **TINY_CONFIGS["deepseek_v3"]})
    cfg.weight_block_size = (16, 16)
    return cfg


def _reference(cfg: ModelConfig, quant: str | None) -> MoE:
    torch.manual_seed(0)
    # Under expert parallelism the shared experts stay a separate MLP: so does the single-process
    # reference here (its parameters copy over by name).
    layer = MoE(dataclasses.replace(cfg, fuse_shared_experts=False), quant)
    assert layer.shared_experts is not None
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "scale" in name.rsplit(".", 1)[-1]:
                p.copy_(0.05 + 0.05 * torch.rand(p.shape))  # times e4m3 values of magnitude ~1
            else:
                p.copy_(torch.randn(p.shape) * (0.1 if p.dtype == torch.float32 else 1.0))
        layer.gate.e_score_correction_bias.zero_()
        # Skew: the bias picks experts 0-7 (groups 0 and 1) for every token, so the experts of
        # ranks 2 and 3 (8-15 of 16) receive nothing.
        layer.gate.e_score_correction_bias[:8] = 5.0
    return layer


def _rank(rank, world):
    cfg = _config()
    state = build_parallel_state(tp=TP, dp=DP, ep=DP * TP)
    out = {}
    for backend, quant in VARIANTS:
        set_parallel_state(None)
        ref = _reference(cfg, quant)
        params = dict(ref.named_parameters())
        rt = EPRuntime(state.ep_group, world, cfg.n_routed_experts, cfg.hidden_size, torch.float32,
                       torch.device("cpu"), mode=backend, ll_capacity=4, eplb_interval=1000, eplb_window=8, tp=TP)
        state.ep_runtime = rt
        set_parallel_state(state)
        layer = MoE(cfg, quant)
        set_parallel_state(None)
        assert layer.experts.quant == quant and layer.token_shares
        with torch.no_grad():
            for name, p in layer.named_parameters():
                full = params[name]
                p.copy_(full[layer.experts.slot_experts] if name.startswith("experts.w") else full)
        rt.start()
        steps, expected = [], torch.zeros(cfg.n_routed_experts, dtype=torch.int64)
        for i, groups in enumerate(STEPS):
            real, rows = groups[state.dp_rank]
            g = torch.Generator().manual_seed(100 * i + state.dp_rank)  # the same rows on both TP ranks
            x = torch.randn(rows, cfg.hidden_size, generator=g)
            rt.begin_step(real, max(r for r, _ in groups))
            with torch.no_grad():
                y = layer(x)
                y_ref = ref(x[:real])
            rt.after_step()
            # lists: tensors sent through the result queue would need this process alive
            steps.append({"y": y[:real].tolist(), "ref": y_ref.tolist(), "rows": tuple(y.shape)})
            if state.tp_rank == 0 and real:  # each of the group's tokens once
                expected += expert_counts(ref.gate(x[:real])[1], cfg.n_routed_experts)
        dist.all_reduce(expected)
        out[(backend, quant)] = {"steps": steps, "counted": rt.balancer.window_load()[0].tolist(),
                        "expected": expected.tolist(), "slots": layer.experts.slot_experts}
    return out


def _rel(pairs) -> float:
    pairs = [(torch.tensor(a).reshape(-1), torch.tensor(b).reshape(-1)) for a, b in pairs]
    err = sum(float((a - b).pow(2).sum()) for a, b in pairs)
    ref = sum(float(b.pow(2).sum()) for _, b in pairs)
    return (err / ref) ** 0.5


def test_row_shares_and_gather():
    assert [row_share(5, 2, r) for r in range(2)] == [(0, 3), (3, 2)]
    assert [row_share(5, 4, r) for r in range(4)] == [(0, 2), (2, 1), (3, 1), (4, 1)]
    assert [row_share(1, 2, r) for r in range(2)] == [(0, 1), (1, 0)]
    assert gather_shares(torch.ones(3, 2), 3, 1, None).shape == (3, 2)  # tp 1: nothing to gather


def test_tp2_inside_dp2_ep4_equals_single_process():
    results = run_ranks(_rank, DP * TP, timeout_s=90)
    for variant in VARIANTS:
        per_rank = [r[variant] for r in results]
        assert [r["slots"] for r in per_rank] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
        for i, groups in enumerate(STEPS):
            for rank, r in enumerate(per_rank):
                assert r["steps"][i]["rows"] == (groups[rank // TP][1], 64), (variant, i, rank)
            # Both TP ranks of a group hold the very same rows after the gather.
            for group in range(DP):
                a, b = (per_rank[group * TP + t]["steps"][i]["y"] for t in range(TP))
                assert a == b, (variant, i, group)
        pairs = [(s["y"], s["ref"]) for r in per_rank for s in r["steps"]]
        assert _rel(pairs) < 1e-5, (variant, _rel(pairs))
        # The balancer saw each real token's K experts once (not once per TP rank, no padding),
        # all of them on ranks 0 and 1.
        counted, expected = per_rank[0]["counted"], per_rank[0]["expected"]
        assert counted == expected and sum(counted) == 4 * sum(real for groups in STEPS for real, _ in groups)
        assert sum(counted[8:]) == 0
