"""The engine core: one step = schedule -> run the model -> update requests -> report.

It knows token ids only (no text): tokenizing, detokenizing and stop strings happen in the
caller's process (`OutputProcessor`). The offline `LLM` drives it in-process; the API server
runs it in its own process (`moeserve.engine.core_proc`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from moeserve.config import EngineConfig, ModelConfig
from moeserve.distributed.groups import get_parallel_state
from moeserve.engine.dp import setup_rank, teardown_rank
from moeserve.engine.kv_cache import KVCacheManager
from moeserve.engine.output import EngineOutput
from moeserve.engine.request import Request
from moeserve.engine.runner import ModelRunner
from moeserve.engine.sampling_params import SamplingParams
from moeserve.engine.scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """Kept each step; exported by the server as Prometheus gauges and counters."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_free: int = 0
    kv_usage: float = 0.0
    prefix_cache_queries: int = 0  # prompt tokens looked up
    prefix_cache_hits: int = 0
    prefix_cache_hit_rate: float = 0.0
    num_scheduled_tokens: int = 0  # in the last step
    num_preemptions: int = 0  # total
    num_partial_prefills: int = 0  # total prefill chunks that did not reach the prompt's end
    num_steps: int = 0
    num_tokens_computed: int = 0  # total tokens forwarded (prefill chunks and decodes)
    num_rebalances: int = 0  # expert placements applied by the load balancer
    expert_bytes_moved: int = 0  # expert weight bytes this rank received in those rebalances
    num_pending_inputs: int = 0  # total input tokens read on the device from the step in flight (async)
    dp_rank: int = 0


def check_prompt_length(num_prompt_tokens: int, max_model_len: int, kv_capacity_tokens: int) -> None:
    """ValueError if a prompt cannot be served (the server answers 400)."""
    if num_prompt_tokens == 0:
        raise ValueError("the prompt is empty")
    if num_prompt_tokens >= max_model_len:
        raise ValueError(f"the prompt has {num_prompt_tokens} tokens, but the context window is "
                         f"{max_model_len} tokens, which must also hold at least one output token")
    if num_prompt_tokens >= kv_capacity_tokens:
        raise ValueError(f"the prompt has {num_prompt_tokens} tokens, more than the KV cache holds "
                         f"({kv_capacity_tokens})")


