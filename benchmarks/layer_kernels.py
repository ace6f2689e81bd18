"""List the kernels one decoder layer launches in a decode step, on CPU, without a GPU.

    python benchmarks/layer_kernels.py [--model v2-lite|v3|qwen3] [--batch 1] [--fp8] [--no-fuse-shared-experts]

The model runs under the Triton interpreter (TRITON_INTERPRET=1), so every Triton kernel the GPU
would launch is launched here too and counted once by name (in bf16, the serving dtype, the
interpreter computes garbage, and the kernels' CPU dtype gates are lifted: only the count
matters here; --dtype fp32 runs the real CPU paths); every other op is counted
at the aten level (what the GPU runs as one kernel each: mm, bmm, copies, casts, cat, topk...),
leaving out ops that launch nothing (views, reshapes that alias, empty allocations). Shapes are
small (the counts do not depend on the widths), the structure is the named model's: V2-Lite (no
q_lora, softmax greedy routing, 2 shared experts), V3 (q_lora, sigmoid grouped routing with
the correction bias, 1 shared expert) or Qwen3-30B-A3B (GQA with 8 query heads per KV head,
softmax top-k renormalised, no shared expert, every layer MoE). Prints, per layer kind (dense,
MoE), the kernels in call order and their count.

DeepSeek's shared experts run inside the routed experts' fused MoE pass (the engine's default);
--no-fuse-shared-experts counts the separate shared MLP instead. --fp8 uses DeepSeek's FP8 block
format with 16x16 blocks (the tiny widths split into whole blocks). The dense FP8 GEMMs then take
the CPU's default configs at these widths (activation quant fused at <= 16 rows, no split-K): on
the GPU the tuned table (kernels/configs/dense_fp8_sm90.json) may add a quant launch and a split-K
reduce per GEMM at the real widths, so FP8 counts here are lower bounds for the dense GEMMs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# Shapes cut down from the real models (counts do not depend on the widths).
SHAPES = {
    "v2-lite": dict(
        architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", vocab_size=256, hidden_size=64,
        intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
        n_routed_experts=16, num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1,
        topk_method="greedy", n_group=1, topk_group=1, scoring_func="softmax", max_position_embeddings=512),
    "v3": dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=256, hidden_size=64,
        intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
        n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, max_position_embeddings=512),
    "qwen3": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=256, hidden_size=64,
        intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=16,
        num_key_value_heads=2, head_dim=16, num_experts=16, num_experts_per_tok=8, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=512),
}

# aten ops that launch no kernel: views, aliasing reshapes, allocations, metadata.
NO_KERNEL = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "t", "transpose", "permute", "unsqueeze", "squeeze",
    "split", "split_with_sizes", "slice", "select", "expand", "as_strided", "alias", "detach", "empty",
    "empty_like", "empty_strided", "new_empty", "lift_fresh", "unbind", "narrow", "sym_size", "sym_stride",
    "sym_numel", "is_same_size", "_local_scalar_dense", "promote_types", "result_type", "can_cast",
}


class KernelLog(TorchDispatchMode):
    """Records aten ops that launch a kernel, and Triton launches (patched in by `count`)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self.in_triton = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.in_triton and name.rstrip("_") not in NO_KERNEL and name not in NO_KERNEL:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def _lift_cpu_dtype_gates() -> None:
    """Let the Triton paths take bf16 CPU tensors as they take bf16 CUDA ones (values are wrong
    under the interpreter in bf16; the launches are the GPU's)."""
    from moeserve.kernels import activation, attention, gqa_cache, mla_cache, rmsnorm, rotary, router_gemm, routing
    from moeserve.kernels.fp8 import triton_runs_on

    def use_triton(x, *others):
        return triton_runs_on(x, *others)

    for module in (rmsnorm, rotary, attention, activation, mla_cache, gqa_cache, router_gemm, routing):
        module._use_triton = use_triton


def count(model_name: str, batch: int, dtype: torch.dtype, fp8: bool = False,
          fuse_shared_experts: bool = True) -> dict[str, list[str]]:
    from triton.runtime.interpreter import InterpretedFunction

    from moeserve.config import ModelConfig
    from moeserve.layers.attention import AttentionMetadata
    from moeserve.models.loader import load_model

    shape = dict(SHAPES[model_name])
    if fp8:
        shape["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                        "weight_block_size": [16, 16]}
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(shape, f)
        cfg = ModelConfig.from_pretrained(d)
    cfg.fuse_shared_experts = fuse_shared_experts
    if dtype != torch.float32:
        _lift_cpu_dtype_gates()
    model = load_model(cfg, None, dtype, "cpu", load_format="dummy")
    block = 4
    for layer in model.attention_layers():
        layer.kv_cache = torch.zeros(layer.kv_cache_shape(4 * batch + 1, block), dtype=dtype)
    # B sequences of 7 cached tokens, each decoding its 8th (the cache content does not matter).
    tables = [[1 + 2 * b, 2 + 2 * b] for b in range(batch)]
    meta = AttentionMetadata.build([1] * batch, [8] * batch, tables, block, "cpu")
    positions = torch.full((batch,), 7)
    x = torch.randn(batch, cfg.hidden_size, dtype=dtype)
    residual = torch.randn(batch, cfg.hidden_size, dtype=dtype)

    log = KernelLog()
    original_run = InterpretedFunction.run

    def run(self, *args, **kwargs):
        log.ops.append("triton:" + self.fn.__name__)
        log.in_triton += 1
        try:
            return original_run(self, *args, **kwargs)
        finally:
            log.in_triton -= 1

    InterpretedFunction.run = run
    out = {}
    try:
        for idx, layer in enumerate(model.model.layers):
            kind = "moe" if cfg.is_moe_layer(idx) else "dense"
            if kind in out:
                continue
            log.ops = []
            with torch.no_grad(), log:  # not inference_mode: there composite ops (linear, to) reach the log undecomposed
                layer(x, residual, positions, meta)
            out[kind] = list(log.ops)
    finally:
        InterpretedFunction.run = original_run
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="v2-lite", choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--fp8", action="store_true", help="FP8 block-scaled weights (16x16 blocks at these widths)")
    p.add_argument("--no-fuse-shared-experts", action="store_true", help="the shared experts as a separate MLP")
    p.add_argument("--json", help="also write the lists here")
    args = p.parse_args()
    torch.manual_seed(0)
    result = count(args.model, args.batch, torch.bfloat16 if args.dtype == "bf16" else torch.float32, args.fp8,
                   not args.no_fuse_shared_experts)
    what = ", ".join([args.dtype] + (["FP8 weights"] if args.fp8 else []) +
                     (["shared experts unfused"] if args.no_fuse_shared_experts else []))
    for kind, ops in result.items():
        print(f"{args.model} {kind} layer, {what}, decode batch {args.batch}: {len(ops)} kernels")
        print("  in order: " + ", ".join(ops))
        print("  by name:  " + ", ".join(f"{n} x{c}" for n, c in Counter(ops).most_common()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
