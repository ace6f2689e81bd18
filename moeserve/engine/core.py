"""The engine core: one step = schedule -> run the model -> update requests -> report.

It knows token ids only (no text): tokenizing, detokenizing and stop strings happen in the
caller's process (`OutputProcessor`). The offline `LLM` drives it in-process; the API server
runs it in its own process (`moeserve.engine.core_proc`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeserve.config import EngineConfig, ModelConfig
from moeserve.engine.kv_cache import KVCacheManager
from moeserve.engine.output import EngineOutput
from moeserve.engine.request import Request
from moeserve.engine.runner import ModelRunner
from moeserve.engine.sampling_params import SamplingParams
from moeserve.engine.scheduler import Scheduler



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


class EngineCore:
    def __init__(self, config: EngineConfig, model_config: ModelConfig | None = None):
        self.config = config
        self.model_config = model_config or ModelConfig.from_pretrained(config.model)
        torch.manual_seed(config.seed)
        self.runner = ModelRunner(config, self.model_config)
        self.kv = KVCacheManager(self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        model_len = config.scheduler.max_model_len or self.model_config.max_position_embeddings
        self.max_model_len = model_len
        self.scheduler = Scheduler(config.scheduler, self.kv, model_len)
        self.stats = EngineStats()
        self.eos_token_ids = tuple(self.model_config.eos_token_id)
        self._update_stats(0)

    # ---- requests ---------------------------------------------------------------------------
    def check_prompt(self, num_prompt_tokens: int) -> None:
        """ValueError if a prompt cannot be served (the server answers 400)."""
        if num_prompt_tokens == 0:
            raise ValueError("the prompt is empty")
        if num_prompt_tokens >= self.max_model_len:
            raise ValueError(f"the prompt has {num_prompt_tokens} tokens, but the context window is "
                             f"{self.max_model_len} tokens, which must also hold at least one output token")
        capacity = self.kv.num_usable_blocks * self.kv.block_size
        if num_prompt_tokens >= capacity:
            raise ValueError(f"the prompt has {num_prompt_tokens} tokens, more than the KV cache holds ({capacity})")

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
        sched = self.scheduler.schedule()
        if sched.is_empty:
            self._update_stats(0)
            return []
        sampled = self.runner.execute(sched)
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
        if num_tokens:
            s.num_steps += 1
            s.num_tokens_computed += num_tokens
