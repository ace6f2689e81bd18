"""The real server, driven by the official openai client: routes, streaming, usage, sampling."""

import httpx

from moeserve import LLM, SamplingParams


def test_models_and_health(server, client, model_name):
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name]
    assert httpx.get(server.url + "/health").status_code == 200


def test_completion_and_usage(client, model_name):
    r = client.completions.create(model=model_name, prompt="hello world", max_tokens=7, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + 7


def test_greedy_equals_offline_api(client, model_name):
    prompts = ["the quick brown fox", "hello", "a b c d e f"]
    llm = LLM(model_name, dtype="float32", device="cpu", block_size=4, num_blocks=256)
    offline = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for prompt, ref in zip(prompts, offline):
        r = client.completions.create(model=model_name, prompt=prompt, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == ref.outputs[0].text


def test_streaming_completion_matches_non_streaming(client, model_name):
    kw = dict(model=model_name, prompt="streaming test", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].usage.completion_tokens == 10 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_streaming_and_not(client, model_name):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    r = client.chat.completions.create(model=model_name, messages=messages, max_completion_tokens=6, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens == 6
    stream = client.chat.completions.create(model=model_name, messages=messages, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == r.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_n_seed_and_stop(client, model_name):
    kw = dict(model=model_name, prompt="sample me", max_tokens=10, temperature=1.0, seed=11,
              extra_body={"ignore_eos": True})
    a = client.completions.create(n=2, **kw)
    assert sorted(c.index for c in a.choices) == [0, 1] and a.usage.completion_tokens == 20
    b = client.completions.create(n=2, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded: reproducible
    c = client.completions.create(**{**kw, "seed": 12})
    assert c.choices[0].text != a.choices[0].text
    full = client.completions.create(model=model_name, prompt="stop here", max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    k = next(i for i in range(2, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    stop = full[k:k + 2]
    r = client.completions.create(model=model_name, prompt="stop here", max_tokens=20, temperature=0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"


def test_logprobs(client, model_name):
    r = client.completions.create(model=model_name, prompt="lp", max_tokens=4, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and all(x <= 0 for x in lp.token_logprobs)
    # Greedy: the sampled token is the most likely one.
    assert all(abs(t - max(top.values())) < 1e-6 for t, top in zip(lp.token_logprobs, lp.top_logprobs))
    r = client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                       temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 for c in content)
