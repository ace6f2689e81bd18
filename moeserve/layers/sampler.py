"""Batched sampling that honours each row's own parameters.

Greedy rows take the argmax. Other rows: temperature, then top-k (torch.topk, not a sort of
the whole vocabulary), top-p and min-p over what is left, then one exponential race per row
(argmax of p / E with E ~ Exp(1), equivalent to drawing from p). A seeded row draws its noise
from its own generator, so its tokens do not depend on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeserve.host_copy import to_device
from moeserve.kernels.argmax import greedy_argmax


@dataclass
class SamplingBatch:
    temperature: torch.Tensor  # [N] fp32; 0 = greedy
    top_k: list[int]  # 0 = off
    top_p: torch.Tensor  # [N] fp32
    min_p: torch.Tensor  # [N] fp32
    generators: list[torch.Generator | None]
    banned: list[list[int]]  # token ids that may not be sampled yet (eos before min_tokens)
    num_logprobs: list[int | None]
    # Known on the host (the runner builds the batch from host values); None: read from the
    # tensors, which waits for the GPU.
    all_greedy: bool | None = None
    filters_p: bool | None = None  # some row has top_p < 1 or min_p > 0


@dataclass
class LogprobTensors:
    """On the device: the sampled token's logprob [N] and the top-n (values, ids) [N, n]."""
    chosen: torch.Tensor
    top_values: torch.Tensor
    top_ids: torch.Tensor


def _filter_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: torch.Tensor,
                        min_p: torch.Tensor, need_p: bool | None = None) -> torch.Tensor:
    """Returns logits with the excluded entries at -inf."""
    vocab = logits.shape[-1]
    if need_p is None:
        need_p = bool((top_p < 1.0).any()) or bool((min_p > 0).any())
    k_max = max((k for k in top_k if k > 0), default=0)
    if k_max == 0 and not need_p:
        return logits
    if k_max and all(k > 0 for k in top_k):
        # Candidates: the k_max best per row, already sorted descending; no full-vocabulary sort.
        vals, idx = logits.topk(min(k_max, vocab), dim=-1)
        ks = to_device(top_k, torch.int64, logits.device)[:, None]
        vals = vals.masked_fill(torch.arange(vals.shape[-1], device=logits.device)[None] >= ks, float("-inf"))
    else:
        vals, idx = logits.sort(dim=-1, descending=True)
        ks = to_device([k if k > 0 else vocab for k in top_k], torch.int64, logits.device)[:, None]
        vals = vals.masked_fill(torch.arange(vocab, device=logits.device)[None] >= ks, float("-inf"))
    if need_p:
        probs = vals.softmax(dim=-1)
        # keep a token if the mass strictly before it is < top_p (the first token always stays)
        before = probs.cumsum(dim=-1) - probs
        drop = before >= top_p[:, None]
        drop |= probs < (min_p[:, None] * probs[:, :1])
        vals = vals.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(-1, idx, vals)


def sample_tokens(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, LogprobTensors | None]:
    """logits [N, V] -> tokens [N] int64 and, if any row asks for them, logprobs; all on the
    device, nothing waits for the GPU when the batch carries its host flags."""
    logits = logits.float()
    raw = logits
    if any(batch.banned):
        rows = [row for row, ids in enumerate(batch.banned) for _ in ids]
        cols = [t for ids in batch.banned for t in ids]
        logits = logits.index_put((to_device(rows, torch.int64, logits.device), to_device(cols, torch.int64, logits.device)),
                                  torch.tensor(float("-inf"), device=logits.device))
    greedy = batch.temperature == 0
    tokens = greedy_argmax(logits)
    all_greedy = bool(greedy.all()) if batch.all_greedy is None else batch.all_greedy
    if not all_greedy:
        temp = torch.where(greedy, torch.ones_like(batch.temperature), batch.temperature)
        filtered = _filter_top_k_top_p(logits / temp[:, None], batch.top_k, batch.top_p, batch.min_p, batch.filters_p)
        probs = filtered.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_()
        for row, gen in enumerate(batch.generators):
            if gen is not None:
                noise[row].exponential_(generator=gen)
        sampled = (probs / noise).argmax(dim=-1)
        tokens = torch.where(greedy, tokens, sampled)
    if all(n is None for n in batch.num_logprobs):
        return tokens, None
    lp = raw.log_softmax(dim=-1)
    n_max = max(n for n in batch.num_logprobs if n is not None)
    top_vals, top_idx = lp.topk(max(n_max, 1), dim=-1)
    return tokens, LogprobTensors(lp.gather(-1, tokens[:, None])[:, 0], top_vals, top_idx)


def format_logprobs(lp: LogprobTensors | None, num_logprobs: list[int | None]) -> list:
    """Host tensors -> per row None or (logprob, [(token, logprob)] top-N)."""
    out: list = [None] * len(num_logprobs)
    if lp is None:
        return out
    chosen_l, vals_l, idx_l = lp.chosen.tolist(), lp.top_values.tolist(), lp.top_ids.tolist()
    for row, n in enumerate(num_logprobs):
        if n is not None:
            out[row] = (chosen_l[row], list(zip(idx_l[row][:n], vals_l[row][:n])))
    return out


def sample(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, list]:
    """logits [N, V] fp32 -> (tokens [N] int64, per row None or (logprob, [(token, logprob)] top-N))."""
    tokens, lp = sample_tokens(logits, batch)
    return tokens, format_logprobs(lp, batch.num_logprobs)
