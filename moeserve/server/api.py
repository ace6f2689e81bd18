"""`moeserve serve`: the OpenAI-compatible HTTP server in front of one engine-core process.

Tokenizing, detokenizing and stop strings happen here; the engine process only sees token
ids. Routes: /v1/completions, /v1/chat/completions (SSE streaming ending in `data: [DONE]`),
/v1/models, /health, /metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from moeserve.config import EngineConfig, ModelConfig
from moeserve.engine.llm import add_engine_args, engine_kwargs
from moeserve.engine.dp import validate_parallel
from moeserve.engine.procs import run_headless
from moeserve.engine.output import Delta
from moeserve.engine.sampling_params import SamplingParams
from moeserve.models.tokenizer import load_tokenizer
from moeserve.server.engine_client import AsyncEngineClient, EngineDeadError
from moeserve.server.metrics import Metrics
from moeserve.server.protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("moeserve.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def response(self) -> JSONResponse:
        kind = {400: "BadRequestError", 404: "NotFoundError", 503: "ServiceUnavailableError"}.get(
            self.status, "InternalServerError")
        return JSONResponse({"error": {"message": self.message, "type": kind, "param": self.param,
                                       "code": self.status}}, status_code=self.status)


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


class Generation:
    """One prompt's run: collects deltas per output index and records latency metrics."""

    def __init__(self, server: "OpenAIServer", prompt: str | None, ids: list[int], params: SamplingParams):
        self.server, self.prompt, self.ids, self.params = server, prompt, ids, params
        self.request_id = uuid.uuid4().hex
        self.texts = [""] * params.n
        self.tokens: list[list[int]] = [[] for _ in range(params.n)]
        self.logprobs: list[list[dict[int, float]]] = [[] for _ in range(params.n)]
        self.finish: list[str | None] = [None] * params.n
        self.stop_reason: list = [None] * params.n

    async def deltas(self) -> AsyncIterator[Delta]:
        start = time.monotonic()
        first, last, itls, done = None, None, [], False
        try:
            async for d in self.server.client.generate(self.request_id, self.prompt, self.ids, self.params):
                now = time.monotonic()
                if d.token_ids:
                    if first is None:
                        first = now
                    elif last is not None:
                        itls.append(now - last)
                    last = now
                i = d.index
                self.texts[i] += d.text
                self.tokens[i] += d.token_ids
                self.logprobs[i] += d.logprobs or []
                if d.finish_reason is not None:
                    self.finish[i], self.stop_reason[i] = d.finish_reason, d.stop_reason
                yield d
            done = True
        finally:
            reasons = [f or "abort" for f in self.finish] if done else ["abort"] * self.params.n
            self.server.metrics.request_done(reasons, len(self.ids), sum(map(len, self.tokens)),
                                             None if first is None else first - start, itls, time.monotonic() - start)

    async def run(self) -> "Generation":
        async for _ in self.deltas():
            pass
        return self


