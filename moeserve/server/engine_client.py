"""The API server's handle on its engine-core process.

It spawns the process, waits for it to be ready (with a deadline), sends requests and aborts,
and runs one task that reads the engine's per-step messages, detokenizes them
(`OutputProcessor`) and hands each request's deltas to that request's queue. A slow client
only fills its own queue; the engine never waits on HTTP.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator

import zmq
import zmq.asyncio

from moeserve.config import EngineConfig
from moeserve.engine.core_proc import DECODER, ENCODER, STEP_DECODER, encode_add
from moeserve.engine.procs import RankRouter, addresses, spawn_ranks, stop_processes, with_rendezvous
from moeserve.engine.output import Delta, OutputProcessor
from moeserve.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


@dataclasses.dataclass
class EngineInfo:
    max_model_len: int
    kv_capacity_tokens: int
    num_blocks: int
    vocab_size: int
    pid: int
    num_ranks: int = 1


class AsyncEngineClient:
    """One engine-core process, or one per data-parallel rank (requests go to the least loaded)."""

    def __init__(self, config: EngineConfig, tokenizer, startup_timeout_s: float = 900.0):
        self.config = with_rendezvous(config)
        self.tokenizer = tokenizer
        self.startup_timeout_s = startup_timeout_s
        self.processor = OutputProcessor(tokenizer)
        self.queues: dict[str, asyncio.Queue] = {}
        self.stats: dict = {}
        self.info: EngineInfo | None = None
        self.error: str | None = None
        self.on_step = None  # callback(stats) after each engine message (metrics)
        self._procs: list = []
        self._ctx = zmq.asyncio.Context()
        self.addrs = addresses(self.config)
        self.router = RankRouter(self.config.parallel.dp)  # one engine core per data-parallel rank
        self._task: asyncio.Task | None = None

    # ---- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._inputs = []
        for addr in self.addrs.bind_inputs:
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(addr)
            self._inputs.append(sock)
        self._out = self._ctx.socket(zmq.PULL)
        self._out.bind(self.addrs.bind_output)
        self._procs = spawn_ranks(self.config, self.addrs, os.getpid())
        deadline = time.monotonic() + self.startup_timeout_s
        infos = []
        while len(infos) < self.config.parallel.dp:
            if await self._out.poll(200):
                kind, payload = DECODER.decode(await self._out.recv())[:2]
                if kind == "ready":
                    infos.append(payload)
                    continue
                if kind == "error":
                    await self.shutdown()
                    raise EngineDeadError(f"engine failed to start:\n{payload}")
            dead = [p for p in self._procs if not p.is_alive()]
            if dead:
                await self.shutdown()
                raise EngineDeadError(f"engine process exited with code {dead[0].exitcode} during start-up")
            if time.monotonic() > deadline:
                await self.shutdown()
                raise EngineDeadError(f"engine not ready after {self.startup_timeout_s:.0f} s")
        infos.sort(key=lambda i: i.get("rank", 0))
        self.info = EngineInfo(max_model_len=min(i["max_model_len"] for i in infos),
                               kv_capacity_tokens=min(i["kv_capacity_tokens"] for i in infos),
                               num_blocks=sum(i["num_blocks"] for i in infos), vocab_size=infos[0]["vocab_size"],
                               pid=infos[0]["pid"], num_ranks=len(infos))
        self._task = asyncio.create_task(self._output_loop())

    @property
    def healthy(self) -> bool:
        return (self.info is not None and self.error is None and bool(self._procs)
                and all(p.is_alive() for p in self._procs) and self._task is not None and not self._task.done())

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        for rid in list(self.queues):
            await self.abort(rid)
        if any(p.is_alive() for p in self._procs):
            for sock in self._inputs:  # every rank, remote nodes' included
                try:
                    await sock.send(ENCODER.encode(("shutdown", None)), zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            deadline = time.monotonic() + timeout_s
            while any(p.is_alive() for p in self._procs) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.to_thread(stop_processes, self._procs, 0)
        if self._task is not None:
            self._task.cancel()
        self._ctx.destroy(linger=0)

    # ---- requests ---------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[Delta]:
        """Yields the request's deltas until every one of its n outputs has finished. Leaving the
        iteration early (client gone, error) aborts the request in the engine."""
        if not self.healthy:
            raise EngineDeadError(self.error or "engine is not running")
        queue: asyncio.Queue = asyncio.Queue()
        self.queues[request_id] = queue
        pairs = self.processor.add(request_id, prompt, prompt_token_ids, params)
        finished = 0
        try:
            rank = None
            for cid, _ in pairs:
                rank = self.router.assign(cid)  # the n samples of a request share one rank
            await self._inputs[rank].send(encode_add([(cid, prompt_token_ids, p) for cid, p in pairs]))
            while finished < len(pairs):
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if item.finish_reason is not None:
                    finished += 1
                yield item
        finally:
            self.queues.pop(request_id, None)
            if finished < len(pairs):
                await self.abort(request_id)
            else:
                self.processor.parents.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        await self._abort_engine_ids(self.processor.abort(request_id))
        self.queues.pop(request_id, None)

    async def _abort_engine_ids(self, ids: list[str]) -> None:
        for rank, rank_ids in self.router.by_rank(ids).items():
            for rid in rank_ids:
                self.router.finished(rid)
            if self._procs and all(p.is_alive() for p in self._procs):
                await self._inputs[rank].send(ENCODER.encode(("abort", rank_ids)))

    async def _output_loop(self) -> None:
        watchdog = asyncio.create_task(self._watch_process())
        try:
            while True:
                raw = await self._out.recv()
                kind = DECODER.decode(raw)[0]
                if kind == "error":
                    raise EngineDeadError(f"engine failed:\n{DECODER.decode(raw)[1]}")
                _, outputs, stats = STEP_DECODER.decode(raw)
                self.stats = stats = self.router.merged_stats(stats, stats.get("dp_rank", 0))
                for o in outputs:
                    if o.finish_reason is not None:
                        self.router.finished(o.request_id)
                deltas, stopped = self.processor.process(outputs)
                if stopped:
                    await self._abort_engine_ids(stopped)
                for d in deltas:
                    queue = self.queues.get(d.request_id)
                    if queue is not None:
                        queue.put_nowait(d)
                if self.on_step is not None:
                    self.on_step(stats)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the engine is gone: fail every waiting request, report unhealthy
            self._fail(str(e))
        finally:
            watchdog.cancel()

    async def _watch_process(self) -> None:
        while all(p.is_alive() for p in self._procs):
            await asyncio.sleep(1.0)
        dead = next(p for p in self._procs if not p.is_alive())
        self._fail(f"engine process {dead.name} died (exit code {dead.exitcode})")
        self._task.cancel()

    def _fail(self, error: str) -> None:
        if self.error is None:
            self.error = error
            log.error("%s", error)
        for queue in self.queues.values():
            queue.put_nowait(EngineDeadError(self.error))