class EngineCore:
    """rank: this engine's rank (one process per data-parallel group when dp > 1, see engine/dp.py;
    under tensor parallelism this is the group's TP rank 0 and its other TP ranks are workers,
    engine/tp.py)."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig | None = None, rank: int = 0):
        self.config = config
        self.model_config = model_config or ModelConfig.from_pretrained(config.model)
        self.rank = rank
        links = setup_rank(config, self.model_config, rank)
        self.dp = links.coordinator  # the data-parallel groups step in lockstep (ep > 1)
        self.tp = links.tp_channel
        state = get_parallel_state()
        self.ep_runtime = state.ep_runtime if state is not None else None
        self.stop_requested = False  # set by the caller; under DP every rank stops at the same step
        self.stopped = False
        self.global_tokens = 0  # under DP: the most tokens any group ran in the last step
        torch.manual_seed(config.seed)
        self.runner = ModelRunner(config, self.model_config, tp_channel=self.tp)
        # Overlap step n+1's host work with step n on the device (TP workers get the pending tokens
        # from rank 0, engine/tp.py; data-parallel groups agree on step n+1 while step n runs).
        self.async_scheduling = config.scheduler.async_scheduling
        self.in_flight = None  # (SchedulerOutput, SampledStep) launched and not yet reported
        self.kv = KVCacheManager(self.runner.num_blocks, self.runner.block_size, config.cache.enable_prefix_caching)
        model_len = config.scheduler.max_model_len or self.model_config.max_position_embeddings
        self.max_model_len = model_len
        self.scheduler = Scheduler(config.scheduler, self.kv, model_len)
        self.stats = EngineStats(dp_rank=rank // config.parallel.tp)
        self.eos_token_ids = tuple(self.model_config.eos_token_id)
        self._update_stats(0)

    # ---- requests ---------------------------------------------------------------------------
    def check_prompt(self, num_prompt_tokens: int) -> None:
        check_prompt_length(num_prompt_tokens, self.max_model_len, self.kv.num_usable_blocks * self.kv.block_size)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.check_prompt(len(prompt_token_ids))
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        capacity = self.kv.num_usable_blocks * self.kv.block_size
        self.scheduler.add(Request(request_id, list(prompt_token_ids), params, self.eos_token_ids,
                                   max_total_tokens=min(self.max_model_len, capacity)))

    def abort_requests(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.scheduler.abort(rid)
        if request_ids:
            self._update_stats(0)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ---- the step ---------------------------------------------------------------------------
    def step(self) -> list[EngineOutput]:
        if self.async_scheduling:
            return self._step_overlapped() if self.dp is None else self._step_lockstep_overlapped()
        sched = self.scheduler.schedule()
        if self.dp is not None:
            # Every rank forwards together (the MoE layers exchange tokens): agree first.
            global_tokens, stop, graphable = self.dp.sync(sched.num_tokens, self.stop_requested,
                                                          self.runner.can_graph(sched))
            self.global_tokens = global_tokens
            if stop:
                self.stopped = True
                return []
            if global_tokens == 0:
                self.heartbeat()
                self._update_stats(0)
                return []
            # Decode-only on every rank: all replay the graph sized for the largest batch (the
            # TP workers get the size with the step).
            graph_size = self.runner.graphs.size_for(global_tokens) if graphable else None
            if sched.is_empty:
                self.runner.execute_dummy(graph_size, ep_max=global_tokens)
                self._update_stats(0)
                return []
            sampled = self.runner.execute(sched, graph_size, local_graph_choice=False, ep_max=global_tokens)
        elif sched.is_empty:
            self.heartbeat()
            self._update_stats(0)
            return []
        else:
            sampled = self.runner.execute(sched)
        return self._finish_step(sched, sampled)

    def _step_overlapped(self) -> list[EngineOutput]:
        """Asynchronous scheduling: schedule and launch step n+1, then wait for step n and report
        it. The host's work (scheduling, building inputs, appending tokens, output messages) runs
        while the GPU computes, instead of between steps. Step n+1 reads the tokens step n samples
        from the device; a request that step n ends (eos, a stop token) costs one wasted row in
        step n+1, whose output is dropped."""
        sched = self.scheduler.schedule()
        launched = (sched, self.runner.launch(sched)) if not sched.is_empty else None
        if launched is None:
            self.heartbeat()
        return self._report(launched)

    def _step_lockstep_overlapped(self) -> list[EngineOutput]:
        """Asynchronous scheduling for data-parallel groups in lockstep (expert parallelism). Every
        rank does, in this order: schedule n+1 -> agree (gloo) -> launch n+1 (or the dummy) ->
        wait for n -> report n; so the collectives of every step match on all ranks, as in the
        synchronous step, while the agreement and the host work of n+1 overlap step n on the GPU.
        Waiting for n and reporting it involve no collective, so a rank may be at different
        points of that without anyone waiting for it.

        When the ranks agree to stop, or that nobody has tokens to run, nothing more is launched
        and this rank's step in flight (every rank launched it together, so its collectives are
        all matched and it finishes) is waited for and reported, so shutdown never leaves a step
        behind and an idle instance holds none."""
        sched = self.scheduler.schedule()
        global_tokens, stop, graphable = self.dp.sync(sched.num_tokens, self.stop_requested,
                                                      self.runner.can_graph(sched))
        self.global_tokens = global_tokens
        if stop or global_tokens == 0:
            # The scheduled step is dropped unlaunched: stopping, or empty on every rank.
            self.stopped = stop
            if not stop:
                self.heartbeat()
            return self._report(None)
        graph_size = self.runner.graphs.size_for(global_tokens) if graphable else None
        if sched.is_empty:  # this group joins the others' MoE collectives with padding only
            self.runner.execute_dummy(graph_size, ep_max=global_tokens)
            return self._report(None)
        step = self.runner.launch(sched, graph_size, local_graph_choice=False, ep_max=global_tokens)
        return self._report((sched, step))

    def _report(self, launched) -> list[EngineOutput]:
        """Asynchronous scheduling: make `launched` (scheduler output, SampledStep; None when
        nothing was) the step in flight, and wait for and report the one it replaces."""
        done, self.in_flight = self.in_flight, launched
        if done is None:
            if launched is None:
                self._update_stats(0)
            return []
        return self._finish_step(done[0], done[1].result())

    def finish_in_flight(self) -> list[EngineOutput]:
        """Wait for the step launched and not yet reported (asynchronous scheduling) and report it."""
        done, self.in_flight = self.in_flight, None
        return [] if done is None else self._finish_step(done[0], done[1].result())

    def _finish_step(self, sched, sampled: dict[str, tuple[int, object]]) -> list[EngineOutput]:
        touched = self.scheduler.update(sched, sampled)
        self._update_stats(sched.num_tokens)
        outputs = []
        for r in touched:
            token, logprobs = sampled[r.request_id]
            outputs.append(EngineOutput(r.request_id, [token], None if logprobs is None else [logprobs],
                                        r.finish_reason, r.stop_reason, r.num_cached_tokens))
        return outputs

    def _update_stats(self, num_tokens: int) -> None:
        s, kv = self.stats, self.kv
        s.num_running, s.num_waiting = len(self.scheduler.running), len(self.scheduler.waiting)
        s.kv_blocks_free = kv.num_free_blocks
        s.kv_blocks_used = kv.num_usable_blocks - kv.num_free_blocks
        s.kv_usage = kv.usage
        s.prefix_cache_queries, s.prefix_cache_hits, s.prefix_cache_hit_rate = kv.query_tokens, kv.hit_tokens, kv.hit_rate
        s.num_scheduled_tokens = num_tokens
        s.num_preemptions = self.scheduler.num_preemptions
        s.num_partial_prefills = self.scheduler.num_partial_prefills
        s.num_pending_inputs = self.runner.num_pending_inputs
        if self.ep_runtime is not None:
            s.num_rebalances, s.expert_bytes_moved = self.ep_runtime.num_rebalances, self.ep_runtime.bytes_moved
        if num_tokens:
            s.num_steps += 1
            s.num_tokens_computed += num_tokens

    def heartbeat(self) -> None:
        """Call while idle: under tensor parallelism the workers hear from rank 0 every second or so."""
        if self.tp is not None:
            self.tp.heartbeat()

    def shutdown(self) -> None:
        """Leave the process groups (after the ranks agreed to stop; tensor-parallel workers are
        told to stop)."""
        if self.in_flight is not None and (self.tp is not None or self.dp is not None):
            # Let the last launched step finish before its process groups go away (its outputs are
            # dropped: nobody asks for them any more). A failed step must not stop the teardown.
            try:
                self.finish_in_flight()
            except Exception:
                log.exception("the step in flight failed during shutdown")
        if self.tp is not None:
            tp, self.tp = self.tp, None
            try:
                tp.stop()
            finally:
                teardown_rank()
        if self.dp is not None:
            teardown_rank()
            self.dp = None
