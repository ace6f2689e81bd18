"""Tensor-parallel models over gloo ranks against the single process, below the engine: the same
checkpoint (or the same dummy weights) through 2 or 4 TP ranks gives the single process's logits
(fp32, relative error < 1e-5) over prefill, mixed decode + prefill and decode steps, on every
rank (the head gathers the full vocabulary). Covers MLA with and without q_lora (heads split,
latent cache replicated), GQA's merged q/k/v with kv heads split (tp 2) and replicated (tp 4 > 2
kv heads; with attention biases too), a vocabulary that does not split evenly (509 ids: padded
shards), FP8 block-scaled weights (MLA, and GQA with kv heads split and replicated), and each rank
holding only its share of the weights. DeepSeek's shared experts run fused into the routed experts'
slots (the default) and, in one case, as a separate MLP (tests/models/test_shared_experts_fusion.py
checks the fused slots' contents rank by rank)."""

from __future__ import annotations

import pytest
import torch

from ep_launch import run_ranks
from moeserve.config import ModelConfig
from moeserve.distributed.groups import build_parallel_state, set_parallel_state
from moeserve.models.loader import check_tensor_parallel, load_model
from tests.helpers import run_model_steps

BLOCK = 4
# (seq id -> new tokens) per step; decodes first, as the engine schedules them
STEPS = [{0: [5, 9, 13, 2, 7, 7, 31, 8, 100]},
         {0: [11], 1: [3, 4, 5, 6, 200, 17, 9]},
         {0: [12], 1: [40]}]
TABLES = {0: [3, 1, 7], 1: [5, 2, 9]}


def run_model(path: str, load_format: str, fuse_shared: bool = True) -> tuple[list[torch.Tensor], int]:
    """Logits of every step, and the number of weight values this process holds."""
    torch.set_num_threads(1)
    cfg = ModelConfig.from_pretrained(path)
    cfg.fuse_shared_experts = fuse_shared
    model = load_model(cfg, path, torch.float32, "cpu", load_format, seed=0)
    out = run_model_steps(model, STEPS, TABLES, BLOCK)
    return out, sum(p.numel() for p in model.parameters())


def _tp_rank(rank: int, world: int, path: str, load_format: str, fuse_shared: bool = True):
    set_parallel_state(build_parallel_state(tp=world, dp=1, ep=1))
    try:
        logits, params = run_model(path, load_format, fuse_shared)
        return [t.numpy() for t in logits], params  # plain arrays: the rank exits before the parent reads
    finally:
        set_parallel_state(None)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


CASES = {
    "v3-vocab509": ("deepseek_v3", dict(vocab_size=509), "auto", 2),
    "v3-dummy": ("deepseek_v3", dict(vocab_size=509), "dummy", 2),
    "v2": ("deepseek_v2", {}, "auto", 2),
    "v2-unfused-shared": ("deepseek_v2", {}, "auto", 2),  # the shared experts as a separate MLP
    "qwen3-tp2": ("qwen3_moe", {}, "auto", 2),
    "qwen3-tp4-kv-replicated": ("qwen3_moe", {}, "auto", 4),
    "qwen3-tp4-bias": ("qwen3_moe", dict(attention_bias=True), "auto", 4),  # q/k/v biases of shared KV heads
    "qwen3-tp4-dummy": ("qwen3_moe", {}, "dummy", 4),  # each rank's rows of the one-process qkv_proj
}


@pytest.mark.parametrize("case", list(CASES))
def test_tp_logits_equal_single_process(tiny_model, case):
    arch, overrides, load_format, tp = CASES[case]
    fuse = not case.endswith("unfused-shared")
    path = tiny_model(arch, **overrides)
    ref, ref_params = run_model(path, load_format, fuse)
    ranks = run_ranks(_tp_rank, tp, path, load_format, fuse, timeout_s=120)
    for rank, (logits, params) in enumerate(ranks):
        for step, (got, want) in enumerate(zip(map(torch.from_numpy, logits), ref)):
            assert got.shape == want.shape
            assert rel_err(got, want) < 1e-5, (rank, step, rel_err(got, want))
        # Attention, MLPs, experts, embedding and head are split; norms, routers, q_a/kv_a replicated.
        assert params < (0.7 if tp == 2 else 0.5) * ref_params, (params, ref_params)


