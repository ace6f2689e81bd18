"""What the engine reports and what callers get back.

`EngineOutput` is the per-step, per-request message of the engine core (a msgspec Struct, so
it crosses the ZMQ socket as msgpack). `OutputProcessor` runs in the caller's process (the
offline `LLM` or the API server): it fans a request with n > 1 out into n engine requests,
detokenizes incrementally, applies stop strings (and asks the engine to abort those requests)
and assembles vLLM-shaped `RequestOutput`s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import msgspec

from moeserve.engine.detokenizer import IncrementalDetokenizer
from moeserve.engine.sampling_params import SamplingParams


class EngineOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    new_token_ids: list[int]
    new_logprobs: list | None = None  # per token: (logprob, [(token, logprob), ...])
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None  # per token: {token: logprob}, sampled one included
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0


@dataclass
class Delta:
    """What one engine request added this step, for streaming."""

    request_id: str  # the caller's (parent) id
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, float]] | None
    finish_reason: str | None
    stop_reason: int | str | None


def child_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}#{index}"


class _Child:
    def __init__(self, index: int, detok: IncrementalDetokenizer | None, want_logprobs: bool):
        self.out = CompletionOutput(index=index, logprobs=[] if want_logprobs else None,
                                    cumulative_logprob=0.0 if want_logprobs else None)
        self.detok = detok


class _Parent:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams):
        self.request_id, self.prompt, self.prompt_token_ids, self.params = request_id, prompt, prompt_token_ids, params
        self.children: list[_Child] = []
        self.num_cached_tokens = 0
        self.arrival = time.monotonic()

    @property
    def finished(self) -> bool:
        return all(c.out.finished for c in self.children)

    def output(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids,
                             [replace(c.out, token_ids=list(c.out.token_ids)) for c in self.children],
                             self.finished, self.num_cached_tokens)


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.parents: dict[str, _Parent] = {}
        self.children: dict[str, tuple[_Parent, _Child]] = {}

    def add(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
            params: SamplingParams) -> list[tuple[str, SamplingParams]]:
        """Register a request; returns the (engine request id, params) pairs to send to the engine."""
        if request_id in self.parents:
            raise ValueError(f"request id {request_id!r} is already in flight")
        parent = _Parent(request_id, prompt, prompt_token_ids, params)
        self.parents[request_id] = parent
        pairs = []
        for i in range(params.n):
            # Children get distinct seeds so n seeded samples differ but still reproduce.
            child_params = replace(params, n=1, seed=None if params.seed is None else params.seed + i)
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.stop,
                                               params.skip_special_tokens, params.include_stop_str_in_output)
            child = _Child(i, detok, params.logprobs is not None)
            parent.children.append(child)
            cid = child_id(request_id, i, params.n)
            self.children[cid] = (parent, child)
            pairs.append((cid, child_params))
        return pairs

    def engine_ids(self, request_id: str) -> list[str]:
        parent = self.parents.get(request_id)
        if parent is None:
            return []
        n = len(parent.children)
        return [child_id(request_id, c.out.index, n) for c in parent.children if not c.out.finished]

    def process(self, outputs: list[EngineOutput]) -> tuple[list[Delta], list[str]]:
        """Apply one step's engine outputs. Returns the deltas and the engine request ids that a
        stop string finished (the caller must abort them in the engine)."""
        deltas, to_abort = [], []
        for eo in outputs:
            entry = self.children.get(eo.request_id)
            if entry is None:
                continue  # aborted by us already
            parent, child = entry
            out = child.out
            parent.num_cached_tokens = max(parent.num_cached_tokens, eo.num_cached_tokens)
            out.token_ids.extend(eo.new_token_ids)
            new_lps = None
            if out.logprobs is not None and eo.new_logprobs:
                new_lps = []
                for token, (chosen, top) in zip(eo.new_token_ids, eo.new_logprobs):
                    entry_lp = {int(t): float(v) for t, v in top}
                    entry_lp[token] = float(chosen)
                    new_lps.append(entry_lp)
                    out.cumulative_logprob += float(chosen)
                out.logprobs.extend(new_lps)
            finish, stop_reason = eo.finish_reason, eo.stop_reason
            text = ""
            if child.detok is not None:
                hit = child.detok.add(eo.new_token_ids)
                if hit is not None and finish is None:
                    finish, stop_reason = "stop", hit
                    to_abort.append(eo.request_id)
                text = child.detok.take(finished=finish is not None)
                out.text = child.detok.text if finish is not None else child.detok.text[:child.detok.sent]
            if finish is not None:
                out.finish_reason, out.stop_reason = finish, stop_reason
                del self.children[eo.request_id]
            deltas.append(Delta(parent.request_id, out.index, text, list(eo.new_token_ids), new_lps, finish,
                                stop_reason))
        return deltas, to_abort

    def abort(self, request_id: str) -> list[str]:
        """Forget a request; returns its engine ids still running (to abort in the engine)."""
        ids = self.engine_ids(request_id)
        for cid in ids:
            self.children.pop(cid, None)
        self.parents.pop(request_id, None)
        return ids

    def pop_if_finished(self, request_id: str) -> RequestOutput | None:
        parent = self.parents.get(request_id)
        if parent is None or not parent.finished:
            return None
        del self.parents[request_id]
        return parent.output()

    def output(self, request_id: str) -> RequestOutput:
        return self.parents[request_id].output()
