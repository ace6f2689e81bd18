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
import multiprocessing
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator

import zmq
import zmq.asyncio

from moeserve.config import EngineConfig
from moeserve.engine.core_proc import DECODER, ENCODER, STEP_DECODER, encode_add, run_engine_core
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


class AsyncEngineClient:
    def __init__(self, config: EngineConfig, tokenizer, startup_timeout_s: float = 900.0):
        self.config = config
        self.tokenizer = tokenizer
        self.startup_timeout_s = startup_timeout_s
        self.processor = OutputProcessor(tokenizer)
        self.queues: dict[str, asyncio.Queue] = {}
        self.stats: dict = {}
        self.info: EngineInfo | None = None
        self.error: str | None = None
        self.on_step = None  # callback(stats) after each engine message (metrics)
        self._proc = None
        self._ctx = zmq.asyncio.Context()
        self._dir = tempfile.mkdtemp(prefix="moeserve-")
        tag = uuid.uuid4().hex[:8]
        self.input_addr = f"ipc://{self._dir}/in-{tag}"
        self.output_addr = f"ipc://{self._dir}/out-{tag}"
        self._task: asyncio.Task | None = None

    # ---- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self._in = self._ctx.socket(zmq.PUSH)
        self._in.setsockopt(zmq.LINGER, 0)
        self._in.bind(self.input_addr)
        self._out = self._ctx.socket(zmq.PULL)
        self._out.bind(self.output_addr)
        mp = multiprocessing.get_context("spawn")
        self._proc = mp.Process(target=run_engine_core, name="moeserve-engine", daemon=True,
                                args=(self.config, self.input_addr, self.output_addr, os.getpid()))
        self._proc.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if await self._out.poll(200):
                kind, payload = DECODER.decode(await self._out.recv())[:2]
                if kind == "ready":
                    self.info = EngineInfo(**payload)
                    break
                if kind == "error":
                    await self.shutdown()
                    raise EngineDeadError(f"engine failed to start:\n{payload}")
            if not self._proc.is_alive():
                raise EngineDeadError(f"engine process exited with code {self._proc.exitcode} during start-up")
            if time.monotonic() > deadline:
                await self.shutdown()
                raise EngineDeadError(f"engine not ready after {self.startup_timeout_s:.0f} s")
        self._task = asyncio.create_task(self._output_loop())

    @property
    def healthy(self) -> bool:
        return (self.info is not None and self.error is None and self._proc is not None and self._proc.is_alive()
                and self._task is not None and not self._task.done())

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        for rid in list(self.queues):
            await self.abort(rid)
        if self._proc is not None and self._proc.is_alive():
            try:
                await self._in.send(ENCODER.encode(("shutdown", None)))
            except zmq.ZMQError:
                pass
            deadline = time.monotonic() + timeout_s
            while self._proc.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self._proc.is_alive():
                self._proc.terminate()
                self._proc.join(5)
            if self._proc.is_alive():
                self._proc.kill()
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
            await self._in.send(encode_add([(cid, prompt_token_ids, p) for cid, p in pairs]))
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
        ids = self.processor.abort(request_id)
        self.queues.pop(request_id, None)
        if ids and self._proc is not None and self._proc.is_alive():
            await self._in.send(ENCODER.encode(("abort", ids)))

    async def _output_loop(self) -> None:
        watchdog = asyncio.create_task(self._watch_process())
        try:
            while True:
                raw = await self._out.recv()
                kind = DECODER.decode(raw)[0]
                if kind == "error":
                    raise EngineDeadError(f"engine failed:\n{DECODER.decode(raw)[1]}")
                _, outputs, stats = STEP_DECODER.decode(raw)
                self.stats = stats
                deltas, stopped = self.processor.process(outputs)
                if stopped:
                    await self._in.send(ENCODER.encode(("abort", stopped)))
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
        while self._proc.is_alive():
            await asyncio.sleep(1.0)
        self._fail(f"engine process died (exit code {self._proc.exitcode})")
        self._task.cancel()

    def _fail(self, error: str) -> None:
        if self.error is None:
            self.error = error
            log.error("%s", error)
        for queue in self.queues.values():
            queue.put_nowait(EngineDeadError(self.error))
