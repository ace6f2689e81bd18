"""Asynchronous scheduling (step n+1 scheduled and launched before step n's tokens reach the
host) gives exactly the outputs of synchronous scheduling: tokens, logprobs, finish reasons,
under stop tokens, min_tokens, seeded sampling, preemption, chunked prefill and prefix caching."""

import pytest

from moeserve import LLM, SamplingParams
from moeserve.config import EngineConfig
from moeserve.engine.core import EngineCore
from tests.engine.test_engine import make_prompts


def run(path, params, prompts, **kw):
    llm = LLM(path, dtype="float32", device="cpu", block_size=4, **{"num_blocks": 512, **kw})
    outs = [o.outputs[0] for o in llm.generate(prompts, params)]
    engine = llm.engine
    assert not engine.has_unfinished() and engine.kv.num_free_blocks == engine.kv.num_usable_blocks
    return [(o.token_ids, o.finish_reason, o.stop_reason, o.logprobs) for o in outs], llm.stats


@pytest.fixture(scope="module")
def case(deepseek_v3_dir):
    """Twelve prompts, each with its own parameters; stop tokens picked from a first greedy run so
    that several requests end early (the step already in flight then has a row to drop)."""
    path = deepseek_v3_dir
    prompts = make_prompts(LLM(path, device="cpu", dtype="float32", num_blocks=64).engine.model_config.vocab_size,
                           n=12, seed=5)
    plain = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    first, _ = run(path, plain, prompts, async_scheduling=False)
    params = []
    for i, (tokens, *_rest) in enumerate(first):
        kind = i % 4
        if kind == 0:  # greedy, ended by a stop token the model emits at position 4
            params.append(SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, stop_token_ids=[tokens[4]]))
        elif kind == 1:  # seeded sampling, a stop token held back by min_tokens
            params.append(SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=i, max_tokens=10 + i,
                                         min_tokens=6, ignore_eos=True, stop_token_ids=[tokens[2]]))
        elif kind == 2:  # greedy with logprobs
            params.append(SamplingParams(temperature=0, max_tokens=3 + i, logprobs=2, ignore_eos=True))
        else:  # seeded sampling with logprobs, ended by length
            params.append(SamplingParams(temperature=1.1, seed=100 + i, max_tokens=7, logprobs=1, ignore_eos=True))
    return path, prompts, params


@pytest.mark.parametrize("setting", ["plain", "preempting", "chunked", "prefix_cache_off"])
def test_async_equals_sync(case, setting):
    path, prompts, params = case
    kw = {"plain": {}, "preempting": {"num_blocks": 40}, "chunked": {"max_num_batched_tokens": 16},
          "prefix_cache_off": {"enable_prefix_caching": False}}[setting]
    sync, _ = run(path, params, prompts, async_scheduling=False, **kw)
    overlapped, stats = run(path, params, prompts, async_scheduling=True, **kw)
    # The steps batch differently (a finished request leaves one step later), so fp32 logprobs may
    # differ in the last bits; tokens, finish reasons and the top-n token ids may not.
    assert [o[:3] for o in overlapped] == [o[:3] for o in sync]
    for (*_a, lp_async), (*_s, lp_sync) in zip(overlapped, sync):
        assert (lp_async is None) == (lp_sync is None)
        for a, b in zip(lp_async or [], lp_sync or []):
            assert a.keys() == b.keys() and all(a[t] == pytest.approx(b[t], abs=1e-4) for t in a)
    assert any(reason == "stop" for _, reason, _, _ in sync)  # some requests did end early
    if setting == "preempting":
        assert stats.num_preemptions > 0
    if setting == "chunked":
        assert stats.num_partial_prefills > 0


def test_pending_token_is_read_from_the_step_in_flight(deepseek_v3_dir):
    """The engine reports step n while step n+1 is already queued: after the first step() nothing is
    reported and the request's sampled token is pending; the next step feeds it from the device."""
    config = EngineConfig.from_kwargs(deepseek_v3_dir, dtype="float32", device="cpu", block_size=4, num_blocks=64)
    engine = EngineCore(config)
    assert engine.async_scheduling
    engine.add_request("a", [5, 6, 7, 8, 9], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert engine.step() == []
    request = engine.scheduler.requests["a"]
    assert request.num_pending_tokens == 1 and request.output_token_ids == []
    tokens = []
    for _ in range(3):
        outs = engine.step()
        tokens += [t for o in outs for t in o.new_token_ids]
    # Step 3 was not scheduled: the pending third token ends the request by length.
    assert len(tokens) == 3 and not engine.has_unfinished() and engine.in_flight is None
    assert engine.stats.num_steps == 3

    sync = EngineCore(EngineConfig.from_kwargs(deepseek_v3_dir, dtype="float32", device="cpu", block_size=4,
                                               num_blocks=64, async_scheduling=False))
    sync.add_request("a", [5, 6, 7, 8, 9], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    expected = []
    while sync.has_unfinished():
        expected += [t for o in sync.step() for t in o.new_token_ids]
    assert tokens == expected
