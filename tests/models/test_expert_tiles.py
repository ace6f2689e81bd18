"""Experts stored in tiles (moe_config.EXPERT_WEIGHT_TILE, on a GPU for FP8 experts): the model loaded,
then its experts tiled by Experts.process_weights_after_loading, gives the logits of the row-major
model bit for bit. On CPU the tiles are forced (moe_config.expert_weight_tile only tiles on a GPU) and
the fused MoE's reference reads them back row-major; the kernel's reading of tiles is checked under
the interpreter and on the GPU in tests/kernels/test_fused_moe.py, the engine's tokens by
benchmarks/step_attribution.py (expert_rows against base, docs/perf/engine_v2lite.md)."""

from __future__ import annotations

import pytest
import torch

from moeserve.kernels import moe_config
from moeserve.kernels.fused_moe import untile_expert_weights
from moeserve.layers.moe import Experts
from tests.models.test_shared_experts_fusion import build, checkpoint, run_steps


def test_experts_stay_row_major_on_cpu(tiny_model, tmp_path_factory):
    model = build(checkpoint(tiny_model, tmp_path_factory, "v2-fp8"), True)
    assert all(m.w_tile is None for m in model.modules() if isinstance(m, Experts))


@pytest.mark.parametrize("name", ["v2-fp8", "v3", "v3-fp8"])
def test_tiled_experts_give_the_row_major_logits(tiny_model, tmp_path_factory, monkeypatch, name):
    model = build(checkpoint(tiny_model, tmp_path_factory, name), True)
    want = run_steps(model)
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    rows = [(m.w13.clone(), m.w2.clone()) for m in experts]
    tile = (16, 16)  # the tiny widths (H 64, I 32) in whole tiles
    monkeypatch.setattr(moe_config, "expert_weight_tile", lambda *args: tile)
    model.process_weights_after_loading(torch.float32)
    for m, (w13, w2) in zip(experts, rows):
        assert m.w_tile == tile and not torch.equal(m.w13.view(torch.uint8), w13.view(torch.uint8))
        assert torch.equal(untile_expert_weights(m.w13, tile), w13) and torch.equal(untile_expert_weights(m.w2, tile), w2)
    model.process_weights_after_loading(torch.float32)  # a second call leaves the tiles as they are
    assert all(torch.equal(untile_expert_weights(m.w13, tile), w13) for m, (w13, _) in zip(experts, rows))
    for got, ref in zip(run_steps(model), want):
        assert torch.equal(got, ref)
