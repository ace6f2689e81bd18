"""DeepSeek's shared experts fused into the routed experts' MoE pass (layers/moe.py) against the
separate shared MLP, on the same tiny checkpoints (V2-style: 2 shared experts; V3: 1, and its MTP
layer). The transformers oracle (test_vs_transformers.py) runs with fusion on, the default; here:
- the loader puts exactly the checkpoint's slices into the shared slots E..E+S-1 (slot k: gate/up
  rows and down columns [kI, (k+1)I), their FP8 scale blocks likewise; under tensor parallelism
  each rank's part of each slice), and a missing shared tensor is named;
- fused and unfused agree: whole-model logits in fp32 (tp 1, and tp 2 over gloo ranks against the
  unfused single process), the MoE layer in bf16, and with FP8 block-scaled weights the fused
  layer equals the routed experts plus the shared MLP in the same (weight-only) arithmetic on CPU;
- under the Triton interpreter (the GPU's kernels: routing kernel with the extra columns, fused
  MoE over E+S experts, W8A8 with FP8) the fused layer equals the unfused one;
- the engine option and --no-fuse-shared-experts build the unfused layers, with the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from moeserve.config import ModelConfig
from moeserve.distributed.groups import build_parallel_state, set_parallel_state
from moeserve.models.loader import CheckpointMismatch, load_model
from tests.distributed.ep_launch import run_ranks
from tests.helpers import print_interpreter_cases, run_model_steps, script_results

ARCHS = {"v2": "deepseek_v2", "v3": "deepseek_v3"}
FP8_BLOCK = (16, 16)  # the tiny widths (64, 32) split into whole blocks, over 2 TP ranks too
BLOCK = 4
# (seq id -> new tokens) per step: a prefill of two sequences, then a decode step of both
STEPS = [{0: [5, 9, 13, 2, 7, 7, 31, 8, 100], 1: [3, 4, 5, 6, 200, 17]}, {0: [11], 1: [40]}]
TABLES = {0: [3, 1, 7], 1: [5, 2, 9]}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def checkpoint(tiny_model, tmp_path_factory, name: str) -> str:
    """'v2', 'v3', or either with '-fp8': DeepSeek's FP8 block format with 16x16 blocks."""
    arch, _, fmt = name.partition("-")
    if not fmt:
        return tiny_model(ARCHS[arch])
    from moeserve.models.tiny import convert_to_fp8

    src = tiny_model(ARCHS[arch], weight_std=0.02)
    dst = os.path.join(os.path.dirname(src), os.path.basename(src) + "-fp8-16")
    return dst if os.path.isdir(dst) else convert_to_fp8(src, dst, block=FP8_BLOCK)


def build(path: str, fuse: bool, dtype: torch.dtype = torch.float32):
    cfg = ModelConfig.from_pretrained(path)
    cfg.fuse_shared_experts = fuse
    return load_model(cfg, path, dtype, "cpu")


def moe_layers(model) -> dict[str, torch.nn.Module]:
    """Prefix of each MoE block's checkpoint names -> the block (decoder layers, then MTP layers)."""
    cfg = model.config
    out = {f"model.layers.{i}.mlp": layer.mlp for i, layer in enumerate(model.model.layers) if cfg.is_moe_layer(i)}
    for i, mtp in enumerate(model.mtp_layers):
        if cfg.is_moe_layer(cfg.num_hidden_layers + i):
            out[f"model.layers.{cfg.num_hidden_layers + i}.mlp"] = mtp.block.mlp
    return out


def run_steps(model) -> list[torch.Tensor]:
    return run_model_steps(model, STEPS, TABLES, BLOCK)


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for fname in sorted(os.listdir(path)):
        if fname.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, fname)))
    return tensors