async def merge(iterators: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Items of several async iterators as they come, tagged with the iterator's position."""
    if len(iterators) == 1:
        async for item in iterators[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    END = object()

    async def drain(k, it):
        try:
            async for item in it:
                await queue.put((k, item))
            await queue.put((k, END))
        except Exception as e:
            await queue.put((k, e))

    tasks = [asyncio.create_task(drain(k, it)) for k, it in enumerate(iterators)]
    try:
        left = len(tasks)
        while left:
            k, item = await queue.get()
            if item is END:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield k, item
    finally:
        for t in tasks:
            t.cancel()


class OpenAIServer:
    def __init__(self, client: AsyncEngineClient, tokenizer, model_name: str, metrics: Metrics):
        self.client, self.tokenizer, self.model_name, self.metrics = client, tokenizer, model_name, metrics

    # ---- validation -------------------------------------------------------------------------
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist. This server serves `{self.model_name}`.",
                           "model")

    def check_length(self, ids: list[int], params: SamplingParams) -> None:
        info = self.client.info
        limit = min(info.max_model_len, info.kv_capacity_tokens)
        if not ids:
            raise APIError(400, "The prompt is empty.", "prompt")
        if any(not 0 <= t < info.vocab_size for t in ids):
            raise APIError(400, f"Prompt token ids must be in [0, {info.vocab_size}).", "prompt")
        if len(ids) >= limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, your prompt "
                                f"has {len(ids)} tokens, which leaves no room for output.", "prompt")
        if params.max_tokens is not None and len(ids) + params.max_tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{len(ids) + params.max_tokens} tokens ({len(ids)} in the prompt, "
                                f"{params.max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                           "max_tokens")

    def context_left(self, ids: list[int]) -> int:
        info = self.client.info
        return max(1, min(info.max_model_len, info.kv_capacity_tokens) - len(ids))

    def sampling_params(self, req, ids: list[int]) -> SamplingParams:
        try:
            params = req.sampling_params(self.context_left(ids))
        except ValueError as e:
            raise APIError(400, str(e)) from None
        self.check_length(ids, params)
        return params

    # ---- formatting -------------------------------------------------------------------------
    def token_str(self, t: int) -> str:
        return self.tokenizer.decode([t])

    def completion_logprobs(self, entries: list[dict[int, float]], tokens: list[int], n_top: int) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = 0
        for t, lps in zip(tokens, entries):
            s = self.token_str(t)
            out["tokens"].append(s)
            out["token_logprobs"].append(lps[t])
            top = sorted(lps.items(), key=lambda kv: -kv[1])[:n_top]
            out["top_logprobs"].append({self.token_str(k): v for k, v in top})
            out["text_offset"].append(offset)
            offset += len(s)
        return out

    def chat_logprobs(self, entries: list[dict[int, float]], tokens: list[int], n_top: int) -> dict:
        def item(t, lp):
            s = self.token_str(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}
        content = []
        for t, lps in zip(tokens, entries):
            top = sorted(lps.items(), key=lambda kv: -kv[1])[:n_top]
            content.append({**item(t, lps[t]), "top_logprobs": [item(k, v) for k, v in top]})
        return {"content": content}

    @staticmethod
    def usage(gens: list[Generation]) -> dict:
        prompt = sum(len(g.ids) for g in gens)
        completion = sum(len(t) for g in gens for t in g.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # ---- /v1/completions --------------------------------------------------------------------
    def completion_prompts(self, req: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        p = req.prompt
        if isinstance(p, str):
            p = [p]
        if not p:
            raise APIError(400, "prompt must not be empty", "prompt")
        if isinstance(p[0], int):
            return [(None, list(p))]
        return [(x, self.tokenizer.encode(x)) if isinstance(x, str) else (None, list(x)) for x in p]

    async def completions(self, req: CompletionRequest, raw: Request):
        self.check_model(req.model)
        gens = []
        for prompt, ids in self.completion_prompts(req):
            gens.append(Generation(self, prompt, ids, self.sampling_params(req, ids)))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        n = req.n
        base = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}
        n_top = req.logprobs or 0

        if req.stream:
            async def stream():
                async for k, d in merge([g.deltas() for g in gens]):
                    lp = None
                    if req.logprobs is not None:
                        lp = self.completion_logprobs(d.logprobs or [], d.token_ids, n_top)
                    if d.text or d.finish_reason is not None or lp:
                        yield sse({**base, "choices": [{"index": k * n + d.index, "text": d.text, "logprobs": lp,
                                                        "finish_reason": d.finish_reason,
                                                        "stop_reason": d.stop_reason}]})
                if req.include_usage:
                    yield sse({**base, "choices": [], "usage": self.usage(gens)})
                yield sse("[DONE]")
            return StreamingResponse(stream(), media_type="text/event-stream")

        await self.collect(gens, raw)
        choices = []
        for k, g in enumerate(gens):
            for i in range(n):
                lp = None
                if req.logprobs is not None:
                    lp = self.completion_logprobs(g.logprobs[i], g.tokens[i], n_top)
                text = (g.prompt or "") + g.texts[i] if req.echo else g.texts[i]
                choices.append({"index": k * n + i, "text": text, "logprobs": lp, "finish_reason": g.finish[i],
                                "stop_reason": g.stop_reason[i]})
        return {**base, "choices": choices, "usage": self.usage(gens)}

    async def collect(self, gens: list[Generation], raw: Request) -> None:
        """Run to completion, aborting if the client goes away meanwhile."""
        work = asyncio.ensure_future(asyncio.gather(*(g.run() for g in gens)))
        while True:
            done, _ = await asyncio.wait({work}, timeout=0.5)
            if done:
                work.result()
                return
            if await raw.is_disconnected():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
                raise APIError(499, "client disconnected")

    # ---- /v1/chat/completions ---------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, raw: Request):
        self.check_model(req.model)
        try:
            text = self.tokenizer.apply_chat_template(req.conversation(), tokenize=False,
                                                      add_generation_prompt=req.add_generation_prompt)
        except ValueError as e:
            raise APIError(400, str(e), "messages") from None
        except Exception as e:
            raise APIError(400, f"the chat template failed on these messages: {e}", "messages") from None
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        gen = Generation(self, text, ids, self.sampling_params(req, ids))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "created": created, "model": self.model_name}
        n_top = req.top_logprobs or 0

        if req.stream:
            async def stream():
                chunk = {**base, "object": "chat.completion.chunk"}
                for i in range(req.n):
                    yield sse({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]})
                async for d in gen.deltas():
                    lp = self.chat_logprobs(d.logprobs or [], d.token_ids, n_top) if req.logprobs else None
                    if d.text or d.finish_reason is not None or lp:
                        delta = {"content": d.text} if d.text else {}
                        yield sse({**chunk, "choices": [{"index": d.index, "delta": delta, "logprobs": lp,
                                                         "finish_reason": d.finish_reason,
                                                         "stop_reason": d.stop_reason}]})
                if req.include_usage:
                    yield sse({**chunk, "choices": [], "usage": self.usage([gen])})
                yield sse("[DONE]")
            return StreamingResponse(stream(), media_type="text/event-stream")

        await self.collect([gen], raw)
        choices = [{"index": i, "message": {"role": "assistant", "content": gen.texts[i]},
                    "logprobs": self.chat_logprobs(gen.logprobs[i], gen.tokens[i], n_top) if req.logprobs else None,
                    "finish_reason": gen.finish[i], "stop_reason": gen.stop_reason[i]} for i in range(req.n)]
        return {**base, "object": "chat.completion", "choices": choices, "usage": self.usage([gen])}


