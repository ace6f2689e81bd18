"""`moeserve bench`: an asyncio load generator against an OpenAI-compatible server.

Each request is a random prompt of exactly ISL tokens (sent as token ids, drawn from the
server's tokenizer's ordinary tokens) and asks for exactly OSL tokens (ignore_eos, min_tokens),
streamed. For each concurrency level it runs the requests with at most that many in flight
(optionally arriving as a Poisson process at --request-rate), then prints a table and writes
one JSON per level. A pure HTTP client: it imports no engine or model code.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field

import aiohttp

from moeserve.bench.report import percentiles, table


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)


async def server_model(session: aiohttp.ClientSession, url: str) -> dict:
    async with session.get(url + "/v1/models") as r:
        r.raise_for_status()
        return (await r.json())["data"][0]


def ordinary_token_ids(tokenizer_path: str | None, vocab_size: int | None) -> list[int]:
    """Token ids a random prompt may use: the tokenizer's vocabulary without special tokens."""
    if tokenizer_path is None:
        if vocab_size is None:
            raise SystemExit("bench: give --tokenizer (a folder) or --vocab-size to build prompts")
        return list(range(vocab_size))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
    special = set(tok.all_special_ids)
    return [i for i in range(len(tok)) if i not in special]


def random_prompts(n: int, isl: int, ids: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.choice(ids) for _ in range(isl)] for _ in range(n)]


async def one_request(session: aiohttp.ClientSession, url: str, model: str, prompt: list[int], osl: int,
                      timeout_s: float) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": osl, "min_tokens": osl, "ignore_eos": True,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    res = RequestResult(prompt_tokens=len(prompt))
    start = time.perf_counter()
    last = None
    try:
        async with session.post(url + "/v1/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            if r.status != 200:
                res.error = f"HTTP {r.status}: {(await r.text())[:200]}"
                return res
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - start
                    else:
                        res.itls.append(now - last)
                    last = now
        res.e2e = time.perf_counter() - start
        res.ok = res.output_tokens == osl
        if not res.ok:
            res.error = f"got {res.output_tokens} output tokens, expected {osl}"
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_level(url: str, model: str, prompts: list[list[int]], osl: int, concurrency: int,
                    request_rate: float, timeout_s: float, seed: int, progress: bool) -> tuple[list[RequestResult], float]:
    sem = asyncio.Semaphore(concurrency)
    rng = random.Random(seed)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(prompts), desc=f"concurrency {concurrency}", file=sys.stderr)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        async def limited(p):
            async with sem:
                r = await one_request(session, url, model, p, osl, timeout_s)
            if bar:
                bar.update(1)
            return r

        start = time.perf_counter()
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(limited(p)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    if bar:
        bar.close()
    return results, duration


def summarize(results: list[RequestResult], duration: float, meta: dict) -> dict:
    done = [r for r in results if r.ok]
    inp = sum(r.prompt_tokens for r in done)
    out = sum(r.output_tokens for r in done)
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    per_user = [(r.output_tokens - 1) / (r.e2e - r.ttft) for r in done if r.output_tokens > 1 and r.e2e > r.ttft]
    ms = lambda xs: percentiles([x * 1000 for x in xs])  # noqa: E731
    s = {
        **meta,
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(done) / duration,
        "input_throughput": inp / duration,
        "output_throughput": out / duration,
        "total_token_throughput": (inp + out) / duration,
        "total_input_tokens": inp,
        "total_output_tokens": out,
        "ttft_ms": ms([r.ttft for r in done]),
        "tpot_ms": ms(tpots),
        "itl_ms": ms([x for r in done for x in r.itls]),
        "e2e_ms": ms([r.e2e for r in done]),
        "output_tps_per_user": percentiles(per_user),
    }
    gpus, price = meta.get("num_gpus"), meta.get("gpu_cost_per_hour")
    s["output_throughput_per_gpu"] = s["output_throughput"] / gpus if gpus else None
    s["cost_per_million_output_tokens"] = (
        price * gpus / 3600 / s["output_throughput"] * 1e6 if price is not None and gpus and out else None)
    return s


async def run(args: argparse.Namespace) -> list[dict]:
    url = args.url.rstrip("/")
    async with aiohttp.ClientSession() as session:
        info = await server_model(session, url)
    model = args.model or info["id"]
    tokenizer = args.tokenizer or (info["id"] if os.path.isdir(info["id"]) else None)
    ids = ordinary_token_ids(tokenizer, args.vocab_size)
    levels = [int(c) for c in str(args.concurrency).split(",")]
    # One request first, not counted: checks the set-up and warms the server up.
    async with aiohttp.ClientSession() as session:
        probe = await one_request(session, url, model, random_prompts(1, args.isl, ids, args.seed)[0], args.osl,
                                  args.timeout)
    if not probe.ok:
        raise SystemExit(f"bench: the initial test request failed: {probe.error}")
    os.makedirs(args.out_dir, exist_ok=True)
    summaries = []
    for c in levels:
        n = args.num_prompts or max(4 * c, 8)
        prompts = random_prompts(n, args.isl, ids, args.seed + c)
        results, duration = await run_level(url, model, prompts, args.osl, c, args.request_rate, args.timeout,
                                            args.seed, not args.no_progress)
        meta = {"url": url, "model": model, "isl": args.isl, "osl": args.osl, "concurrency": c, "num_prompts": n,
                "request_rate": None if args.request_rate == float("inf") else args.request_rate,
                "dataset": args.dataset, "num_gpus": args.num_gpus, "gpu_cost_per_hour": args.gpu_cost_per_hour,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        s = summarize(results, duration, meta)
        path = os.path.join(args.out_dir, f"bench-isl{args.isl}-osl{args.osl}-c{c}.json")
        with open(path, "w") as f:
            json.dump(s, f, indent=2)
        s["json_path"] = path
        summaries.append(s)
    return summaries


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model name to send (default: the server's)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the served model's folder)")
    parser.add_argument("--vocab-size", type=int, default=None, help="draw prompt ids from [0, N) if no tokenizer")
    parser.add_argument("--dataset", default="random", choices=["random"])
    parser.add_argument("--isl", type=int, default=1024, help="input tokens per request")
    parser.add_argument("--osl", type=int, default=1024, help="output tokens per request")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    parser.add_argument("--num-prompts", type=int, default=None, help="requests per level (default 4 x concurrency)")
    parser.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per request")
    parser.add_argument("--num-gpus", type=int, default=None, help="GPUs behind the URL, for per-GPU numbers")
    parser.add_argument("--gpu-cost-per-hour", type=float, default=None, help="USD per GPU-hour, for cost per 1M")
    parser.add_argument("--out-dir", default="bench-results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    if args.isl < 1 or args.osl < 1:
        print("bench: --isl and --osl must be >= 1", file=sys.stderr)
        return 2
    try:
        summaries = asyncio.run(run(args))
    except aiohttp.ClientError as e:
        print(f"bench: cannot reach {args.url}: {e}", file=sys.stderr)
        return 2
    print(f"\nISL {args.isl}  OSL {args.osl}  url {args.url}")
    print(table(summaries))
    for s in summaries:
        if s["errors"]:
            print(f"concurrency {s['concurrency']} errors: {s['errors']}")
    print("JSON: " + ", ".join(s["json_path"] for s in summaries))
    return 0 if all(s["failed"] == 0 for s in summaries) else 1
