"""Block sizes for the MoE, FP8 GEMM and small-M GEMM kernels: tuned per shape in configs/*.json,
else a default.

Files are per GPU architecture (`fused_moe_sm90.json`, `dense_fp8_sm90.json`, `dense_gemv_sm90.json`):
tuning on an H100 holds well enough on an H200 of the same architecture. Each file maps a shape key
to {"<tokens>": config}; a lookup takes the entry whose token count is nearest the actual one.
benchmarks/kernel_bench_moe.py --tune writes the first two, benchmarks/kernel_bench_dense.py --tune
the third.

A fused-MoE config is the gate_up GEMM's; an optional "down" sub-dict overrides some of its keys
(DOWN_KEYS) for the down GEMM, whose shape differs (V2-Lite: gate_up N = I = 1408 with two
accumulators, K = H = 2048; down N = H = 2048, K = I = 1408), so their best tiles differ. BLOCK_M is
never overridden: both GEMMs walk the blocks of one moe_align. A config without "down" runs both
GEMMs with the same tiles.
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
    # Nearest on a log scale: 100 tokens behave more like 64 than like 256. A copy down to the
    # "down" sub-dict: the cached table must not change under a caller that edits its config.
    best = min(table, key=lambda t: abs(math.log(int(t)) - math.log(max(tokens, 1))))
    return {key: dict(v) if isinstance(v, dict) else v for key, v in table[best].items()}


DOWN_TILE_KEYS = frozenset({"BLOCK_N", "BLOCK_K", "GROUP_SIZE_M", "num_warps", "num_stages"})  # a tuned "down"
DOWN_KEYS = DOWN_TILE_KEYS | {"maxnreg"}  # what "down" may set ("maxnreg": registers a thread at most)


def down_config(cfg: dict) -> dict:
    """The down GEMM's config: cfg with its "down" overrides (module docstring), without "down"."""
    down = cfg.get("down") or {}
    if "BLOCK_M" in down:
        raise ValueError(f"fused MoE config {cfg}: 'down' may not set BLOCK_M; both GEMMs share the "
                         f"moe_align blocks of the top-level BLOCK_M")
    if not set(down) <= DOWN_KEYS:
        raise ValueError(f"fused MoE config {cfg}: 'down' sets {sorted(set(down) - DOWN_KEYS)}; it may "
                         f"only override {sorted(DOWN_KEYS)}")
    return {key: v for key, v in cfg.items() if key != "down"} | down


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


# Off: on an H200 the in-GEMM quant was slower than the two separate quant launches at every
# V2-Lite size measured (T=1: 37.8 vs 33.5 us, T=8: 149 vs 104, T=64: 187 vs 168, T=256: 396 vs
# 208; docs/perf/kernels_moe.md). The path stays (FUSE_QUANT=True in a config) for later tuning.
MOE_FUSE_MAX_ROWS_PER_EXPERT = 0


# W8A8 fused MoE: gate_up quantizes its own output for the down GEMM in its epilogue (its N tile
# then one scale group, BLOCK_N = 128 whatever the table says), instead of writing it in bf16 for a
# separate quant launch to read: one launch a layer less and half the intermediate's bytes, both
# ways bit-identical. Off: with V2-Lite's tuned tiles (64 wide at batch 64, 32 at batch 1) the
# 128-wide tile cost more than the launch saved, at every stage count tried (H200;
# docs/perf/kernels_moe.md, fifth session). A config's ACT_QUANT_IN_GATE_UP overrides.
ACT_QUANT_IN_GATE_UP = False


# The fused MoE's down GEMM waits for gate_up per block of rows (arrival flags), not for gate_up's
# whole grid, so with PDL it overlaps gate_up's tail. Bit-identical either way. A config's
# DOWN_WAITS_PER_BLOCK overrides.
DOWN_WAITS_PER_BLOCK = True

# W8A8 fused MoE: gate_up's last program of each block of rows quantizes the block's intermediate
# rows for the down GEMM (arrival flags), which takes the quant launch between the two GEMMs away
# and keeps gate_up's tuned N tiles (ACT_QUANT_IN_GATE_UP needs them one scale group wide).
# Bit-identical either way. A config's ACT_QUANT_BY_LAST_TILE overrides.
ACT_QUANT_BY_LAST_TILE = True

# Both are for decode sizes, where they were measured (H200, V2-Lite, 1-128 tokens;
# docs/perf/kernels_moe.md): a larger call keeps the grid-wide wait and the quant launch (with prefill
# tiles of 64+ rows the last tile's quant of its block would take one pass a scale group).
PER_BLOCK_MAX_TOKENS = 256


# FP8 expert weights stored in tiles of FP8_WEIGHT_TILE_ROWS rows x one 128-wide scale group, each
# contiguous (fused_moe.tile_weights; layers/moe.py tiles them after loading): a GEMM's K step then
# reads 2 KB chunks, not 128 bytes from each of 16 rows K bytes apart. H200, V2-Lite FP8, batch 64:
# 0.10-0.15 ms off a decode step (64-row tiles: the same); bf16 (256 bytes a row a K step) gained
# nothing (docs/perf/engine_v2lite.md, fourteenth session). 0: row-major, as the checkpoint stores them.
FP8_WEIGHT_TILE_ROWS = 16


