"""A request's life inside the engine: WAITING -> RUNNING (prefill chunks, then decode) -> FINISHED.

A preempted request goes back to WAITING with its generated tokens kept; when it runs again
its whole sequence (prompt + output so far) is recomputed, mostly from the prefix cache.

With asynchronous scheduling the next step is scheduled while the current one still runs on the
GPU, so a request may have a *pending* token: sampled by a step in flight, not yet seen by the
host. It counts in num_tokens (the next step feeds it to the model straight from the device).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from moeserve.engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"  # eos, a stop token or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or the context window
    FINISHED_ABORTED = "abort"  # client went away or asked

    @property
    def finished(self) -> bool:
        return self not in (RequestStatus.WAITING, RequestStatus.RUNNING)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    max_total_tokens: int = 1 << 30  # the context window: prompt + output never exceed it
    arrival_time: float = field(default_factory=time.monotonic)

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # per generated token: (sampled logprob, [(token, logprob)] top-N) when params.logprobs is set
    output_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # of the prompt, found in the prefix cache at first schedule
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    generator: object | None = None  # torch.Generator for seeded sampling, made by the runner
    block_keys: list = field(default_factory=list)  # prefix-cache keys of its full blocks, grown as it goes
    num_cached_blocks_registered: int = 0  # of its blocks, how many the prefix cache has seen
    num_pending_tokens: int = 0  # sampled by a step in flight, not yet appended (0 or 1)

    @property
    def num_tokens(self) -> int:
        """Known tokens plus the pending one: the sequence length the scheduler plans for."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    @property
    def num_known_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def ends_with_pending_token(self) -> bool:
        """Its pending token will end it by length (max_tokens or the context window) whatever the
        token is, so there is no point scheduling another step for it."""
        if not self.num_pending_tokens:
            return False
        num_out = len(self.output_token_ids) + self.num_pending_tokens
        return (self.params.max_tokens is not None and num_out >= self.params.max_tokens) or \
            self.num_tokens >= self.max_total_tokens

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without copying the whole sequence (a decode needs one token)."""
        num_prompt = len(self.prompt_token_ids)
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt:end - num_prompt]
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - num_prompt]

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def check_stop(self) -> bool:
        """After a token is appended: set a finished status if generation must end here."""
        num_out = len(self.output_token_ids)
        last = self.output_token_ids[-1]
        if num_out >= self.params.min_tokens:
            if not self.params.ignore_eos and last in self.eos_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                return True
            if last in self.params.stop_token_ids:
                self.status, self.stop_reason = RequestStatus.FINISHED_STOPPED, last
                return True
        if (self.params.max_tokens is not None and num_out >= self.params.max_tokens) or \
                self.num_known_tokens >= self.max_total_tokens:
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        return False
