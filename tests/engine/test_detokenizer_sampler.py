"""Incremental detokenization (no broken UTF-8, stop strings never emitted) and the sampler's
filters against a plain sort-based reference."""

import torch

from moeserve.engine.detokenizer import IncrementalDetokenizer
from moeserve.layers.sampler import SamplingBatch, _filter_top_k_top_p, sample
from moeserve.models.tokenizer import load_tokenizer


def test_multibyte_characters_are_never_split(deepseek_v3_dir):
    tok = load_tokenizer(deepseek_v3_dir)
    text = "naïve café 🙂 über 日本語 ok"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens here
    detok = IncrementalDetokenizer(tok, tok.encode("prompt:", add_special_tokens=False), stop=[])
    pieces = []
    for t in ids:
        assert detok.add([t]) is None
        pieces.append(detok.take(finished=False))
    pieces.append(detok.take(finished=True))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids)


def test_stop_string_across_tokens_is_held_back(deepseek_v3_dir):
    tok = load_tokenizer(deepseek_v3_dir)
    ids = tok.encode("alpha beta STOP gamma", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["STOP"])
    streamed, hit = "", None
    for t in ids:
        hit = detok.add([t])
        streamed += detok.take(finished=hit is not None)
        if hit:
            break
    assert hit == "STOP"
    assert streamed == "alpha beta " and "S" not in streamed


def reference_filter(logits, k, p, min_p):
    out = torch.full_like(logits, float("-inf"))
    for row in range(logits.shape[0]):
        vals, idx = logits[row].sort(descending=True)
        keep = torch.ones_like(vals, dtype=torch.bool)
        if k[row] > 0:
            keep[k[row]:] = False
        probs = vals.masked_fill(~keep, float("-inf")).softmax(-1)
        cum = 0.0
        for j in range(len(vals)):
            if cum >= p[row] or probs[j] < min_p[row] * probs[0]:
                keep[j] = False
            cum += probs[j].item()
        out[row, idx[keep]] = vals[keep]
    return out


def test_filters_match_sorting_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=g) * 3
    top_p = torch.tensor([1.0, 0.9, 0.5, 0.95, 0.3])
    min_p = torch.tensor([0.0, 0.0, 0.05, 0.1, 0.0])
    for top_k in ([0, 0, 0, 0, 0], [5, 40, 300, 1, 17], [0, 10, 0, 3, 0]):
        got = _filter_top_k_top_p(logits, top_k, top_p, min_p)
        assert torch.equal(torch.isinf(got), torch.isinf(reference_filter(logits, top_k, top_p, min_p)))


def test_samples_stay_in_the_allowed_set_and_seeds_reproduce():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))

    def batch(seed):
        return SamplingBatch(temperature=torch.tensor([0.0, 1.0, 0.7, 1.0]), top_k=[0, 3, 0, 0],
                             top_p=torch.tensor([1.0, 1.0, 0.5, 1.0]), min_p=torch.zeros(4),
                             generators=[None, torch.Generator().manual_seed(seed), None,
                                         torch.Generator().manual_seed(seed + 1)],
                             banned=[[int(logits[0].argmax())], [], [], []], num_logprobs=[None, 2, None, None])
    tokens, lps = sample(logits, batch(5))
    assert tokens[0] != logits[0].argmax() and tokens[0] == logits[0].topk(2).indices[1]  # banned -> next best
    assert tokens[1] in logits[1].topk(3).indices
    assert lps[1][0] == logits[1].log_softmax(-1)[tokens[1]].item() and len(lps[1][1]) == 2
    again, _ = sample(logits, batch(5))
    assert again[1] == tokens[1] and again[3] == tokens[3]
    draws = {tuple(sample(logits, batch(s))[0][[1, 3]].tolist()) for s in range(20)}
    assert len(draws) > 1
