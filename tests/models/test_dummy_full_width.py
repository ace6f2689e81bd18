"""A DeepSeek-V3-shaped model at full width builds from its config alone (load_format="dummy")."""

import time

import torch

from moeserve.config import ModelConfig
from moeserve.layers.attention import AttentionMetadata
from moeserve.models.loader import load_model

# DeepSeek-V3's own config.json (FP8 checkpoint), cut to 2 layers.
DEEPSEEK_V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 2,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "hidden_act": "silu",
    "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000,
    "rope_scaling": {
        "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096, "type": "yarn",
    },
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


def test_dummy_deepseek_v3_full_width_builds_on_cpu_without_files():
    cfg = ModelConfig.from_dict(dict(DEEPSEEK_V3_CONFIG, max_position_embeddings=4096))
    start = time.time()
    model = load_model(cfg, path=None, dtype=torch.bfloat16, device="cpu", load_format="dummy")
    attn = model.model.layers[0].self_attn
    assert attn.q_b_proj.weight.shape == (128 * 192, 1536)
    assert attn.q_b_proj.weight.dtype == torch.float8_e4m3fn
    assert attn.q_b_proj.weight_scale_inv.shape == (192, 12)
    # q_a_proj (1536 rows) and kv_a_proj_with_mqa (576) as one GEMM; gate and up likewise
    assert attn.q_kv_a_proj.weight.shape == (1536 + 576, 7168)
    assert attn.q_kv_a_proj.weight_scale_inv.shape == (12 + 5, 56)
    assert model.model.layers[1].mlp.gate_up_proj.weight.shape == (2 * 18432, 7168)
    assert model.lm_head.weight.shape == (129280, 7168) and model.lm_head.weight.dtype == torch.bfloat16
    assert len(model.mtp_layers) == 1  # layer index 2 < first_k_dense_replace: a dense MTP block here
    # One decode-sized forward through the full-width layers.
    for layer in model.attention_layers():
        layer.kv_cache = torch.zeros(layer.kv_cache_shape(2, 16), dtype=torch.bfloat16)
    meta = AttentionMetadata.build([3], [3], [[1]], 16, "cpu")
    with torch.inference_mode():
        hidden = model(torch.tensor([0, 5, 7]), torch.arange(3), meta)
        logits = model.compute_logits(hidden[-1:])
    assert logits.shape == (1, 129280) and torch.isfinite(logits).all()
    print(f"built and ran in {time.time() - start:.1f}s")
