"""benchmarks/step_attribution.py (GPU only to run): each variant changes what it says it changes.
Checked on CPU in a fresh process per variant (the patches are process-wide), without an engine."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHECKS = {  # variant: what must hold after apply(variant)
    "base": "fused_moe.moe_sum.__name__ == 'moe_sum' and attention.mla_decode.__name__ == 'mla_decode'",
    "no_quant": "fused_moe.per_token_group_quant_fp8_triton.__name__ == 'fake' == fp8.per_token_group_quant_fp8_triton.__name__",
    "no_moe_sum": "fused_moe.moe_sum(None, None, 'out') == 'out'",
    "no_mla": "attention.mla_decode('q', 1, 2) == 'q'",
    "no_norm_quant": "RMSNorm(8).norm_residual(torch.ones(2, 8), None, 4)[2] is None",
    "act_quant_in_gate_up_st2": ("moe_config.ACT_QUANT_IN_GATE_UP and moe_config.moe_config("
                                 "64, 66, 2048, 1408, 8, 'fp8', torch.device('cpu'), 2)['num_stages'] == 2"),
    "mla_st3": "attention_triton.MLA_TILES[3] == 3",
    "no_moe_quant+down_no_wait": ("fused_moe.per_token_group_quant_fp8_triton.__name__ == 'fake' "
                                  "and fused_moe._launch_moe_gemm.__name__ == 'launch_down_early' "
                                  "and fused_moe.pdl_begin.__name__ == 'begin' and not moe_config.DOWN_WAITS_PER_BLOCK "
                                  "and not moe_config.ACT_QUANT_BY_LAST_TILE"),
    "down_grid_wait": "not moe_config.DOWN_WAITS_PER_BLOCK and moe_config.ACT_QUANT_BY_LAST_TILE",
    "act_quant_launch": "moe_config.DOWN_WAITS_PER_BLOCK and not moe_config.ACT_QUANT_BY_LAST_TILE",
    "dense_m32_bn64_sk4_st6": ("moe_config.dense_fp8_config(64, 2048, 2048, torch.device('cpu'))['SPLIT_K'] == 4 "
                           "and moe_config.dense_fp8_config(64, 2048, 2048, torch.device('cpu'))['BLOCK_M'] == 32 "
                           "and moe_config.dense_fp8_config(64, 2048, 2048, torch.device('cpu'))['num_stages'] == 6 "
                           "and moe_config.dense_fp8_config(1, 2048, 2048, torch.device('cpu'))['BLOCK_M'] == 16"),
    "moe_dn_bn64_st6": ("[moe_config.down_config(moe_config.moe_config(64, 66, 2048, 1408, 8, 'fp8', "
                        "torch.device('cpu'), 2))[key] for key in ('BLOCK_N', 'num_stages')] == [64, 6]"),
    "moe_gu_st7": "moe_config.moe_config(64, 66, 2048, 1408, 8, 'fp8', torch.device('cpu'), 2)['num_stages'] == 7",
    "kv_fp8": "sa.ENGINE_KWARGS == {'kv_cache_dtype': 'fp8'}",
    "page64+mla_tile_in_page0": "sa.ENGINE_KWARGS == {'block_size': 64} and not attention_triton.MLA_TILE_IN_PAGE",
    "mla_res3": "attention_triton.MLA_RESIDENT == 3",
    "fp8_scale_columns": "not moe_config.DENSE_FP8_SCALE_PER_TILE",
    "moe_gu_r96": ("moe_config.moe_config(64, 66, 2048, 1408, 8, 'fp8', torch.device('cpu'), 2)['maxnreg'] == 96 "
                   "and 'maxnreg' not in moe_config.moe_config(1, 66, 2048, 1408, 8, 'fp8', torch.device('cpu'), 2)"),
    "no_dense": ("(Linear(8, 4)(torch.ones(2, 3, 8)) == torch.zeros(2, 3, 4)).all() "
                 "and Linear(8, 32000)(torch.ones(2, 8)).shape == (2, 32000) "
                 "and Linear(8, 4)(torch.ones(2, 3, 8)) is Linear(8, 4)(torch.ones(2, 3, 8))"),
}


@pytest.mark.parametrize("variant", sorted(CHECKS))
def test_variant_patches(variant):
    code = (f"import sys, torch; sys.path.insert(0, 'benchmarks'); import step_attribution as sa; sa.apply({variant!r})\n"
            "import moeserve.kernels.attention_triton as attention_triton, moeserve.kernels.fp8 as fp8\n"
            "import moeserve.kernels.fused_moe as fused_moe, moeserve.kernels.moe_config as moe_config\n"
            "import moeserve.layers.attention as attention\n"
            "from moeserve.layers.norm import RMSNorm\n"
            "from moeserve.layers.linear import Linear\n"
            f"assert {CHECKS[variant]}\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_unknown_variant_is_refused():
    code = "import sys; sys.path.insert(0, 'benchmarks'); import step_attribution as sa; sa.apply('no_such')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unknown variant" in proc.stderr
