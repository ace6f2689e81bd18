from moeserve.models.deepseek_v3 import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from moeserve.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_CLASSES = {
    "deepseek_v3": DeepseekV3ForCausalLM,
    "deepseek_v2": DeepseekV2ForCausalLM,
    "qwen3_moe": Qwen3MoeForCausalLM,
}
