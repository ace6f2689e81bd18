"""Block sizes for the MoE and FP8 GEMM kernels: tuned per shape in configs/*.json, else a default.

Files are per GPU architecture (`fused_moe_sm90.json`, `block_fp8_sm90.json`): tuning on an H100
holds well enough on an H200 of the same architecture. Each file maps a shape key to
{"<tokens>": config}; a lookup takes the entry whose token count is nearest the actual one.
benchmarks/kernel_bench_moe.py --tune writes these files.
"""

from __future__ import annotations

import functools
import json
import math
import os

import torch

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")


def moe_shape_key(num_experts: int, hidden: int, intermediate: int, top_k: int, wdtype: str) -> str:
    return f"E={num_experts},H={hidden},I={intermediate},k={top_k},w={wdtype}"


def dense_shape_key(n: int, k: int) -> str:
    return f"N={n},K={k}"


def arch_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm{major}{minor}"


@functools.lru_cache(maxsize=None)
def load_configs(kind: str, arch: str) -> dict:
    path = os.path.join(CONFIG_DIR, f"{kind}_{arch}.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _nearest(table: dict, tokens: int) -> dict:
    # Nearest on a log scale: 100 tokens behave more like 64 than like 256.
    best = min(table, key=lambda t: abs(math.log(int(t)) - math.log(max(tokens, 1))))
    return dict(table[best])


def default_moe_config(tokens: int, num_experts: int, top_k: int, on_cpu: bool) -> dict:
    """Small row blocks while each expert gets few rows (decode: weight reads dominate), large ones after."""
    if on_cpu:  # the interpreter: tiny blocks keep tests fast
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_SIZE_M=1, num_warps=4, num_stages=1)
    rows_per_expert = tokens * top_k / max(num_experts, 1)
    if rows_per_expert <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_SIZE_M=1, num_warps=4, num_stages=4)
    if rows_per_expert <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_SIZE_M=1, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_SIZE_M=8, num_warps=8, num_stages=3)


def moe_config(tokens: int, num_experts: int, hidden: int, intermediate: int, top_k: int, wdtype: str,
               device: torch.device) -> dict:
    table = load_configs("fused_moe", arch_tag(device)).get(
        moe_shape_key(num_experts, hidden, intermediate, top_k, wdtype))
    if table:
        return _nearest(table, tokens)
    cfg = default_moe_config(tokens, num_experts, top_k, device.type == "cpu")
    if wdtype in ("float32", "fp32") and device.type != "cpu":
        # fp32 tiles take twice the shared memory of bf16 ones: halve K and the pipeline depth.
        cfg.update(BLOCK_K=min(cfg["BLOCK_K"], 64), num_stages=min(cfg["num_stages"], 2))
    return cfg


def default_dense_fp8_config(m: int, on_cpu: bool) -> dict:
    if on_cpu:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_SIZE_M=1, num_warps=4, num_stages=1)
    if m <= 16:
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_SIZE_M=1, num_warps=4, num_stages=4)
    if m <= 128:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, GROUP_SIZE_M=1, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_SIZE_M=8, num_warps=8, num_stages=3)


def dense_fp8_config(m: int, n: int, k: int, device: torch.device) -> dict:
    table = load_configs("block_fp8", arch_tag(device)).get(dense_shape_key(n, k))
    if table:
        return _nearest(table, m)
    return default_dense_fp8_config(m, device.type == "cpu")