def moe_fuse_quant(tokens: int, num_experts: int, top_k: int) -> bool:
    """W8A8 fused MoE: quantize activations inside the two GEMMs (no quant launches) at decode sizes.

    Each N-tile program of a GEMM re-quantizes its rows (I/BLOCK_N or H/BLOCK_N times per row): noise
    next to the weight stream while each expert gets a few rows, a real cost once the GEMMs are
    compute-bound (prefill), where the two separate quant passes are cheap by comparison."""
    return tokens * top_k / max(num_experts, 1) <= MOE_FUSE_MAX_ROWS_PER_EXPERT


def moe_config(tokens: int, num_experts: int, hidden: int, intermediate: int, top_k: int, wdtype: str,
               device: torch.device, num_fused_shared: int = 0) -> dict:
    """num_experts and top_k count the fused shared experts' slots (num_fused_shared of them) too.
    A shape tuned with them is used first; else the table of the routed experts alone (E - S
    experts, top-(k - S): the same weight widths, each token's S more rows going to S more
    experts), else the default. A table speaks for token counts up to twice its largest entry: a
    fused-shape table tuned for decode batches leaves prefill sizes to the routed table."""
    configs = load_configs("fused_moe", arch_tag(device))
    tables = [configs.get(moe_shape_key(num_experts, hidden, intermediate, top_k, wdtype))]
    if num_fused_shared:
        tables.append(configs.get(moe_shape_key(num_experts - num_fused_shared, hidden, intermediate,
                                                top_k - num_fused_shared, wdtype)))
    tables = [t for t in tables if t]
    for table in tables:
        if tokens <= 2 * max(int(t) for t in table):
            return _nearest(table, tokens)
    if tables:
        return _nearest(tables[-1], tokens)
    cfg = default_moe_config(tokens, num_experts, top_k, device.type == "cpu")
    if wdtype in ("float32", "fp32") and device.type != "cpu":
        # fp32 tiles take twice the shared memory of bf16 ones: halve K and the pipeline depth.
        cfg.update(BLOCK_K=min(cfg["BLOCK_K"], 64), num_stages=min(cfg["num_stages"], 2))
    return cfg


@functools.lru_cache(maxsize=None)
def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a pretend GPU of 4 SMs, so CPU tests take the split-K path too
    return torch.cuda.get_device_properties(device).multi_processor_count


# Dense FP8 block GEMM (fp8.block_fp8_matmul_triton), decode (M <= DECODE_MAX_M) vs prefill.
#
# Decode is a stream of the weight matrix (N x K bytes in e4m3) with almost no math, so what counts
# is how many bytes are in flight at once: every SM needs a few programs each streaming its own
# slice. One program per (BLOCK_M x BLOCK_N) output tile gives M=64, N=2048 only 32 programs for
# 132 SMs (measured 8.5 us per call on an H200, ~6x the bytes' time). So:
#  - BLOCK_M just covers M (16/32/64: tl.dot needs >= 16), BLOCK_N = 64;
#  - split K into SPLIT_K ranges of whole 128-groups until there are ~PROGRAMS_PER_SM programs
#    per SM, keeping >= MIN_GROUPS_PER_SPLIT groups per range and the fp32 partials (splits x M x N
#    x 4 bytes, written and read back through L2 by the fixed-order sum: each tile's last program,
#    REDUCE_IN_GEMM below) under a quarter of the weight bytes; each split range then streams
#    ~BLOCK_N x K / SPLIT_K weight bytes;
#  - FUSE_QUANT for M <= FUSE_MAX_M: quantizing the A tile inside the GEMM saves the separate quant
#    launch (1.4-1.8 us measured) but every N-tile program redoes its rows' quantization: it won
#    only at M <= 8 in the H200 sweep (never at M >= 32).
# Prefill (M > DECODE_MAX_M) keeps one program per tile, no split (enough tiles already).
# Measured (H200 sweep, docs/perf/kernels_moe.md "FP8 block GEMM at decode shapes"): every call
# costs ~5-9 us whatever its bytes (0.3-3 us of them), so splitting pays only where K is long
# (K >= 2816: 1.4-2.8x faster than one program per tile) and is neutral to slightly worse at K=2048.
# The per-shape table `dense_fp8_<arch>.json` (the sweep's best, kernel_bench_moe.py --fp8-gemm
# --tune) overrides this heuristic for the V2-Lite and V3 shapes; the heuristic covers the rest
# (tensor-parallel shards, other models).
DECODE_MAX_M = 256
PROGRAMS_PER_SM = 2
MIN_GROUPS_PER_SPLIT = 2
FUSE_MAX_M = 16


