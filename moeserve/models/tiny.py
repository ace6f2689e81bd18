"""Tiny random checkpoints in Hugging Face format, for tests and the demo.

`make_tiny(arch, out_dir)` builds transformers' own model class from a small config, fills it
with random weights large enough that greedy decoding is not decided by near-ties, and writes
what a real checkpoint folder holds: config.json, *.safetensors (+ index), tokenizer.json and
tokenizer_config.json with a chat template. transformers 5 writes routed experts one by one
(`model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj.weight`) and DeepSeek-V3's router bias
as `model.layers.{l}.mlp.gate.e_score_correction_bias`.

DeepSeek-V3 folders also get an MTP layer as DeepSeek ships it, `model.layers.{num_hidden_layers}.*`
(enorm, hnorm, eh_proj, a full MoE decoder layer, shared_head.{norm,head}, and a copy of
embed_tokens), in a file of its own listed in model.safetensors.index.json; transformers
ignores those tensors.

`convert_to_fp8(src, dst)` rewrites a folder in DeepSeek's FP8 format (Qwen3's FP8 releases use it
too): each attention/MLP/expert projection becomes float8_e4m3fn with a fp32 `weight_scale_inv`
per 128x128 block.
"""

from __future__ import annotations

import argparse
import json
import os
import re

import torch
from safetensors.torch import load_file, save_file

from moeserve.kernels.fp8 import quant_block_fp8_ref
from moeserve.models.tokenizer import build_tokenizer, save_tokenizer

VOCAB_SIZE = 512
_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256,
         "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}

TINY_CONFIGS = {
    # V3: q_lora, grouped top-k (4 groups, keep 2) with sigmoid + correction bias, 1 shared expert,
    # first layer dense, yarn, interleaved rope, v_head_dim != qk_nope_head_dim.
    "deepseek_v3": dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=16, routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16,
        v_head_dim=24, qk_nope_head_dim=16, n_group=4, topk_group=2, num_experts_per_tok=4,
        first_k_dense_replace=1, max_position_embeddings=1024, rope_parameters=_YARN, rope_interleave=True,
        num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False),
    # V2-Lite style: no q_lora, softmax group_limited_greedy over 4 groups, 2 shared experts.
    "deepseek_v2": dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, n_shared_experts=2, n_routed_experts=16, kv_lora_rank=32,
        q_lora_rank=None, qk_rope_head_dim=16, v_head_dim=16, qk_nope_head_dim=16, n_group=4, topk_group=2,
        topk_method="group_limited_greedy", num_experts_per_tok=4, first_k_dense_replace=1,
        max_position_embeddings=1024, rope_parameters=_YARN, routed_scaling_factor=1.0, bos_token_id=0,
        eos_token_id=1, tie_word_embeddings=False),
    # Qwen3-MoE: GQA 4 q / 2 kv heads, layer 0 dense (mlp_only_layers), MoE every layer after.
    "qwen3_moe": dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=16,
        num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0],
        max_position_embeddings=1024, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False),
}

_HF_CLASSES = {
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}
WEIGHT_STD = 0.15  # decisive logits on a 3-layer, 64-wide random model


@torch.no_grad()
def _randomize(model: torch.nn.Module, gen: torch.Generator, std: float) -> None:
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if "inv_freq" in name:
            continue
        noise = torch.randn(tensor.shape, generator=gen)
        if "norm" in name:
            tensor.copy_(1.0 + 0.1 * noise)
        elif "e_score_correction_bias" in name:
            tensor.copy_(0.1 * noise)
        else:
            tensor.copy_(std * noise)


