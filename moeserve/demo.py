"""`make demo`: build a tiny model, serve it, stream one request, run a short bench, print
the results, stop the server. Everything runs on CPU in a minute."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo: the server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"demo: the server was not healthy after {timeout_s:.0f} s")


def _stream_completion(url: str, model: str, prompt: str) -> None:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0.8, "seed": 1,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"content-type": "application/json"})
    print(f"\n--- streaming /v1/completions ---\nprompt: {prompt!r}\noutput: ", end="", flush=True)
    usage = None
    with urllib.request.urlopen(req, timeout=60) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                print(chunk["choices"][0]["text"], end="", flush=True)
            if chunk.get("usage"):
                usage = chunk["usage"]
    print(f"\nusage: {usage}  (a random tiny model: the text is noise, the plumbing is real)")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="deepseek_v3", choices=["deepseek_v3", "deepseek_v2", "qwen3_moe"])
    parser.add_argument("--workdir", default=None, help="where the tiny model and results go (default: a temp dir)")


def main(args: argparse.Namespace) -> int:
    from moeserve.models.tiny import make_tiny

    workdir = args.workdir or tempfile.mkdtemp(prefix="moeserve-demo-")
    model = make_tiny(args.arch, os.path.join(workdir, f"tiny-{args.arch}"))
    print(f"tiny {args.arch} checkpoint: {model}")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moeserve.cli", "serve", "--model", model, "--port", str(port),
                               "--device", "cpu", "--log-level", "warning"])
    try:
        _wait_healthy(url, server, 180)
        print(f"server up at {url}")
        _stream_completion(url, model, "The cheapest way to serve a mixture of experts is")
        print("\n--- moeserve bench ---", flush=True)
        bench = subprocess.run([sys.executable, "-m", "moeserve.cli", "bench", "--url", url, "--isl", "64",
                                "--osl", "32", "--concurrency", "1,4,16", "--num-prompts", "16", "--no-progress",
                                "--num-gpus", "1", "--gpu-cost-per-hour", "2.0",
                                "--out-dir", os.path.join(workdir, "bench")])
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            lines = [ln for ln in r.read().decode().splitlines()
                     if ln.startswith(("moeserve_request_success_total", "moeserve_generation_tokens_total",
                                       "moeserve_kv_cache_usage_perc", "moeserve_num_requests_running"))]
        print("\n--- /metrics (excerpt) ---\n" + "\n".join(lines))
        return bench.returncode
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            rc = server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            rc = "killed"
        print(f"server stopped (exit {rc})")