def build_app(client: AsyncEngineClient, tokenizer, model_name: str, shutdown_timeout_s: float = 10.0) -> FastAPI:
    metrics = Metrics(model_name)
    server = OpenAIServer(client, tokenizer, model_name, metrics)
    client.on_step = metrics.update_engine

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await client.start()
        metrics.update_engine({"kv_blocks_free": client.info.num_blocks})
        log.info("engine ready: %s", client.info)
        yield
        await client.shutdown(shutdown_timeout_s)

    app = FastAPI(title="moeserve", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, e: RequestValidationError):
        errors = e.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            return APIError(400, "The request body is not valid JSON.").response()
        parts = [f"{'.'.join(str(x) for x in err.get('loc', ())[1:]) or 'body'}: {err.get('msg')}" for err in errors]
        return APIError(400, "Invalid request: " + "; ".join(parts)).response()

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, e: EngineDeadError):
        return APIError(503, f"The engine is not available: {e}").response()

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        return await server.completions(req, raw)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, raw: Request):
        return await server.chat(req, raw)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "moeserve", "max_model_len": client.info.max_model_len}]}

    @app.get("/health")
    async def health():
        return Response(status_code=200 if client.healthy else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown; we exit 0 instead."""

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()


def add_args(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="name in /v1/models (default: --model)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds in-flight requests get to finish after SIGTERM before they are aborted")
    parser.add_argument("--engine-startup-timeout", type=float, default=900.0)
    parser.add_argument("--log-level", default="info")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = EngineConfig.from_kwargs(args.model, **engine_kwargs(args))
        # Fail here, with a clear message, on a bad folder or a parallel layout the model cannot take.
        validate_parallel(config, ModelConfig.from_pretrained(args.model))
    except ValueError as e:
        log.error("%s", e)
        return 2
    if config.parallel.node_rank > 0:  # this node only runs engine ranks; node 0 serves HTTP
        return run_headless(config)
    tokenizer = load_tokenizer(args.model)
    client = AsyncEngineClient(config, tokenizer, args.engine_startup_timeout)
    app = build_app(client, tokenizer, args.served_model_name or args.model, args.shutdown_timeout)
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, loop="uvloop",
                                    log_level=args.log_level, timeout_graceful_shutdown=args.shutdown_timeout))
    server.run()
    return 0 if client.info is not None else 1