def expected_slots(tensors: dict[str, torch.Tensor], prefix: str, num_shared: int, inter: int, tp: int = 1,
                   rank: int = 0, block: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """The shared slots' stacks ([S, ...] like experts.w13[E:] etc.) cut from the checkpoint's shared
    MLP by hand: slot k holds this rank's 1/tp of [kI, (k+1)I) of gate and up rows and down columns;
    with FP8 `block`, the scales' blocks of those rows/columns."""
    def rows(t, k, unit):
        local = inter // tp // unit
        return t.narrow(0, (k * inter + rank * inter // tp) // unit, local)

    def cols(t, k, unit):
        local = inter // tp // unit
        return t.narrow(1, (k * inter + rank * inter // tp) // unit, local)

    name = f"{prefix}.shared_experts.{{}}_proj.weight"
    out = {"w13": torch.stack([torch.cat([rows(tensors[name.format(p)], k, 1) for p in ("gate", "up")])
                               for k in range(num_shared)]),
           "w2": torch.stack([cols(tensors[name.format("down")], k, 1) for k in range(num_shared)])}
    if block is not None:
        bn, bk = block
        out["w13_scale"] = torch.stack([torch.cat([rows(tensors[name.format(p) + "_scale_inv"], k, bn)
                                                   for p in ("gate", "up")]) for k in range(num_shared)])
        out["w2_scale"] = torch.stack([cols(tensors[name.format("down") + "_scale_inv"], k, bk)
                                       for k in range(num_shared)])
    return out


def held_slots(experts) -> dict[str, torch.Tensor]:
    e = experts.num_experts
    out = {"w13": experts.w13[e:], "w2": experts.w2[e:]}
    if experts.w13_scale is not None:
        out.update(w13_scale=experts.w13_scale[e:], w2_scale=experts.w2_scale[e:])
    return {k: v.detach().clone() for k, v in out.items()}


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (FP8 compared as bytes)."""
    if a.dtype == torch.float8_e4m3fn:
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    return a.shape == b.shape and torch.equal(a, b)


# ---- tp 1 -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["v2", "v3", "v2-fp8", "v3-fp8"])
def test_shared_slots_hold_the_checkpoint_slices(tiny_model, tmp_path_factory, name):
    path = checkpoint(tiny_model, tmp_path_factory, name)
    model = build(path, fuse=True)
    cfg = model.config
    tensors = read_checkpoint(path)
    layers = moe_layers(model)
    assert len(layers) == (3 if name.startswith("v3") else 2)  # V3: and its MTP layer's block
    for prefix, moe in layers.items():
        experts = moe.experts
        assert moe.shared_experts is None and experts.num_shared == cfg.n_shared_experts
        assert moe.gate.routing.num_fused_shared == cfg.n_shared_experts
        assert experts.w13.shape[0] == cfg.n_routed_experts + cfg.n_shared_experts
        assert (experts.w13.dtype == torch.float8_e4m3fn) == name.endswith("fp8")
        want = expected_slots(tensors, prefix, cfg.n_shared_experts, cfg.moe_intermediate_size,
                              block=FP8_BLOCK if name.endswith("fp8") else None)
        got = held_slots(experts)
        assert set(got) == set(want)
        for key in want:
            assert same(got[key], want[key].to(got[key].dtype)), (prefix, key)
    unfused = build(path, fuse=False)
    assert all(m.shared_experts is not None and m.experts.w13.shape[0] == cfg.n_routed_experts
               and m.gate.routing.num_fused_shared == 0 for m in moe_layers(unfused).values())


@pytest.mark.parametrize("name", ["v2", "v3"])
def test_fused_model_gives_the_unfused_logits_fp32(tiny_model, tmp_path_factory, name):
    path = checkpoint(tiny_model, tmp_path_factory, name)
    for got, want in zip(run_steps(build(path, True)), run_steps(build(path, False))):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("name", ["v2", "v3"])
def test_fused_layer_equals_unfused_bf16(tiny_model, tmp_path_factory, name):
    path = checkpoint(tiny_model, tmp_path_factory, name)
    fused, unfused = (moe_layers(build(path, f, torch.bfloat16)) for f in (True, False))
    x = torch.randn(7, fused["model.layers.1.mlp"].experts.hidden, generator=torch.Generator().manual_seed(0))
    for prefix in fused:
        with torch.inference_mode():
            got, want = fused[prefix](x.bfloat16()), unfused[prefix](x.bfloat16())
        assert got.dtype == torch.bfloat16 and rel_err(got, want) < 1e-2, (prefix, rel_err(got, want))


@pytest.mark.parametrize("name", ["v2-fp8", "v3-fp8"])
def test_fused_fp8_layer_equals_routed_plus_shared_mlp(tiny_model, tmp_path_factory, name):
    """On CPU the fused MoE's reference keeps activations unquantized (weight-only FP8), while the
    unfused shared MLP's FP8 GEMMs quantize them: so the fused layer is checked against the unfused
    layer's routed experts plus its shared MLP computed with dequantized weights, in fp32."""
    path = checkpoint(tiny_model, tmp_path_factory, name)
    fused, unfused = (moe_layers(build(path, f)) for f in (True, False))
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(0))
    for prefix, moe in unfused.items():
        mlp = moe.shared_experts
        assert mlp.gate_up_proj.quant == "fp8" and moe.experts.w13.dtype == torch.float8_e4m3fn
        with torch.inference_mode():
            weights, ids = moe.gate(x)
            gate_up = x @ mlp.gate_up_proj.dequantized_weight(torch.float32).t()
            inter = mlp.local_intermediate
            act = F.silu(gate_up[:, :inter]) * gate_up[:, mlp.up_offset:mlp.up_offset + inter]
            want = moe.experts(x, weights, ids) + act @ mlp.down_proj.dequantized_weight(torch.float32).t()
            got = fused[prefix](x)
        assert rel_err(got, want) < 1e-5, (prefix, rel_err(got, want))


def test_a_missing_shared_tensor_is_named(deepseek_v2_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(deepseek_v2_dir, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["model.layers.2.mlp.shared_experts.up_proj.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointMismatch, match=r"1 missing tensors \['model\.layers\.2\.mlp\.shared_experts\."
                                                 r"up_proj\.weight'\]; 0 unexpected"):
        build(str(bad), fuse=True)


def test_stacked_experts_checkpoint_fills_the_routed_slots_only(deepseek_v2_dir, tmp_path):
    """A checkpoint whose routed experts are stacked (`mlp.experts.gate_up_proj` [E, 2I, H],
    `mlp.experts.down_proj` [E, H, I]) fills slots 0..E-1; the shared MLP the slots after."""
    import re

    path = tmp_path / "stacked"
    shutil.copytree(deepseek_v2_dir, path)
    tensors, stacks = {}, {}
    for name, t in load_file(str(path / "model.safetensors")).items():
        m = re.match(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$", name)
        if m:
            stacks.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = t
        else:
            tensors[name] = t
    for prefix, projs in stacks.items():
        experts = range(len(projs["gate"]))
        tensors[prefix + ".gate_up_proj"] = torch.stack([torch.cat((projs["gate"][e], projs["up"][e])) for e in experts])
        tensors[prefix + ".down_proj"] = torch.stack([projs["down"][e] for e in experts])
    save_file(tensors, str(path / "model.safetensors"))
    for got, want in zip(build(str(path), True).state_dict().items(), build(deepseek_v2_dir, True).state_dict().items()):
        assert got[0] == want[0] and torch.equal(got[1], want[1]), got[0]


def test_engine_option_builds_the_unfused_layers(deepseek_v2_dir):
    from moeserve import LLM, SamplingParams
    from moeserve.engine.llm import add_engine_args, engine_kwargs

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_kwargs(parser.parse_args(["--model", "m"]))["fuse_shared_experts"]
    assert not engine_kwargs(parser.parse_args(["--model", "m", "--no-fuse-shared-experts"]))["fuse_shared_experts"]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = [[5, 7, 9, 11], [3, 4], [8, 100, 23, 9, 9, 1, 40]]
    tokens = {}
    for fuse in (True, False):
        llm = LLM(deepseek_v2_dir, dtype="float32", device="cpu", block_size=4, num_blocks=64,
                  enable_prefix_caching=False, fuse_shared_experts=fuse)
        layers = moe_layers(llm.engine.runner.model).values()
        assert all((m.shared_experts is None) == fuse for m in layers)
        tokens[fuse] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    assert tokens[True] == tokens[False]


# ---- tp 2 (gloo ranks) --------------------------------------------------------------------------

def _tp_rank(rank: int, world: int, path: str, fuse: bool):
    set_parallel_state(build_parallel_state(tp=world, dp=1, ep=1))
    try:
        torch.set_num_threads(1)
        model = build(path, fuse)
        slots = {prefix: {k: (v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v).numpy()
                          for k, v in held_slots(moe.experts).items()}
                 for prefix, moe in moe_layers(model).items() if moe.experts.num_shared}
        return [t.numpy() for t in run_steps(model)], slots  # plain arrays: the rank exits before the parent reads
    finally:
        set_parallel_state(None)


@pytest.mark.parametrize("name", ["v2", "v3", "v2-fp8"])
def test_tp2_shared_slots_and_logits(tiny_model, tmp_path_factory, name):
    """Each rank's shared slots hold its half of each slot's slice (FP8: and their scale blocks);
    the logits equal the single process's: fp32 fused TP against the unfused single process, FP8
    fused TP against the fused single process (the same arithmetic: rounding only)."""
    path = checkpoint(tiny_model, tmp_path_factory, name)
    fp8 = name.endswith("fp8")
    ref = run_steps(build(path, fuse=fp8))
    cfg = ModelConfig.from_pretrained(path)
    tensors = read_checkpoint(path)
    for rank, (logits, slots) in enumerate(run_ranks(_tp_rank, 2, path, True, timeout_s=120)):
        for got, want in zip(map(torch.from_numpy, logits), ref):
            assert rel_err(got, want) < (1e-4 if fp8 else 1e-5), (rank, rel_err(got, want))
        assert len(slots) == (3 if name.startswith("v3") else 2)
        for prefix, held in slots.items():
            want = expected_slots(tensors, prefix, cfg.n_shared_experts, cfg.moe_intermediate_size, 2, rank,
                                  FP8_BLOCK if fp8 else None)
            assert set(held) == set(want)
            for key, t in want.items():
                t = t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
                assert torch.equal(torch.from_numpy(held[key]), t), (rank, prefix, key)


# ---- the Triton interpreter: the GPU's kernels ------------------------------------------------

DEFERRED_SUM_CASES = ("v2",)  # a whole model under the interpreter: one checkpoint keeps CI short


def _interpreter_cases() -> dict:
    """Fused vs unfused MoE layer (the first MoE layer of each checkpoint), rel. error in fp32."""
    results = {}
    for name, path in json.loads(os.environ["FUSION_CHECKPOINTS"]).items():
        fused, unfused = (moe_layers(build(path, f))["model.layers.1.mlp"] for f in (True, False))
        x = torch.randn(5, 64)
        with torch.inference_mode():
            results[f"{name}_columns"] = list(fused.gate(x)[1].shape)
            results[f"{name}_err"] = rel_err(fused(x), unfused(x))
        if name not in DEFERRED_SUM_CASES:
            continue
        # The whole model with each MoE's sum left to the next norm (fused_moe.ExpertRows, the default)
        # against the sum launched by the MoE: the same logits, bit for bit.
        import moeserve.layers.moe as moe_layer
        from moeserve.kernels.fused_moe import ExpertRows

        model, deferred = build(path, True), []
        experts_forward, moe_forward = moe_layer.Experts.forward, moe_layer.MoE.forward

        def counted(self, *args, **kwargs):
            out = experts_forward(self, *args, **kwargs)
            deferred.append(isinstance(out, ExpertRows))
            return out
        moe_layer.Experts.forward = counted
        rows = run_steps(model)
        moe_layer.MoE.forward = lambda self, x, x_fp8=None, sum_rows=True: moe_forward(self, x, x_fp8)
        summed = run_steps(model)
        moe_layer.Experts.forward, moe_layer.MoE.forward = experts_forward, moe_forward
        results[f"{name}_deferred"] = [sum(deferred), len(deferred)]
        results[f"{name}_deferred_differ"] = sum(int((a != b).sum()) for a, b in zip(rows, summed))
    return results


def test_fused_layer_equals_unfused_under_the_interpreter(tiny_model, tmp_path_factory):
    names = ["v2", "v3", "v2-fp8", "v3-fp8"]
    paths = {name: checkpoint(tiny_model, tmp_path_factory, name) for name in names}
    res = script_results(__file__, 300, TRITON_INTERPRET="1", FUSION_CHECKPOINTS=json.dumps(paths))
    for name in names:
        cfg = ModelConfig.from_pretrained(paths[name])
        assert res[f"{name}_columns"] == [5, cfg.num_experts_per_tok + cfg.n_shared_experts]
        # fp32: summation order only; FP8 (W8A8 on both paths): an activation may round to the
        # neighbouring e4m3 value where the two paths' SiLU outputs differ in the last fp32 bit
        tol = 1e-3 if name.endswith("fp8") else 1e-5
        assert res[f"{name}_err"] < tol, (name, res[f"{name}_err"], res["seed"])
        if name not in DEFERRED_SUM_CASES:
            continue
        # every MoE call of the first steps left its sum to the norm; the second pass summed itself
        deferred, calls = res[f"{name}_deferred"]
        assert calls > 0 and deferred * 2 == calls, (name, res[f"{name}_deferred"])
        assert res[f"{name}_deferred_differ"] == 0, name


if __name__ == "__main__":
    print_interpreter_cases(_interpreter_cases)