# The dense FP8 GEMM, where BLOCK_N divides the weights' scale block: one weight scale a tile and K
# step, loaded as a scalar and multiplied into the activation scales, so the promotion is one FMA an
# accumulator element (a scale a column: a load each, two multiplies an element). Results differ
# from that order in fp32 rounding only. H200, 64 rows: q/kv_a 6.8 -> 5.6 us (the loop 203 -> 144
# sm_90 instructions). Not in the fused MoE, which got slower with it (fused_moe says how).
# Off: the column form (an A/B switch; docs/perf/kernels_moe.md, "One weight scale a tile").
DENSE_FP8_SCALE_PER_TILE = True

# The split-K sum by the GEMM's last program of each tile (fp8.splitk_matmul), not a second launch:
# 1-7 us less a split call on an H200 (docs/perf/kernels_moe.md, "five ideas that did not pay").
# A config's REDUCE_IN_GEMM overrides it (the tuning sweep tries both).
REDUCE_IN_GEMM = True


def default_dense_fp8_config(m: int, n: int, k: int, sms: int, on_cpu: bool, group_k: int = 128) -> dict:
    if on_cpu:  # the interpreter: tiny blocks keep tests fast
        cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_SIZE_M=1, num_warps=4, num_stages=1)
    elif m > DECODE_MAX_M:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_SIZE_M=8, num_warps=8, num_stages=3,
                    SPLIT_K=1, FUSE_QUANT=False)
    else:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        cfg = dict(BLOCK_M=bm, BLOCK_N=64, BLOCK_K=128, GROUP_SIZE_M=1, num_warps=4, num_stages=4)
    if m > DECODE_MAX_M:
        return dict(cfg, SPLIT_K=1, FUSE_QUANT=False)
    tiles = -(-m // cfg["BLOCK_M"]) * -(-n // cfg["BLOCK_N"])
    groups = -(-k // group_k)
    split = -(-PROGRAMS_PER_SM * sms // tiles)
    split = min(split, max(1, groups // MIN_GROUPS_PER_SPLIT), max(1, k // (16 * m)))
    return dict(cfg, SPLIT_K=max(1, split), FUSE_QUANT=m <= FUSE_MAX_M)


def dense_fp8_config(m: int, n: int, k: int, device: torch.device) -> dict:
    """The shape's tuned entry nearest m, for m up to twice the table's largest entry (a table tuned at
    decode sizes only must not hand its split-K tiles to a prefill); else the heuristic."""
    table = load_configs("dense_fp8", arch_tag(device)).get(dense_shape_key(n, k))
    if table and m <= 2 * max(int(t) for t in table):
        return _nearest(table, m)
    return default_dense_fp8_config(m, n, k, num_sms(device), device.type == "cpu")


# Unquantized GEMM at decode sizes (kernels/gemv.py), M <= GEMV_MAX_M rows: y = x W^T streams W
# (N x K x 2 bytes in bf16) with next to no math, so, as for the FP8 decode GEMM above, what counts
# is bytes in flight on every SM:
#  - BLOCK_M = 16 holds all the rows (tl.dot's minimum), so each W tile is read once;
#  - BLOCK_N = 32 rows of W per program, BLOCK_K = 128 per step: an 8 KB bf16 tile (256 contiguous
#    bytes per row), num_stages = 4 of them in flight per program;
#  - SPLIT_K ranges of whole BLOCK_K steps until there are >= PROGRAMS_PER_SM programs per SM, each
#    range >= GEMV_MIN_STEPS steps long (a shorter one never fills its load pipeline). The fp32
#    partials (splits x M x N x 4 bytes) then stay under 1/8 of the weight bytes at M <= 16, and the
#    fixed-order sum is done by each tile's last program (REDUCE_IN_GEMM).
# Measured on an H200 (docs/perf/engine_v2lite.md, 2026-12-01, before the sum moved into the GEMM):
# slower than cuBLAS at V2-Lite shapes, even with V3; hence off by default (EngineConfig.dense_gemv). These are the FP8 decode config's choices;
# benchmarks/kernel_bench_dense.py --tune sweeps BLOCK_N x BLOCK_K x SPLIT_K and writes the table
# `dense_gemv_<arch>.json`, which gemv_config reads first. The config does not depend on M, so the
# CUDA graphs of batch 1..16 share one compiled kernel per shape.
GEMV_MAX_M = 16
GEMV_MIN_STEPS = 2


def default_gemv_config(n: int, k: int, sms: int, on_cpu: bool) -> dict:
    if on_cpu:  # the interpreter: tiny blocks keep tests fast
        cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_SIZE_M=1, num_warps=4, num_stages=1)
    else:
        cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_SIZE_M=1, num_warps=4, num_stages=4)
    tiles = -(-n // cfg["BLOCK_N"])
    steps = -(-k // cfg["BLOCK_K"])
    ranges = -(-PROGRAMS_PER_SM * sms // tiles)  # K ranges wanted
    steps_per_range = max(GEMV_MIN_STEPS, steps // ranges)  # rounded down: at least `ranges` of them
    return dict(cfg, SPLIT_K=-(-steps // steps_per_range))


def gemv_config(m: int, n: int, k: int, device: torch.device) -> dict:
    table = load_configs("dense_gemv", arch_tag(device)).get(dense_shape_key(n, k))
    if table:
        return _nearest(table, m)
    return default_gemv_config(n, k, num_sms(device), device.type == "cpu")
