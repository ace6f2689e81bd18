"""Tiny checkpoints, the tokenizer, and the loader's handling of real checkpoint layouts and errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeserve.config import ModelConfig, RopeConfig
from moeserve.models.loader import CheckpointMismatch, load_model
from moeserve.models.tiny import convert_to_fp8
from moeserve.models.tokenizer import load_tokenizer


def test_tokenizer_round_trips_and_renders_chat(deepseek_v3_dir):
    tok = load_tokenizer(deepseek_v3_dir)
    cfg = json.load(open(os.path.join(deepseek_v3_dir, "config.json")))
    assert len(tok) == cfg["vocab_size"]
    for text in ["Hello, world!", "experts route tokens 🚀 über naïve 漢字", "  spaces\nand\ttabs "]:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|begin_of_text|><|user|>hi") and chat.endswith("<|assistant|>")
    assert tok.eos_token_id == cfg["eos_token_id"]


def test_sharded_checkpoint_loads_identically(tiny_model, deepseek_v3_dir):
    sharded = tiny_model("deepseek_v3", num_shards=3)
    index = json.load(open(os.path.join(sharded, "model.safetensors.index.json")))["weight_map"]
    stored = set()
    for fname in set(index.values()):
        stored |= set(load_file(os.path.join(sharded, fname)))
    assert stored == set(index)  # the index covers every tensor, and only those
    assert any(k.startswith("model.layers.3.") for k in index)  # the MTP layer, DeepSeek's naming
    a = load_model(ModelConfig.from_pretrained(sharded), sharded, torch.float32, "cpu")
    b = load_model(ModelConfig.from_pretrained(deepseek_v3_dir), deepseek_v3_dir, torch.float32, "cpu")
    assert len(a.mtp_layers) == 1
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_fp8_conversion_format(deepseek_v3_dir, tmp_path):
    dst = convert_to_fp8(deepseek_v3_dir, str(tmp_path / "fp8"))
    cfg = json.load(open(os.path.join(dst, "config.json")))
    assert cfg["quantization_config"]["quant_method"] == "fp8"
    tensors = {}
    for f in os.listdir(dst):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(dst, f)))
    w = tensors["model.layers.1.mlp.experts.0.gate_proj.weight"]
    assert w.dtype == torch.float8_e4m3fn
    assert tensors["model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv"].shape == (1, 1)
    assert tensors["model.layers.0.self_attn.q_b_proj.weight_scale_inv"].shape == (1, 1)
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    # An FP8 checkpoint whose experts do not tile into 128-blocks loads with experts dequantized.
    model = load_model(ModelConfig.from_pretrained(dst), dst, torch.float32, "cpu")
    assert model.model.layers[1].mlp.experts.w13.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_b_proj.weight.dtype == torch.float8_e4m3fn


def test_mismatched_checkpoint_names_missing_and_unexpected_tensors(deepseek_v2_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(deepseek_v2_dir, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    tensors["model.layers.0.self_attn.surprise.weight"] = torch.zeros(2)
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointMismatch) as err:
        load_model(ModelConfig.from_pretrained(str(bad)), str(bad), torch.float32, "cpu")
    assert "model.layers.1.mlp.experts.3.up_proj" in str(err.value)
    assert "model.layers.0.self_attn.surprise.weight" in str(err.value)


def test_wrong_shape_is_named(qwen3_moe_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(qwen3_moe_dir, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.norm.weight"] = torch.ones(7)
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointMismatch, match=r"model\.norm\.weight: checkpoint shape \(7,\)"):
        load_model(ModelConfig.from_pretrained(str(bad)), str(bad), torch.float32, "cpu")


def test_rope_scaling_and_rope_parameters_read_the_same():
    """DeepSeek's own config.json has `rope_scaling` + `rope_theta`; transformers 5 writes `rope_parameters`."""
    yarn = {"factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1}
    old = RopeConfig.from_hf({"rope_theta": 10000, "rope_scaling": {"type": "yarn", **yarn}}, 163840)
    new = RopeConfig.from_hf({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000, **yarn}}, 163840)
    assert old == new and old.type == "yarn" and old.factor == 40.0


def test_unsupported_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="unsupported architecture"):
        ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "vocab_size": 8})


def test_make_tiny_cli(tmp_path):
    out = tmp_path / "m"
    proc = subprocess.run([sys.executable, "-m", "moeserve.cli", "make-tiny", "--arch", "qwen3_moe", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
