"""The start-up forwards at prefill sizes (EngineConfig.warmup_prefill): which sizes, and, on a GPU, that a
warmed-up engine compiles no Triton kernel while it serves prompts of sizes it never saw."""

from __future__ import annotations

import argparse

import pytest
import torch

from moeserve.config import EngineConfig
from moeserve.engine.llm import add_engine_args, engine_kwargs
from moeserve.engine.runner import prefill_warmup_sizes


def test_sizes_cover_every_power_of_two_and_one_past_it():
    assert prefill_warmup_sizes(100) == [1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64, 65, 100]
    sizes = prefill_warmup_sizes(8192)
    assert sizes[:4] == [1, 2, 3, 4] and sizes[-2:] == [4097, 8192]
    assert all(2 ** i in sizes and 2 ** i + 1 in sizes for i in range(13))
    assert prefill_warmup_sizes(20, smallest=16) == [16, 17, 20] and prefill_warmup_sizes(8) == [1, 2, 3, 4, 5, 8]


def test_on_gpus_by_default_and_off_by_flag():
    assert EngineConfig(model="m").warmup_prefill is None  # on GPUs; True runs it on CPU too (test_dp_ep.py)
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_kwargs(parser.parse_args(["--model", "m"]))["warmup_prefill"] is None
    assert engine_kwargs(parser.parse_args(["--model", "m", "--no-warmup-prefill"]))["warmup_prefill"] is False


def _compiles_while_serving(path: str, warmup: bool) -> int:
    import triton

    from moeserve.engine.llm import LLM
    from moeserve.engine.sampling_params import SamplingParams

    llm = LLM(path, device="cuda", max_num_batched_tokens=512, max_num_seqs=8, warmup_prefill=warmup)
    compiled = []
    hooks = triton.knobs.runtime
    before = hooks.jit_post_compile_hook
    hooks.jit_post_compile_hook = lambda *args, **kwargs: compiled.append(kwargs.get("fn"))
    try:
        greedy = SamplingParams(max_tokens=4, temperature=0.0)
        gen = torch.Generator().manual_seed(0)
        # sizes the warm-up never ran: one prompt of 300 tokens, one of 5 (an odd count: the positions
        # after the ids in the step's upload), then three together (100 + 37 + 5)
        for lens in ([300], [5], [100, 37, 5]):
            prompts = [torch.randint(3, 200, (n,), generator=gen).tolist() for n in lens]
            llm.generate(prompts, greedy)
    finally:
        hooks.jit_post_compile_hook = before
    return len(compiled)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_warmed_up_engine_compiles_nothing_while_serving(deepseek_v3_dir):
    import triton

    if not hasattr(getattr(triton, "knobs", None), "runtime") or \
            not hasattr(triton.knobs.runtime, "jit_post_compile_hook"):
        pytest.skip("this Triton has no compile hook to count with")
    assert _compiles_while_serving(deepseek_v3_dir, warmup=False) > 0  # what the warm-up is for
    assert _compiles_while_serving(deepseek_v3_dir, warmup=True) == 0


def test_compile_warning_is_quiet_while_an_engine_starts_up(caplog, monkeypatch):
    """warn_on_compiles' hook: a compile while some engine of the process is inside its start-up (a
    benchmark building its second engine) is the start-up's, not a stall of serving: no warning."""
    import triton

    from moeserve.engine import runner

    hooks = triton.knobs.runtime
    monkeypatch.setattr(hooks, "jit_post_compile_hook", None)
    monkeypatch.setattr(runner, "_compile_hook_installed", False)
    runner.warn_on_compiles()
    monkeypatch.setattr(runner, "_engines_starting", 1)
    with caplog.at_level("WARNING", logger=runner.__name__):
        hooks.jit_post_compile_hook(key="[('*bf16', 'D')]")
        assert not caplog.records
        monkeypatch.setattr(runner, "_engines_starting", 0)
        hooks.jit_post_compile_hook(key="[('*bf16', 'D')]")
    assert len(caplog.records) == 1 and "after start-up" in caplog.records[0].getMessage()