def _mtp_tensors(hf_model: torch.nn.Module, cfg: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One DeepSeek MTP layer: a copy of the last (MoE) decoder layer's shapes with fresh weights."""
    n = cfg["num_hidden_layers"]
    hidden = cfg["hidden_size"]
    template = {}
    for name, t in hf_model.state_dict().items():
        if not name.startswith(f"model.layers.{n - 1}."):
            continue
        if name.endswith("mlp.experts.gate_up_proj"):  # DeepSeek names experts one by one
            base, inter = name[: -len("gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                template[f"{base}{e}.gate_proj.weight"] = t[e, :inter]
                template[f"{base}{e}.up_proj.weight"] = t[e, inter:]
        elif name.endswith("mlp.experts.down_proj"):
            base = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                template[f"{base}{e}.down_proj.weight"] = t[e]
        else:
            template[name] = t
    out = {}
    for name, t in template.items():
        new = name.replace(f"model.layers.{n - 1}.", f"model.layers.{n}.", 1)
        noise = torch.randn(t.shape, generator=gen)
        out[new] = (1.0 + 0.1 * noise) if "norm" in name else (0.1 * noise if "bias" in name else WEIGHT_STD * noise)
    out[f"model.layers.{n}.enorm.weight"] = 1.0 + 0.1 * torch.randn(hidden, generator=gen)
    out[f"model.layers.{n}.hnorm.weight"] = 1.0 + 0.1 * torch.randn(hidden, generator=gen)
    out[f"model.layers.{n}.eh_proj.weight"] = WEIGHT_STD * torch.randn(hidden, 2 * hidden, generator=gen)
    out[f"model.layers.{n}.shared_head.norm.weight"] = 1.0 + 0.1 * torch.randn(hidden, generator=gen)
    out[f"model.layers.{n}.shared_head.head.weight"] = WEIGHT_STD * torch.randn(cfg["vocab_size"], hidden,
                                                                                generator=gen)
    out[f"model.layers.{n}.embed_tokens.weight"] = hf_model.model.embed_tokens.weight.detach().clone()
    return out


def _write_shards(out_dir: str, shards: list[dict[str, torch.Tensor]], names: list[str]) -> None:
    for fname in os.listdir(out_dir):
        if fname.endswith(".safetensors") or fname == "model.safetensors.index.json":
            os.remove(os.path.join(out_dir, fname))
    weight_map, total = {}, 0
    for shard, fname in zip(shards, names):
        shard = {k: v.contiguous() for k, v in shard.items()}
        save_file(shard, os.path.join(out_dir, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
        total += sum(v.numel() * v.element_size() for v in shard.values())
    if len(shards) > 1:
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=1)


def _read_folder(path: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for fname in sorted(os.listdir(path)):
        if fname.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, fname)))
    return tensors


def _split(tensors: dict[str, torch.Tensor], num_shards: int) -> list[dict[str, torch.Tensor]]:
    names = sorted(tensors)
    per = -(-len(names) // num_shards)
    return [{k: tensors[k] for k in names[i * per:(i + 1) * per]} for i in range(num_shards)]


def make_tiny(arch: str, out_dir: str, dtype: torch.dtype = torch.float32, seed: int = 0, mtp: bool = True,
              num_shards: int = 1, weight_std: float = WEIGHT_STD, **overrides) -> str:
    """Write a tiny random checkpoint folder for `arch`; returns out_dir. `overrides` change the config."""
    import transformers

    if arch not in TINY_CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(TINY_CONFIGS)}")
    cfg = {**TINY_CONFIGS[arch], **overrides}
    if arch != "deepseek_v3" or not mtp:
        cfg.pop("num_nextn_predict_layers", None)
    config_cls, model_cls = (getattr(transformers, n) for n in _HF_CLASSES[arch])
    gen = torch.Generator().manual_seed(seed)
    hf_model = model_cls(config_cls(**cfg)).eval()
    _randomize(hf_model, gen, weight_std)
    hf_model.to(dtype).save_pretrained(out_dir, safe_serialization=True)

    tensors = _read_folder(out_dir)
    extra = {}
    if arch == "deepseek_v3" and mtp:
        extra = {k: v.to(dtype) for k, v in _mtp_tensors(hf_model, cfg, gen).items()}
    shards = _split(tensors, num_shards) + ([extra] if extra else [])
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    _write_shards(out_dir, shards, names)
    if arch == "deepseek_v3" and mtp:
        _set_config(out_dir, num_nextn_predict_layers=1)
    save_tokenizer(build_tokenizer(cfg["vocab_size"]), out_dir, model_max_length=cfg["max_position_embeddings"])
    return out_dir


def _set_config(path: str, **values) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(values)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return cfg


# Projections DeepSeek (and Qwen3's FP8 releases, in the same format) ship in FP8: attention and
# MLP/expert linears (not embeddings, norms, router gates, lm_head, or the MTP layer's eh_proj /
# shared head).
_FP8_RE = re.compile(r".*\.(self_attn\.(q_proj|k_proj|v_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                     r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight$")


def convert_to_fp8(src: str, dst: str, block: tuple[int, int] = (128, 128)) -> str:
    """Copy a checkpoint folder into DeepSeek's FP8 block format."""
    import shutil

    os.makedirs(dst, exist_ok=True)
    for fname in os.listdir(src):
        if not fname.endswith(".safetensors") and fname != "model.safetensors.index.json":
            shutil.copy(os.path.join(src, fname), os.path.join(dst, fname))
    index = os.path.join(src, "model.safetensors.index.json")
    files = sorted({v for v in json.load(open(index))["weight_map"].values()}) if os.path.isfile(index) else [
        "model.safetensors"]
    shards = []
    for fname in files:
        out = {}
        for name, t in load_file(os.path.join(src, fname)).items():
            if _FP8_RE.match(name) and t.dim() == 2:
                out[name], out[name + "_scale_inv"] = quant_block_fp8_ref(t, block)
            else:
                out[name] = t
        shards.append(out)
    _write_shards(dst, shards, files)
    _set_config(dst, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": list(block)})
    return dst


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", choices=sorted(TINY_CONFIGS), default="deepseek_v3")
    parser.add_argument("--out", required=True, help="folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--fp8", action="store_true", help="write DeepSeek's FP8 block format")
    parser.add_argument("--num-shards", type=int, default=1)


def main(args: argparse.Namespace) -> int:
    dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
    if args.fp8:
        tmp = args.out.rstrip("/") + ".bf16-src"
        make_tiny(args.arch, tmp, dtype, args.seed, num_shards=args.num_shards)
        convert_to_fp8(tmp, args.out)
        import shutil

        shutil.rmtree(tmp)
    else:
        make_tiny(args.arch, args.out, dtype, args.seed, num_shards=args.num_shards)
    print(f"wrote {args.arch} to {args.out}")
    return 0
