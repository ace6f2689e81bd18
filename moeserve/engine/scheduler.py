"""FCFS continuous batching under a token budget, with chunked prefill and preemption.

Each step the scheduler first keeps running requests going (a decode is one token; an
unfinished prefill takes its next chunk), then admits waiting requests while budget, sequence
slots and KV blocks last. When running requests cannot get a block, the most recently
arrived running request is preempted (its blocks freed, recomputed later), so the engine
never deadlocks and never drops a request.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from moeserve.config import SchedulerConfig
from moeserve.engine.kv_cache import KVCacheManager
from moeserve.engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    start: int = 0  # position of the first new token
    completes_sequence: bool = False  # reaches the sequence's end, so its last logits give a new token


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)  # one-token requests first
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int):
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_partial_prefills = 0  # prefill chunks that stopped short of the prompt's end

    # ---- requests in and out ----------------------------------------------------------------
    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the engine")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED_ABORTED
        self._finish(request)
        return request

    def _finish(self, request: Request) -> None:
        self.kv.free(request)
        self.requests.pop(request.request_id, None)

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # ---- one step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []

        # 1. Running requests, oldest first.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            if request.ends_with_pending_token():
                i += 1  # the step in flight gives its last token
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate(request, num_new):
                victim = self.running.pop()  # the newest arrival gives way
                self._preempt(victim)
                out.preempted.append(victim)
                scheduled = [s for s in scheduled if s.request is not victim]
                if victim is request:
                    break
            else:
                scheduled.append(ScheduledRequest(request, num_new))
                budget -= num_new
                i += 1
                continue
            break  # the request itself was preempted: everything after it is gone too

        # 2. Waiting requests, FCFS; stop at the first that does not fit (no overtaking).
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not out.preempted:
            request = self.waiting[0]
            hits = self.kv.find_cached_prefix(request)
            num_cached = len(hits) * self.kv.block_size
            num_new = request.num_tokens - num_cached
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if not self.kv.allocate(request, num_new, hits):
                break
            self.waiting.popleft()
            if request.num_preemptions == 0:
                self.kv.record_lookup(len(request.prompt_token_ids), num_cached)
                request.num_cached_tokens = num_cached
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new

        # The scheduled tokens count as computed from now on (their KV is written before any later
        # step reads it: steps run in order on one stream); a chunk that reaches the sequence's
        # end will sample a token, pending until update() appends it.
        for s in scheduled:
            r = s.request
            s.start = r.num_computed_tokens
            s.completes_sequence = s.start + s.num_new_tokens == r.num_tokens
            r.num_computed_tokens += s.num_new_tokens
            if s.completes_sequence:
                r.num_pending_tokens += 1
            else:
                self.num_partial_prefills += 1
        # Decodes (one new token) first, as attention metadata expects.
        out.scheduled = sorted(scheduled, key=lambda s: s.num_new_tokens != 1)
        return out

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_pending_tokens = 0  # a step in flight may still give it: update() appends it
        request.num_cached_blocks_registered = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update(self, out: SchedulerOutput, sampled: dict[str, tuple[int, object]]) -> list[Request]:
        """After the step `out` ran: append its sampled tokens (request id -> (token, logprobs or
        None)), register newly full blocks in the prefix cache and free the finished. Returns the
        requests that got a token or finished.

        With asynchronous scheduling the next step was already scheduled: a request preempted
        there (WAITING again) still gets this step's token, which its recompute then includes."""
        touched = []
        for s in out.scheduled:
            request = s.request
            if request.status.finished:  # aborted, or ended by the step before (async scheduling)
                continue
            running = request.status == RequestStatus.RUNNING
            got = sampled.get(request.request_id)  # None: a prefill chunk in the middle of the prompt
            if got is not None:
                token, logprobs = got
                if request.num_pending_tokens:
                    request.num_pending_tokens -= 1
                request.output_token_ids.append(token)
                if logprobs is not None:
                    request.output_logprobs.append(logprobs)
            if running:
                self.kv.cache_full_blocks(request)
            if got is None:
                continue
            touched.append(request)
            if request.check_stop():
                (self.running if running else self.waiting).remove(request)
                self._finish(request)
        return touched
