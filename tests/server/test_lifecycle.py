"""Disconnects free everything; SIGTERM drains in-flight requests and exits 0; the engine
process never outlives the server."""

import asyncio
import os
import signal
import time

import httpx

from tests.helpers import ServerProcess, metric


def test_disconnected_streams_are_aborted_and_freed(server, model_name):
    async def one(client: httpx.AsyncClient):
        body = {"model": model_name, "prompt": "disconnect me " * 3, "max_tokens": 400, "stream": True,
                "ignore_eos": True}
        async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            got = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    got += 1
                    if got == 3:
                        return  # leaves the stream mid-way: the connection is closed

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            await asyncio.gather(*(one(client) for _ in range(20)))

    aborted_before = 0.0
    text = httpx.get(server.url + "/metrics").text
    if 'finished_reason="abort"' in text:
        aborted_before = metric(text, r'moeserve_request_success_total\{finished_reason="abort"[^}]*\}')
    asyncio.run(main())
    deadline = time.monotonic() + 30
    while True:
        text = httpx.get(server.url + "/metrics").text
        running = metric(text, "moeserve_num_requests_running")
        free, total = metric(text, "moeserve_kv_cache_free_blocks"), metric(text, "moeserve_kv_cache_total_blocks")
        if running == 0 and free == total or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert running == 0 and metric(text, "moeserve_num_requests_waiting") == 0
    assert free == total
    aborted = metric(text, r'moeserve_request_success_total\{finished_reason="abort"[^}]*\}') - aborted_before
    assert aborted == 20  # each one ended early, none ran to its 400 tokens


def test_sigterm_lets_inflight_finish_then_exits_0(deepseek_v3_dir):
    srv = ServerProcess(deepseek_v3_dir, "--shutdown-timeout", "30")
    engine = srv.engine_pids()
    assert engine

    async def main():
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"prompt": "drain me", "max_tokens": 300, "ignore_eos": True}
            task = asyncio.create_task(client.post(srv.url + "/v1/completions", json=body))
            await asyncio.sleep(0.3)
            srv.proc.send_signal(signal.SIGTERM)
            return await task

    r = asyncio.run(main())
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 300
    assert srv.stop() == 0
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{p}") for p in engine) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{p}") for p in engine)


def test_engine_dies_with_a_killed_server(deepseek_v3_dir):
    srv = ServerProcess(deepseek_v3_dir)
    engine = srv.engine_pids()
    srv.stop(sig=signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{p}") and "Z" not in open(f"/proc/{p}/stat").read().split()[2]
              for p in engine) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(os.path.exists(f"/proc/{p}") and open(f"/proc/{p}/stat").read().split()[2] != "Z" for p in engine)
