"""The engine interface LLM uses (add_request, abort_requests, step, ...) over one engine-core
process per data-parallel group (and its tensor-parallel workers): what `LLM(model, dp=N, ep=N)`,
`LLM(model, tp=N)` and `LLM(model, dp=D, tp=T, ep=D*T)` run on."""

from __future__ import annotations

import os
import time

import zmq

from moeserve.config import EngineConfig, ModelConfig
from moeserve.engine.core import EngineStats, check_prompt_length
from moeserve.engine.core_proc import DECODER, ENCODER, STEP_DECODER, encode_add
from moeserve.engine.dp import validate_parallel
from moeserve.engine.output import EngineOutput
from moeserve.engine.procs import RankRouter, addresses, spawn_ranks, stop_processes, with_rendezvous
from moeserve.engine.sampling_params import SamplingParams


class MultiprocEngine:
    def __init__(self, config: EngineConfig, startup_timeout_s: float = 900.0, step_timeout_s: float = 600.0):
        validate_parallel(config, ModelConfig.from_pretrained(config.model))
        self.config = with_rendezvous(config)
        self.step_timeout_s = step_timeout_s
        engines = self.config.parallel.dp  # engine cores; the other TP ranks are their workers
        addrs = addresses(self.config)
        self._ctx = zmq.Context()
        self._inputs = []
        for addr in addrs.bind_inputs:
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(addr)
            self._inputs.append(sock)
        self._out = self._ctx.socket(zmq.PULL)
        self._out.bind(addrs.bind_output)
        self.router = RankRouter(engines)
        self.stats = EngineStats()
        self.procs = spawn_ranks(self.config, addrs, os.getpid())
        try:
            infos = [self._recv("ready", startup_timeout_s)[1] for _ in range(engines)]
        except BaseException:
            self.shutdown(timeout_s=0)
            raise
        self.max_model_len = min(i["max_model_len"] for i in infos)
        self.kv_capacity_tokens = min(i["kv_capacity_tokens"] for i in infos)
        self.vocab_size = infos[0]["vocab_size"]

    def _recv(self, expect: str, timeout_s: float):
        """The next message (of kind `expect`), within the deadline; raises if a rank died or failed."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._out.poll(100):
                raw = self._out.recv()
                kind = DECODER.decode(raw)[0]
                if kind == "error":
                    raise RuntimeError(f"engine rank failed:\n{DECODER.decode(raw)[1]}")
                if kind == expect:
                    return STEP_DECODER.decode(raw) if kind == "step" else DECODER.decode(raw)
                continue
            dead = [p for p in self.procs if not p.is_alive()]
            if dead:
                raise RuntimeError(f"engine process {dead[0].name} exited with code {dead[0].exitcode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {expect!r} message from the engine ranks within {timeout_s:.0f} s")

    # ---- EngineCore's interface -------------------------------------------------------------
    def check_prompt(self, num_prompt_tokens: int) -> None:
        check_prompt_length(num_prompt_tokens, self.max_model_len, self.kv_capacity_tokens)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.check_prompt(len(prompt_token_ids))
        if any(not 0 <= t < self.vocab_size for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size})")
        rank = self.router.assign(request_id)
        try:  # never block: a PUSH socket whose engine process died waits forever
            self._inputs[rank].send(encode_add([(request_id, list(prompt_token_ids), params)]), zmq.NOBLOCK)
        except zmq.Again:
            self.router.finished(request_id)
            raise RuntimeError(f"engine rank {rank} does not take requests (its process is gone)") from None

    def abort_requests(self, request_ids: list[str]) -> None:
        for rank, ids in self.router.by_rank(request_ids).items():
            try:
                self._inputs[rank].send(ENCODER.encode(("abort", ids)), zmq.NOBLOCK)
            except zmq.Again:  # the rank is gone: nothing left to abort there
                pass
            for rid in ids:
                self.router.finished(rid)

    def has_unfinished(self) -> bool:
        return bool(self.router.owner)

    def step(self) -> list[EngineOutput]:
        """The outputs of one rank's step (waits for the next one)."""
        _, outputs, stats = self._recv("step", self.step_timeout_s)
        for o in outputs:
            if o.finish_reason is not None:
                self.router.finished(o.request_id)
        merged = self.router.merged_stats(stats, stats.get("dp_rank", 0))
        self.stats = EngineStats(**{k: v for k, v in merged.items() if k in EngineStats.__dataclass_fields__})
        return outputs

    def shutdown(self, timeout_s: float = 30.0) -> None:
        for sock in self._inputs:
            try:
                sock.send(ENCODER.encode(("shutdown", None)), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        stop_processes(self.procs, timeout_s)
        self._ctx.destroy(linger=0)

    def __del__(self):
        if getattr(self, "procs", None) and any(p.is_alive() for p in self.procs):
            self.shutdown(timeout_s=5)

