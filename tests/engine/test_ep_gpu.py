"""Expert parallelism through the whole engine on the GPU kernels (skipped without a GPU). The ranks
share the GPUs there are (dist_backend "gloo": a one-GPU machine runs both on GPU 0, collectives
through host memory, the decode's dispatch over the peer transport inside CUDA graphs), so the paths
that only a GPU runs are checked under EP wherever a GPU is: FP8 block-scaled weights on the Triton
W8A8 kernels (the norm's FP8 quant, split-K dense GEMMs, experts fed the received rows as FP8
groups), the FP8 KV cache's MLA decode, CUDA graphs, and the prefill warm-up under EP, after which
serving compiles no Triton kernel in any rank. The same engine paths on CPU: test_dp_ep.py.

In bf16 a MoE model's greedy tokens are not a function of the model alone: a last-bit change (another
batch, another split of the expert sum) can flip a router's top-k and move the logits by whole units,
so one GPU does not reproduce its own tokens once the batch changes; FP8 activations (3 mantissa
bits) turn any last-bit change into a few percent. So the model routes every token to every expert,
and the comparison is vLLM's: where two runs' greedy tokens part, each run's token must be among the
other's top logprobs, and the sequence is compared no further. A wrong expert, scale or cache entry
fails it at once; one GPU against itself under another batching is printed as the control."""

from __future__ import annotations

import gc
import json
import os

import pytest
import torch

from moeserve import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

# DeepSeek-V3's layout at a width whose projections are whole 128 x 128 FP8 blocks (kv_a's 192 rows:
# one and a half, as V3's 576), so the FP8 checkpoint runs the kernels a real one runs. Every token
# takes all 8 experts (4 on each rank): no router decision for a last bit to flip (see above).
SMALL_V3 = dict(hidden_size=256, intermediate_size=512, moe_intermediate_size=256, q_lora_rank=256,
                kv_lora_rank=128, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=8,
                num_experts_per_tok=8, n_group=1, topk_group=1, weight_std=0.2)
GPU = dict(dtype="bfloat16", device="cuda", kv_cache_dtype="fp8", gpu_memory_utilization=0.2, max_num_seqs=16,
           max_num_batched_tokens=1024, max_model_len=512)
EP = dict(dp=2, ep=2, dist_backend="gloo", ll_transport="peer", dispatch_dtype="none", combine_dtype="none")
TOP = 10  # logprobs asked for at each generated token


@pytest.fixture(scope="module")
def fp8_v3(tiny_model, tmp_path_factory):
    from moeserve.models.tiny import convert_to_fp8

    return convert_to_fp8(tiny_model("deepseek_v3", **SMALL_V3), str(tmp_path_factory.mktemp("fp8_v3")))


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 37, 64, 130, 9, 300, 17, 48)]


def _generate(llm, prompts, n=16):
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=TOP)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in llm.generate(prompts, params)]


def _agreement(got, ref) -> float:
    return sum(a == b for (x, _), (y, _) in zip(got, ref) for a, b in zip(x, y)) / sum(len(y) for y, _ in ref)


def _not_close(got, ref) -> list[tuple[int, int]]:
    """(sequence, position) where the two runs part with a token outside the other's top logprobs."""
    bad = []
    for s, ((g, g_lps), (r, r_lps)) in enumerate(zip(got, ref)):
        i = next((i for i, (a, b) in enumerate(zip(g, r)) if a != b), None)
        if i is not None and (g[i] not in r_lps[i] or r[i] not in g_lps[i]):
            bad.append((s, i))
    return bad


def _kernels(root: str) -> dict[str, str]:
    """Compiled Triton kernels in a cache folder: metadata file -> kernel name."""
    found = {}
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".json") and not f.startswith("__grp__"):
                with open(os.path.join(folder, f)) as fh:
                    found[os.path.join(folder, f)] = json.load(fh).get("name", f)
    return found


def _reference(path, prompts):
    single = LLM(path, **GPU)
    ref = _generate(single, prompts)
    alone = [_generate(single, [p])[0] for p in prompts]  # other batches: how far one GPU parts from itself
    del single
    gc.collect()
    torch.cuda.empty_cache()
    print(f"control, one GPU with each prompt alone: agreement {_agreement(alone, ref):.3f}, not close at "
          f"{_not_close(alone, ref)}")
    return ref


def test_dp2_ep2_sharing_a_gpu_matches_one_gpu(fp8_v3, tmp_path, monkeypatch):
    prompts = _prompts()
    ref = _reference(fp8_v3, prompts)
    # The ranks compile into an empty cache: what they compile while serving, after start-up, is counted.
    cache = str(tmp_path / "triton")
    monkeypatch.setenv("TRITON_CACHE_DIR", cache)
    llm = LLM(fp8_v3, **EP, **GPU)
    try:
        started = _kernels(cache)
        got = _generate(llm, prompts)
        again = _generate(llm, prompts[::-1])[::-1]  # other batches, other rank assignments
        compiled = sorted(name for f, name in _kernels(cache).items() if f not in started)
        stats = llm.engine.router.stats
    finally:
        llm.shutdown()
    bad = _not_close(got, ref) + _not_close(again, ref)
    print(f"dp2/ep2 on a shared GPU: agreement {_agreement(got, ref):.3f} / {_agreement(again, ref):.3f}, not close "
          f"at {bad}; {len(started)} kernels compiled at start-up, {compiled} while serving")
    assert all(p.exitcode == 0 for p in llm.engine.procs)
    assert all(s["num_tokens_computed"] > 0 for s in stats.values())  # both ranks served
    assert not bad, (got, again, ref)
    assert started and not compiled


def _eager_run_stays_close(path, label: str, **parallel) -> None:
    """An eager parallel engine's greedy tokens against one GPU's, by _not_close."""
    prompts = _prompts()
    ref = _reference(path, prompts)
    llm = LLM(path, enforce_eager=True, **parallel, **GPU)
    try:
        got = _generate(llm, prompts)
    finally:
        llm.shutdown()
    bad = _not_close(got, ref)
    print(f"{label}: agreement {_agreement(got, ref):.3f}, not close at {bad}")
    assert all(p.exitcode == 0 for p in llm.engine.procs)
    assert not bad, (got, ref)


def test_fp8_wire_on_a_gpu_stays_close(fp8_v3):
    """The checkpoint's default wire (FP8 dispatch and combine for an FP8 checkpoint), eager: the
    Triton row kernels and the fp8 groups the experts take as they arrived."""
    _eager_run_stays_close(fp8_v3, "dp2/ep2 fp8 wire", **{**EP, "dispatch_dtype": "auto", "combine_dtype": "auto"})


def test_dp2_tp2_ep4_on_a_gpu_stays_close(fp8_v3):
    """Attention and dense layers tensor-parallel inside each of two data-parallel groups, experts over
    all four ranks (eager: gloo's all_reduces cannot be captured): the FP8 weights' TP slices (whole
    128-wide blocks here), the TP all_reduces and the token shares each TP rank dispatches."""
    _eager_run_stays_close(fp8_v3, "dp2/tp2/ep4 on a shared GPU", **{**EP, "dp": 2, "tp": 2, "ep": 4})
