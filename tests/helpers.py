"""Test helpers: a real `moeserve serve` subprocess on a free port, over a tiny checkpoint (used by
the `server` fixture in conftest.py and by tests that need a server of their own); running a
kernel test module under the Triton interpreter, or as a plain script (tests/hopper_stub.py)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx

from moeserve import SamplingParams
from moeserve.distributed.groups import free_port  # noqa: F401 (the tests import it from here)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def interpreter_results(test_file: str, timeout_s: float = 120) -> dict:
    """Run a kernel test module as a script with TRITON_INTERPRET=1 (the interpreter must be chosen
    before triton is imported, hence a fresh process) and return the JSON its last line prints."""
    return script_results(test_file, timeout_s, TRITON_INTERPRET="1")


def script_results(test_file: str, timeout_s: float = 120, **env_vars: str) -> dict:
    """Run a test module as a script in a fresh process, with env_vars set and TRITON_INTERPRET
    unset unless env_vars sets it, and return the JSON its last line prints."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_vars, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(test_file)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_interpreter_cases(cases) -> None:
    """The script side of interpreter_results: run cases() under a fresh random seed on one thread
    and print its results, with the seed to reproduce a failure, as the last line."""
    import torch

    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    out = cases()
    out["seed"] = seed
    print(json.dumps(out))


def run_model_steps(model, steps: list[dict[int, list[int]]], tables: dict[int, list[int]], block: int) -> list:
    """Drive a model by hand (no engine) through `steps`: each a {sequence id: new token ids} chunk
    over the paged cache (fp32, 12 blocks of `block` slots; tables: each sequence's block table).
    Returns each step's logits."""
    import torch

    from moeserve.layers.attention import AttentionMetadata

    for layer in model.attention_layers():
        layer.kv_cache = torch.zeros(layer.kv_cache_shape(12, block), dtype=torch.float32)
    lens: dict[int, int] = {}
    out = []
    for chunks in steps:
        ids, positions, q_lens, s_lens, block_tables = [], [], [], [], []
        for sid, tokens in chunks.items():
            start = lens.get(sid, 0)
            lens[sid] = start + len(tokens)
            ids += tokens
            positions += range(start, lens[sid])
            q_lens.append(len(tokens))
            s_lens.append(lens[sid])
            block_tables.append(tables[sid])
        meta = AttentionMetadata.build(q_lens, s_lens, block_tables, block, "cpu")
        with torch.inference_mode():
            out.append(model.compute_logits(model(torch.tensor(ids), torch.tensor(positions), meta)))
    return out


# Parallel engines (dp/ep, tp) are checked against one process on these prompts and parameters.
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
ENGINE = dict(dtype="float32", device="cpu", block_size=4, num_blocks=256)


def prompts_for(n: int) -> list[list[int]]:
    """Mixed lengths, so the two ranks are at different points (prefill on one, decode on the other)."""
    return [[5 + i, 7, 9, 11 + i, 3] * (1 + i % 3) for i in range(n)]


def greedy(llm, prompts):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]


SERVE_ARGS = ["--device", "cpu", "--dtype", "float32", "--block-size", "4", "--num-blocks", "512",
              "--max-model-len", "512"]


class ServerProcess:
    def __init__(self, model: str, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(os.path.join(os.path.dirname(model), f"serve-{self.port}.log"), "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moeserve.cli", "serve", "--model", model, "--port", str(self.port),
             *SERVE_ARGS, *extra], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"server not healthy after 120 s:\n{self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def engine_pids(self) -> list[int]:
        path = f"/proc/{self.proc.pid}/task/{self.proc.pid}/children"
        with open(path) as f:
            return [int(p) for p in f.read().split()]

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log.close()


def metric(text: str, name: str) -> float:
    """The value of metric `name` (a regex; any labels) in a /metrics page."""
    m = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))
