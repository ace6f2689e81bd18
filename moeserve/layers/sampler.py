"""Batched sampling that honours each row's own parameters.

Greedy rows take the argmax. Other rows: temperature, then top-k (torch.topk, not a sort of
the whole vocabulary), top-p and min-p over what is left, then one exponential race per row
(argmax of p / E with E ~ Exp(1), equivalent to drawing from p). A seeded row draws its noise
from its own generator, so its tokens do not depend on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingBatch:
    temperature: torch.Tensor  # [N] fp32; 0 = greedy
    top_k: list[int]  # 0 = off
    top_p: torch.Tensor  # [N] fp32
    min_p: torch.Tensor  # [N] fp32
    generators: list[torch.Generator | None]
    banned: list[list[int]]  # token ids that may not be sampled yet (eos before min_tokens)
    num_logprobs: list[int | None]


def _filter_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: torch.Tensor,
                        min_p: torch.Tensor) -> torch.Tensor:
    """Returns logits with the excluded entries at -inf."""
    vocab = logits.shape[-1]
    need_p = bool((top_p < 1.0).any()) or bool((min_p > 0).any())
    k_max = max((k for k in top_k if k > 0), default=0)
    if k_max == 0 and not need_p:
        return logits
    if k_max and all(k > 0 for k in top_k):
        # Candidates: the k_max best per row, already sorted descending; no full-vocabulary sort.
        vals, idx = logits.topk(min(k_max, vocab), dim=-1)
        ks = torch.tensor(top_k, device=logits.device)[:, None]
        vals = vals.masked_fill(torch.arange(vals.shape[-1], device=logits.device)[None] >= ks, float("-inf"))
    else:
        vals, idx = logits.sort(dim=-1, descending=True)
        ks = torch.tensor([k if k > 0 else vocab for k in top_k], device=logits.device)[:, None]
        vals = vals.masked_fill(torch.arange(vocab, device=logits.device)[None] >= ks, float("-inf"))
    if need_p:
        probs = vals.softmax(dim=-1)
        # keep a token if the mass strictly before it is < top_p (the first token always stays)
        before = probs.cumsum(dim=-1) - probs
        drop = before >= top_p[:, None]
        drop |= probs < (min_p[:, None] * probs[:, :1])
        vals = vals.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(-1, idx, vals)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, list]:
    """logits [N, V] fp32 -> (tokens [N] int64, per row None or (logprob, [(token, logprob)] top-N))."""
    logits = logits.float()
    raw = logits
    if any(batch.banned):
        logits = logits.clone()
        for row, ids in enumerate(batch.banned):
            if ids:
                logits[row, ids] = float("-inf")
    greedy = batch.temperature == 0
    tokens = logits.argmax(dim=-1)
    if not bool(greedy.all()):
        temp = torch.where(greedy, torch.ones_like(batch.temperature), batch.temperature)
        filtered = _filter_top_k_top_p(logits / temp[:, None], batch.top_k, batch.top_p, batch.min_p)
        probs = filtered.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_()
        for row, gen in enumerate(batch.generators):
            if gen is not None:
                noise[row].exponential_(generator=gen)
        sampled = (probs / noise).argmax(dim=-1)
        tokens = torch.where(greedy, tokens, sampled)

    logprobs: list = [None] * logits.shape[0]
    if any(n is not None for n in batch.num_logprobs):
        lp = raw.log_softmax(dim=-1)
        n_max = max(n for n in batch.num_logprobs if n is not None)
        top_vals, top_idx = lp.topk(max(n_max, 1), dim=-1)
        chosen = lp.gather(-1, tokens[:, None])[:, 0]
        chosen_l, vals_l, idx_l = chosen.tolist(), top_vals.tolist(), top_idx.tolist()
        for row, n in enumerate(batch.num_logprobs):
            if n is not None:
                logprobs[row] = (chosen_l[row], list(zip(idx_l[row][:n], vals_l[row][:n])))
    return tokens, logprobs
