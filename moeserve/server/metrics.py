"""Prometheus metrics of one API server and its engine (GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0,
                   40.0, 80.0)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        labels = ["model_name"]
        self._label = {"model_name": model_name}
        self.requests = Counter("moeserve_request_success", "Finished requests by finish reason",
                                labels + ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("moeserve_prompt_tokens", "Prompt tokens processed", labels, registry=r)
        self.generation_tokens = Counter("moeserve_generation_tokens", "Tokens generated", labels, registry=r)
        self.ttft = Histogram("moeserve_time_to_first_token_seconds", "Time to first token", labels,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("moeserve_inter_token_latency_seconds", "Time between output tokens", labels,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("moeserve_e2e_request_latency_seconds", "End-to-end request latency", labels,
                             buckets=LATENCY_BUCKETS, registry=r)
        gauge = lambda name, doc: Gauge(name, doc, labels, registry=r)  # noqa: E731
        self.running = gauge("moeserve_num_requests_running", "Requests in the engine's running queue")
        self.waiting = gauge("moeserve_num_requests_waiting", "Requests waiting to be scheduled")
        self.kv_usage = gauge("moeserve_kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1)")
        self.kv_free = gauge("moeserve_kv_cache_free_blocks", "Free KV cache blocks")
        self.kv_total = gauge("moeserve_kv_cache_total_blocks", "Usable KV cache blocks")
        self.prefix_hit_rate = gauge("moeserve_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache (0..1)")
        self.prefix_queries = gauge("moeserve_prefix_cache_queries_tokens", "Prompt tokens looked up, total")
        self.prefix_hits = gauge("moeserve_prefix_cache_hits_tokens", "Prompt tokens found, total")
        self.preemptions = gauge("moeserve_num_preemptions", "Requests preempted, total")
        self.rebalances = gauge("moeserve_eplb_rebalances", "Expert placements applied by the load balancer, total")
        self.expert_bytes_moved = gauge("moeserve_eplb_expert_bytes_moved", "Expert weight bytes moved between "
                                        "ranks by the load balancer, total over ranks")

    def update_engine(self, stats: dict) -> None:
        lab = self._label
        self.running.labels(**lab).set(stats.get("num_running", 0))
        self.waiting.labels(**lab).set(stats.get("num_waiting", 0))
        self.kv_usage.labels(**lab).set(stats.get("kv_usage", 0.0))
        self.kv_free.labels(**lab).set(stats.get("kv_blocks_free", 0))
        self.kv_total.labels(**lab).set(stats.get("kv_blocks_free", 0) + stats.get("kv_blocks_used", 0))
        self.prefix_hit_rate.labels(**lab).set(stats.get("prefix_cache_hit_rate", 0.0))
        self.prefix_queries.labels(**lab).set(stats.get("prefix_cache_queries", 0))
        self.prefix_hits.labels(**lab).set(stats.get("prefix_cache_hits", 0))
        self.preemptions.labels(**lab).set(stats.get("num_preemptions", 0))
        self.rebalances.labels(**lab).set(stats.get("num_rebalances", 0))
        self.expert_bytes_moved.labels(**lab).set(stats.get("expert_bytes_moved", 0))

    def request_done(self, finish_reasons: list[str], num_prompt: int, num_generated: int, ttft: float | None,
                     itls: list[float], e2e: float) -> None:
        lab = self._label
        for reason in finish_reasons:
            self.requests.labels(finished_reason=reason, **lab).inc()
        self.prompt_tokens.labels(**lab).inc(num_prompt)
        self.generation_tokens.labels(**lab).inc(num_generated)
        if ttft is not None:
            self.ttft.labels(**lab).observe(ttft)
        for x in itls:
            self.itl.labels(**lab).observe(x)
        self.e2e.labels(**lab).observe(e2e)

    def render(self) -> bytes:
        return generate_latest(self.registry)
