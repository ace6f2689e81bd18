"""The engine end to end on tiny checkpoints (fp32, CPU): batching invariance, preemption,
chunked prefill, prefix caching, sampling parameters, and transformers' generate as oracle."""

import random

import pytest
import torch

from moeserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def make_prompts(vocab: int, n: int = 32, seed: int = 0) -> list[list[int]]:
    """Mixed lengths (3..40 tokens); groups share long prefixes (12..24 tokens)."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, vocab) for _ in range(rng.randrange(12, 25))] for _ in range(4)]
    prompts = []
    for i in range(n):
        tail = [rng.randrange(3, vocab) for _ in range(rng.randrange(3, 17))]
        prompts.append(prefixes[i % 4] + tail if i % 3 else tail)
    return prompts


def make_llm(path, **kw):
    kw = {"dtype": "float32", "device": "cpu", "block_size": 4, "num_blocks": 512, **kw}
    return LLM(path, **kw)


def token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def v3(deepseek_v3_dir):
    return deepseek_v3_dir


@pytest.fixture(scope="module")
def alone(v3):
    """Each prompt run by itself: the reference for every batched run."""
    llm = make_llm(v3, enable_prefix_caching=False)
    prompts = make_prompts(llm.engine.model_config.vocab_size)
    return prompts, [token_ids(llm.generate([p], GREEDY))[0] for p in prompts]


@pytest.mark.parametrize("case", ["prefix_cache_on", "prefix_cache_off", "preempting", "chunked"])
def test_batch_equals_alone(v3, alone, case):
    prompts, expected = alone
    kw = {
        "prefix_cache_on": {"max_num_seqs": 8},  # admitted over several steps, so later ones hit
        "prefix_cache_off": {"enable_prefix_caching": False},
        "preempting": {"num_blocks": 48},  # 188 token slots for 32 requests of up to 48 tokens
        "chunked": {"max_num_batched_tokens": 16},
    }[case]
    llm = make_llm(v3, **kw)
    got = token_ids(llm.generate(prompts, GREEDY))
    assert got == expected
    stats = llm.stats
    if case == "prefix_cache_on":
        assert stats.prefix_cache_hits > 0
    if case == "preempting":
        assert stats.num_preemptions > 0
    if case == "chunked":
        assert stats.num_partial_prefills > 0
        assert max(len(p) for p in prompts) > 16
    # Everything is handed back at the end.
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_blocks_used == 0


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe"])
def test_greedy_equals_transformers_generate(tiny_model, arch):
    from transformers import AutoModelForCausalLM

    path = tiny_model(arch)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = make_llm(path)
    prompts = make_prompts(llm.engine.model_config.vocab_size, n=8, seed=1)
    max_new = 16
    # min_tokens on both sides masks eos the same way for every step.
    ours = token_ids(llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_new, min_tokens=max_new)))
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_new, min_new_tokens=max_new,
                              do_sample=False, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert got == out[0, len(prompt):].tolist()


def test_default_kv_page_is_64_tokens_for_mla_and_16_otherwise(v3, qwen3_moe_dir):
    """No block_size given: MLA models get 64-token pages (their decode kernel addresses a tile from one
    page), others 16; prefix caching then counts whole pages of that size, and the greedy tokens are
    those of 4-token pages."""
    prompt = list(range(3, 103))  # 100 tokens: one full 64-token page, six of 16
    for path, page in ((v3, 64), (qwen3_moe_dir, 16)):
        llm = LLM(path, dtype="float32", device="cpu", num_blocks=64)
        assert llm.engine.runner.block_size == page and llm.engine.kv.block_size == page
        first = llm.generate([prompt], GREEDY)[0]
        again = llm.generate([prompt + [7]], GREEDY)[0]
        assert again.num_cached_tokens == (len(prompt) // page) * page
        assert first.outputs[0].token_ids == token_ids(make_llm(path).generate([prompt], GREEDY))[0]


def test_shared_prefix_computes_only_new_tokens(v3):
    llm = make_llm(v3)
    prefix = list(range(10, 22))  # 3 full blocks of 4
    first = llm.generate([prefix + [30]], SamplingParams(temperature=0, max_tokens=3))[0]
    assert first.num_cached_tokens == 0
    before = llm.stats.num_tokens_computed
    second = llm.generate([prefix + [40, 41]], SamplingParams(temperature=0, max_tokens=1))[0]
    assert second.num_cached_tokens == 12
    assert llm.stats.num_tokens_computed - before == 2
    # Same tokens as without the cache.
    cold = make_llm(v3, enable_prefix_caching=False).generate([prefix + [40, 41]],
                                                              SamplingParams(temperature=0, max_tokens=1))[0]
    assert second.outputs[0].token_ids == cold.outputs[0].token_ids


def test_seeded_sampling(v3):
    llm = make_llm(v3)
    prompts = make_prompts(llm.engine.model_config.vocab_size, n=6, seed=2)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7, max_tokens=12, ignore_eos=True)
    alone = token_ids(llm.generate([prompts[0]], seeded))[0]
    assert token_ids(llm.generate([prompts[0]], seeded))[0] == alone
    # Unaffected by neighbours that sample with and without their own seeds.
    neighbours = [SamplingParams(temperature=0.8, max_tokens=5), SamplingParams(temperature=1.2, seed=3, max_tokens=20)]
    batch = llm.generate(prompts[:3], [seeded] + neighbours)
    assert batch[0].outputs[0].token_ids == alone
    other = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=8, max_tokens=12, ignore_eos=True)
    assert token_ids(llm.generate([prompts[0]], other))[0] != alone


def test_top_k_1_is_greedy(v3):
    llm = make_llm(v3)
    prompts = make_prompts(llm.engine.model_config.vocab_size, n=4, seed=3)
    greedy = token_ids(llm.generate(prompts, GREEDY))
    top1 = token_ids(llm.generate(prompts, SamplingParams(temperature=1.3, top_k=1, max_tokens=8, ignore_eos=True)))
    assert top1 == greedy


def test_stop_strings_and_stop_tokens(v3):
    llm = make_llm(v3)
    prompt = "the quick brown fox"
    full = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0].outputs[0]
    text = full.text
    k = next(i for i in range(3, len(text) - 2) if "\ufffd" not in text[i:i + 2])
    stop = text[k:k + 2]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))[0]
    o = out.outputs[0]
    assert o.text == text[:text.find(stop)] and stop not in o.text
    assert o.finish_reason == "stop" and o.stop_reason == stop
    assert o.token_ids == full.token_ids[:len(o.token_ids)] and len(o.token_ids) < 24

    stop_token = full.token_ids[5]
    o = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                              stop_token_ids=[stop_token]))[0].outputs[0]
    first = full.token_ids.index(stop_token)
    assert o.token_ids == full.token_ids[:first + 1]
    assert o.finish_reason == "stop" and o.stop_reason == stop_token
    # max_tokens ends with "length".
    assert full.finish_reason == "length" and len(full.token_ids) == 24
    # min_tokens holds a stop token back.
    o = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=24, min_tokens=first + 3, ignore_eos=True,
                                              stop_token_ids=[stop_token]))[0].outputs[0]
    assert len(o.token_ids) >= first + 3 and stop_token not in o.token_ids[:first + 2]


def test_n_and_logprobs(v3):
    llm = make_llm(v3)
    out = llm.generate(["hello"], SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=8, logprobs=3,
                                                 ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1]
    assert out.outputs[0].token_ids != out.outputs[1].token_ids
    for o in out.outputs:
        assert len(o.token_ids) == 8 and len(o.logprobs) == 8
        for token, lps in zip(o.token_ids, o.logprobs):
            assert token in lps and len(lps) in (3, 4)
            assert all(v <= 0 for v in lps.values())
        assert o.cumulative_logprob == pytest.approx(sum(lp[t] for t, lp in zip(o.token_ids, o.logprobs)))


def test_bad_input_is_refused_and_engine_stays_usable(v3):
    llm = make_llm(v3, max_model_len=64)
    with pytest.raises(ValueError, match="context window"):
        llm.generate([list(range(3, 70))], GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="token ids"):
        llm.generate([[10**6]], GREEDY)
    assert llm.stats.num_waiting == 0 and llm.stats.kv_blocks_used == 0
    assert len(llm.generate(["ok"], GREEDY)[0].outputs[0].token_ids) == 8
    # The context window ends generation with "length".
    out = llm.generate([list(range(3, 60))], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 64 - 57
