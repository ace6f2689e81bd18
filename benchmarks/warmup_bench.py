"""Time to first token of prompts whose sizes the engine has not run yet, with and without the start-up
forwards at prefill sizes (EngineConfig.warmup_prefill), each in a fresh process on an empty Triton cache
(a new machine or container): what the first users of a fresh server wait for.

For each mode: the engine's start-up time, then one prompt at a time of each size (max_tokens 1), then
the same sizes again (their kernels compiled by then). Prints a Markdown table and writes --out.json.

    python benchmarks/warmup_bench.py --model v2-lite --out $OUT/warmup
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SIZES = [300, 1000, 3000, 7000]


def child(args: argparse.Namespace) -> dict:
    import torch

    from engine_bench import write_config
    from moeserve.config import EngineConfig
    from moeserve.engine.core import EngineCore
    from moeserve.engine.sampling_params import SamplingParams

    path = write_config(args.model, args.fp8)
    t0 = time.perf_counter()
    config = EngineConfig.from_kwargs(path, dtype="bfloat16", device="cuda", load_format="dummy", max_num_seqs=8,
                                      max_num_batched_tokens=8192, max_model_len=8192 + 64,
                                      enable_prefix_caching=False, gpu_memory_utilization=0.85,
                                      warmup_prefill=args.warmup == "on")
    engine = EngineCore(config)
    torch.cuda.synchronize()
    out = {"warmup": args.warmup, "start_s": time.perf_counter() - t0, "ttft_s": {}}
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    for rnd in ("first", "again"):
        for n in SIZES:
            ids = torch.randint(10, engine.model_config.vocab_size - 10, (n,), generator=gen).tolist()
            t = time.perf_counter()
            engine.add_request(f"{rnd}-{n}", ids, params)
            while engine.has_unfinished():
                engine.step()
            out["ttft_s"][f"{rnd} {n}"] = time.perf_counter() - t
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="v2-lite")
    p.add_argument("--fp8", action="store_true")
    p.add_argument("--out", required=True, help="path prefix: writes PREFIX.json")
    p.add_argument("--warmup", choices=["on", "off"], help=argparse.SUPPRESS)  # the child process's mode
    args = p.parse_args()
    if args.warmup:
        print(json.dumps(child(args)))
        return 0
    results = []
    for mode in ("off", "on"):
        env = dict(os.environ, TRITON_CACHE_DIR=tempfile.mkdtemp(prefix="triton-"))
        cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--out", args.out, "--warmup", mode]
        proc = subprocess.run(cmd + (["--fp8"] if args.fp8 else []), env=env, capture_output=True, text=True,
                              timeout=900)
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-4000:])
            return 1
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    with open(args.out + ".json", "w") as f:
        json.dump({"model": args.model, "fp8": args.fp8, "command": " ".join(sys.argv), "results": results}, f, indent=1)
    keys = list(results[0]["ttft_s"])
    print("| warm-up | start s | " + " | ".join(f"TTFT {k} s" for k in keys) + " |")
    print("|---" * (2 + len(keys)) + "|")
    for r in results:
        print(f"| {r['warmup']} | {r['start_s']:.1f} | " + " | ".join(f"{r['ttft_s'][k]:.2f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