FP8_CASES = {
    "v3": ("deepseek_v3", {}, 2),
    "v2": ("deepseek_v2", {}, 2),  # 2 shared experts fused into 2 slots, each split over the ranks
    "qwen3-tp2": ("qwen3_moe", {}, 2),
    # one 16-row KV head on each pair of ranks; 64 expert rows over 4 ranks keep 16-row blocks
    "qwen3-tp4-kv-replicated": ("qwen3_moe", dict(moe_intermediate_size=64), 4),
}


@pytest.mark.parametrize("case", list(FP8_CASES))
def test_tp_fp8_block_checkpoint(tiny_model, tmp_path, case):
    """FP8 block-scaled weights (16x16 blocks, so the tiny shapes split on block boundaries): the
    shards hold whole blocks and their scales; activations are quantized per group of the local
    input slice, the same groups as in one process, so the logits agree to rounding."""
    from moeserve.models.tiny import convert_to_fp8

    arch, overrides, tp = FP8_CASES[case]
    src = tiny_model(arch, weight_std=0.02, **overrides)
    path = convert_to_fp8(src, str(tmp_path / "fp8"), block=(16, 16))
    ref, _ = run_model(path, "auto")
    ranks = run_ranks(_tp_rank, tp, path, "auto", timeout_s=120)
    for logits, _ in ranks:
        for got, want in zip(map(torch.from_numpy, logits), ref):
            assert rel_err(got, want) < 1e-4
            assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_tp_shape_errors_name_the_layer(tiny_model, tmp_path):
    from moeserve.models.tiny import convert_to_fp8

    v3 = ModelConfig.from_pretrained(tiny_model("deepseek_v3"))
    check_tensor_parallel(v3, 2)
    check_tensor_parallel(v3, 4)
    with pytest.raises(ValueError, match="num_attention_heads 4 does not split over tp=3"):
        check_tensor_parallel(v3, 3)
    # DeepSeek's 128x128 blocks: q_b_proj's 128 rows over 2 ranks are 64, half a block
    fp8 = ModelConfig.from_pretrained(convert_to_fp8(tiny_model("deepseek_v3"), str(tmp_path / "fp8")))
    with pytest.raises(ValueError, match=r"q_b_proj: output size 128 split over tp=2 gives 64 per rank, not a "
                                         r"multiple of the FP8 weight block 128"):
        check_tensor_parallel(fp8, 2)
    qwen = ModelConfig.from_pretrained(tiny_model("qwen3_moe"))
    qwen.num_attention_heads, qwen.num_key_value_heads = 12, 4
    with pytest.raises(ValueError, match="num_key_value_heads 4 and tp=6: one must divide the other"):
        check_tensor_parallel(qwen, 6)
    qwen.num_attention_heads, qwen.num_key_value_heads, qwen.moe_intermediate_size = 4, 2, 30
    with pytest.raises(ValueError, match="moe_intermediate_size 30 does not split over tp=4"):
        check_tensor_parallel(qwen, 4)
    # FP8 with 16-row blocks: 8 query heads of 8 split over 4 ranks are 16 rows each, but the KV
    # head each rank shares with another is 8 rows, half a block
    qwen.num_attention_heads, qwen.head_dim, qwen.moe_intermediate_size = 8, 8, 64
    qwen.quant_method, qwen.weight_block_size = "fp8", (16, 16)
    with pytest.raises(ValueError, match=r"qkv_proj: k_proj output size 16 split over tp=4 gives 8 per rank, not a "
                                         r"multiple of the FP8 weight block 16"):
        check_tensor_parallel(qwen, 4)
