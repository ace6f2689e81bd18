"""Bad input gets OpenAI's error JSON with the right status and a message that says what is
wrong, and the server keeps serving: a normal request right after each one succeeds."""

import httpx
import pytest


def ok(server, model_name):
    r = httpx.post(server.url + "/v1/completions",
                   json={"model": model_name, "prompt": "fine", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


CASES = {
    "malformed_json": ("/v1/completions", b'{"prompt": "x", ', 400, "not valid JSON"),
    "wrong_type": ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    "missing_prompt": ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    "prompt_too_long": ("/v1/completions", {"prompt": [3 + i % 400 for i in range(600)], "max_tokens": 3}, 400,
                        "maximum context length is 512"),
    "prompt_plus_max_tokens_too_long": ("/v1/completions", {"prompt": [3 + i % 400 for i in range(497)], "max_tokens": 100}, 400,
                                        "maximum context length"),
    "max_tokens_zero": ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    "max_tokens_negative": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                     "max_tokens": -3}, 400, "max_tokens"),
    "negative_temperature": ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    "unknown_model": ("/v1/completions", {"model": "no-such-model", "prompt": "x"}, 404, "does not exist"),
    "empty_messages": ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    "bad_role": ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    "token_out_of_vocab": ("/v1/completions", {"prompt": [10**7], "max_tokens": 2}, 400, "token ids"),
    "bad_top_p": ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(server, model_name, case):
    path, body, status, words = CASES[case]
    if isinstance(body, dict) and case != "unknown_model":
        body = {"model": model_name, **body}
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words.lower() in err["message"].lower(), err
    assert err["code"] == status and err["type"]
    ok(server, model_name)


def test_openai_client_raises_typed_errors(client, model_name):
    import openai

    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=model_name, prompt="x", temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
