"""Paged attention: the split-KV Triton decode kernels (MLA absorbed, GQA) and the varlen prefill
kernel (paged GQA caches, packed K/V for MLA's expanded form) against the torch references, on CPU.

The Triton cases run under the interpreter (TRITON_INTERPRET=1) in a child process, as in
test_fused_moe.py: the variable must be set before triton is imported. fp32/fp16 queries only
(bf16 is wrong under the interpreter); float8_e4m3fn caches are loaded and upcast there too.
Every case: shuffled block tables, mixed lengths (1, odd, several blocks), NaN in every cache slot
and block-table entry that the sequence does not use. Prefill cases add a cached prefix before the
queries (seq_len > q_len), q_len 1 between longer sequences, and query/key blocks that cross pages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from moeserve.kernels.attention_triton import MAX_SPLITS, choose_num_splits
from tests.helpers import interpreter_results as run_interpreted
from tests.helpers import print_interpreter_cases

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = {torch.float32: 1e-4, torch.float16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()


def random_paged_cache(seq_lens: list[int], page_size: int, row_shape: tuple[int, ...], dtype: torch.dtype,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cache [NB, page_size, *row_shape] of dtype, block_tables [B, max_blocks] int32).

    Pages are handed out in a random order; slots past each sequence's length, spare pages and
    the block-table entries past the last used block (pointing at spare pages) hold NaN.
    """
    blocks = [(s + page_size - 1) // page_size for s in seq_lens]
    num_pages = sum(blocks) + 3
    cache = torch.full((num_pages, page_size, *row_shape), float("nan"))
    pages = torch.randperm(num_pages).tolist()
    spare = pages[sum(blocks):]
    tables = torch.tensor(spare, dtype=torch.int32)[torch.randint(0, len(spare), (len(seq_lens), max(blocks) + 1))]
    for b, length in enumerate(seq_lens):
        for j in range(blocks[b]):
            page = pages.pop(0)
            tables[b, j] = page
            n = min(page_size, length - j * page_size)
            cache[page, :n] = torch.randn(n, *row_shape)
    return cache.to(dtype), tables


MLA_CASES = {  # name: (seq_lens, heads, latent, rope, page_size, q dtype, cache dtype, num_splits, strided q)
    "mla_fp32_bs16": ([1, 17, 100, 5, 48], 16, 512, 64, 16, torch.float32, torch.float32, 3, False),
    "mla_fp16_bs64_auto_splits": ([1, 130, 64, 77], 16, 512, 64, 64, torch.float16, torch.float16, None, False),
    # 20 heads: a second, partial head block; L=96 is not a power of two; q_latent/q_rope are
    # views of one [B, H, L+R] tensor
    "mla_fp32_20heads_strided_q": ([9, 1, 70], 20, 96, 32, 16, torch.float32, torch.float32, 2, True),
    "mla_fp8_cache_fp16_q": ([3, 33, 200], 16, 512, 64, 16, torch.float16, torch.float8_e4m3fn, 4, False),
    # q up to ~4e4: the FP8-cache path scales q by 2^-2 into its fp16 dots and the scores back
    "mla_fp8_cache_large_q": ([40, 7], 16, 512, 64, 16, torch.float16, torch.float8_e4m3fn, 2, False,
                              dict(q_scale=1e4)),
    # 64 heads in one block with 64-token tiles: the tiles chosen for DeepSeek-V3's 128 heads
    "mla_fp32_64heads_v3_tiles": ([1, 17, 300, 64], 64, 512, 64, 16, torch.float32, torch.float32, 2, False,
                                  dict(block_h=64, block_n=64, num_warps=8)),
    "mla_fp8_cache_64heads_v3_tiles": ([70, 5], 64, 512, 64, 16, torch.float16, torch.float8_e4m3fn, 2, False,
                                       dict(block_h=64, block_n=64, num_warps=8)),
    # pages of a tile or more (BLOCK_N 32 divides 32 and 64): each tile's rows from one base (TILE_IN_PAGE);
    # sequences ending mid-tile, mid-page and on a page's end, with NaN in the page past them
    "mla_fp32_bs32_tile_in_page": ([1, 33, 100, 64, 5], 16, 512, 64, 32, torch.float32, torch.float32, 3, False),
    "mla_fp32_20heads_bs64_strided_q": ([9, 1, 70, 129], 20, 96, 32, 64, torch.float32, torch.float32, 2, True),
    "mla_fp8_cache_bs64": ([3, 65, 200], 16, 512, 64, 64, torch.float16, torch.float8_e4m3fn, 4, False),
    "mla_fp32_64heads_v3_tiles_bs64": ([1, 17, 300, 64], 64, 512, 64, 64, torch.float32, torch.float32, 2, False,
                                       dict(block_h=64, block_n=64, num_warps=8)),
}

GQA_CASES = {  # name: (seq_lens, heads, kv heads, head dim, page_size, q dtype, cache dtype, num_splits)
    "gqa_fp32_bs16": ([1, 33, 70, 16], 8, 2, 64, 16, torch.float32, torch.float32, 3),
    "gqa_fp16_bs64_qwen3_heads": ([1, 129, 65], 32, 4, 128, 64, torch.float16, torch.float16, None),
    "gqa_fp8_cache_fp16_q": ([5, 90], 8, 4, 128, 16, torch.float16, torch.float8_e4m3fn, 2),
    # group of 1 (MHA), head dim 80 (not a power of two), more splits than tiles: empty splits
    "gqa_fp32_mha_d80_empty_splits": ([7, 40], 3, 3, 80, 16, torch.float32, torch.float32, 5),
}


PAGED_PREFILL_CASES = {  # name: (q_lens, seq_lens, heads, kv heads, head dim, page, q dtype, cache dtype, tiles)
    # GQA 8:1; q_len 1 between longer ones, cached prefixes of 29 and 50, blocks of 16 within pages of 16
    "prefill_paged_gqa8_prefix": ([5, 1, 37, 1, 20], [5, 30, 37, 1, 70], 8, 1, 128, 16, torch.float32,
                                  torch.float32, (16, 16)),
    # MHA (ratio 1); key tiles of 32 span two pages of 16; a sequence with no queries
    "prefill_paged_mha_tile_spans_pages": ([3, 17, 0, 1], [40, 17, 12, 9], 2, 2, 128, 16, torch.float32,
                                           torch.float32, (16, 32)),
    # the default 64 x 64 tiles over pages of 16: one block holds a whole 40-token chunk
    "prefill_paged_default_tiles": ([40, 1, 70], [100, 21, 70], 4, 2, 128, 16, torch.float32, torch.float32,
                                    None),
    "prefill_paged_fp8_cache_fp16_q": ([20, 1, 33], [20, 50, 40], 4, 1, 128, 16, torch.float16,
                                       torch.float8_e4m3fn, (16, 16)),
}

VARLEN_PREFILL_CASES = {  # name: (q_lens, k_lens, heads, kv heads, qk dim, v dim, q dtype, tiles)
    # MLA expanded: qk 192 = 128 + 64 (two dots), v 128 a strided view beside k_nope, as in the layer
    "prefill_varlen_mla_192_128": ([9, 1, 40, 0], [9, 20, 60, 3], 4, 4, 192, 128, torch.float32, (16, 16)),
    "prefill_varlen_gqa8_128": ([1, 33, 17], [1, 33, 50], 8, 1, 128, 128, torch.float32, (16, 32)),
}


def _paged_prefill_case(q_lens, seq_lens, heads, kv_heads, head_dim, page_size, q_dtype, cache_dtype, tiles):
    from moeserve.kernels.attention import paged_prefill_ref
    from moeserve.kernels.attention_triton import paged_prefill_triton

    k, tables = random_paged_cache(seq_lens, page_size, (kv_heads, head_dim), torch.float32)
    v = torch.randn_like(k).masked_fill(k.isnan(), float("nan"))
    k, v = k.to(cache_dtype), v.to(cache_dtype)
    q = torch.randn(sum(q_lens), heads, head_dim).to(q_dtype)
    scale = head_dim ** -0.5
    kw = dict(block_m=tiles[0], block_n=tiles[1]) if tiles else {}
    out = paged_prefill_triton(q, k, v, tables, q_lens, seq_lens, scale, **kw)
    ref = paged_prefill_ref(q, k, v, tables, q_lens, seq_lens, scale)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    return rel_err(out, ref) if torch.isfinite(out).all() else float("inf")


def _varlen_prefill_case(q_lens, k_lens, heads, kv_heads, qk_dim, v_dim, q_dtype, tiles):
    from moeserve.kernels.attention import varlen_attention_ref
    from moeserve.kernels.attention_triton import varlen_attention_triton

    cu_q, cu_k = torch.tensor([0, *q_lens]).cumsum(0).tolist(), torch.tensor([0, *k_lens]).cumsum(0).tolist()
    q = torch.randn(cu_q[-1], heads, qk_dim).to(q_dtype)
    k = torch.randn(cu_k[-1], kv_heads, qk_dim).to(q_dtype)
    v = torch.randn(cu_k[-1], kv_heads, 128 + v_dim).to(q_dtype)[..., 128:]  # rows not contiguous
    scale = qk_dim ** -0.5
    out = varlen_attention_triton(q, k, v, cu_q, cu_k, scale, block_m=tiles[0], block_n=tiles[1])
    ref = varlen_attention_ref(q, k, v, cu_q, cu_k, scale)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    return rel_err(out, ref) if torch.isfinite(out).all() else float("inf")


LAYER_CASES = ["layer_qwen3_moe", "layer_deepseek_v3"]


def _layer_case(arch):
    """A mixed step (decodes first, then prefill chunks with cached prefixes, a q_len 1 among them)
    through a tiny model's attention layer: the Triton path against the reference path."""
    from moeserve.config import ModelConfig
    from moeserve.layers.attention import AttentionMetadata, GQAAttention, MLAAttention
    from moeserve.models.tiny import TINY_CONFIGS

    cfg = ModelConfig.from_dict({**TINY_CONFIGS[arch], "model_type": arch})
    gqa = arch == "qwen3_moe"
    layer = (GQAAttention if gqa else MLAAttention)(cfg)
    for p in layer.parameters():
        p.data.normal_(0.0, 0.15)
    layer.process_weights_after_loading(torch.float32)
    query_lens, seq_lens, page = [1, 1, 20, 1, 33], [5, 40, 20, 17, 50], 16
    entry = layer.kv_cache_shape(1, page)[3 if gqa else 2:]  # GQA: [2 (K, V), blocks, page, Hkv, D]
    cache, tables = random_paged_cache(seq_lens, page, tuple(entry), torch.float32)
    if gqa:
        cache = torch.stack([cache, torch.randn_like(cache).masked_fill(cache.isnan(), float("nan"))])
    x = torch.randn(sum(query_lens), cfg.hidden_size)
    positions = torch.cat([torch.arange(s - q, s) for q, s in zip(query_lens, seq_lens)])
    outs = []
    for interpret in ("1", "0"):  # the dispatchers read the variable at each call: "0" picks the references
        os.environ["TRITON_INTERPRET"] = interpret
        layer.kv_cache = cache.clone()
        meta = AttentionMetadata.build(query_lens, seq_lens, tables.tolist(), page, "cpu")
        outs.append(layer(x, positions, meta))
        assert interpret == "0" or any(k[0] == "paged_prefill" or k[0] == "varlen_prefill" for k in meta.memo)
    os.environ["TRITON_INTERPRET"] = "1"
    return rel_err(outs[0], outs[1]) if torch.isfinite(outs[0]).all() else float("inf")


def _mla_case(seq_lens, heads, latent, rope, page_size, q_dtype, cache_dtype, num_splits, strided, opts=None):
    from moeserve.kernels.attention import mla_decode_ref
    from moeserve.kernels.attention_triton import mla_decode_triton

    opts = dict(opts or {})
    kv, tables = random_paged_cache(seq_lens, page_size, (latent + rope,), cache_dtype)
    q = (torch.randn(len(seq_lens), heads, latent + rope) * opts.pop("q_scale", 1.0)).to(q_dtype)
    if strided:
        q_latent, q_rope = q[..., :latent], q[..., latent:]
    else:
        q_latent, q_rope = q[..., :latent].contiguous(), q[..., latent:].contiguous()
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    scale = (latent + rope) ** -0.5
    out = mla_decode_triton(q_latent, q_rope, kv, tables, lens, scale, num_splits=num_splits, **opts)
    ref = mla_decode_ref(q_latent, q_rope, kv, tables, lens, scale)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    return rel_err(out, ref) if torch.isfinite(out).all() else float("inf")


def _gqa_case(seq_lens, heads, kv_heads, head_dim, page_size, q_dtype, cache_dtype, num_splits):
    from moeserve.kernels.attention import paged_decode_ref
    from moeserve.kernels.attention_triton import paged_decode_triton

    k, tables = random_paged_cache(seq_lens, page_size, (kv_heads, head_dim), torch.float32)
    v = torch.randn_like(k).masked_fill(k.isnan(), float("nan"))
    k, v = k.to(cache_dtype), v.to(cache_dtype)
    q = torch.randn(len(seq_lens), heads, head_dim).to(q_dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    scale = head_dim ** -0.5
    # into rows 1..B of a caller's buffer (as the layer passes its output rows); the rows around stay
    buf = torch.full((len(seq_lens) + 2, heads, head_dim), 7.0, dtype=q_dtype)
    out = paged_decode_triton(q, k, v, tables, lens, scale, num_splits=num_splits, out=buf[1:-1])
    ref = paged_decode_ref(q, k, v, tables, lens, scale)
    assert out.dtype == ref.dtype and out.shape == ref.shape and out.data_ptr() == buf[1].data_ptr()
    assert (buf[0] == 7).all() and (buf[-1] == 7).all()
    return rel_err(out, ref) if torch.isfinite(out).all() else float("inf")


def _interpreter_cases() -> dict[str, tuple[float, float]]:
    """name -> (relative error vs the reference, tolerance)."""
    results = {}
    for name, args in MLA_CASES.items():
        results[name] = (_mla_case(*args), TOL[args[5]])
    for name, args in GQA_CASES.items():
        results[name] = (_gqa_case(*args), TOL[args[5]])
    for name, args in PAGED_PREFILL_CASES.items():
        results[name] = (_paged_prefill_case(*args), TOL[args[6]])
    for name, args in VARLEN_PREFILL_CASES.items():
        results[name] = (_varlen_prefill_case(*args), TOL[args[6]])
    for name in LAYER_CASES:
        results[name] = (_layer_case(name[len("layer_"):]), TOL[torch.float32])
    return results


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", list(MLA_CASES) + list(GQA_CASES) + list(PAGED_PREFILL_CASES)
                         + list(VARLEN_PREFILL_CASES) + LAYER_CASES)
def test_triton_matches_reference(interpreter_results, case):
    err, tol = interpreter_results[case]
    assert err <= tol, f"{case}: rel error {err} > {tol} (seed {interpreter_results['seed']})"


# ---- plain CPU ------------------------------------------------------------------------------------

def test_num_splits_fill_the_gpu():
    sms = 132
    assert choose_num_splits(1, 1, sms) == MAX_SPLITS  # one long sequence: as many splits as allowed
    assert choose_num_splits(32, 1, sms) == 9  # 32 * 9 = 288 programs >= two waves of 132
    assert 32 * 8 < 2 * sms
    assert choose_num_splits(128, 8, sms) == 1  # V3 heads at batch 128 fill the GPU without splits
    for batch in (1, 3, 17, 64, 128, 512):
        splits = choose_num_splits(batch, 4, sms)
        assert 1 <= splits <= MAX_SPLITS
        assert batch * 4 * splits >= 2 * sms or splits == MAX_SPLITS


def test_mla_splits_stop_at_one_wave_of_resident_programs():
    sms, resident = 132, 2
    assert choose_num_splits(1, 1, sms, resident=resident) == MAX_SPLITS
    assert choose_num_splits(64, 1, sms, resident=resident) == 4  # 256 programs <= 264 slots (5 would be 320)
    assert choose_num_splits(128, 1, sms, resident=resident) == 2
    assert choose_num_splits(32, 8, sms, resident=resident) == 1  # V3's 8 head blocks: 256 programs already
    assert choose_num_splits(512, 1, sms, resident=resident) == 1  # more sequences than slots: no split
    for batch in (1, 3, 17, 64, 100, 132):
        splits = choose_num_splits(batch, 1, sms, resident=resident)
        assert batch * splits <= resident * sms or splits == 1


def test_random_cache_hides_nan_in_unused_slots():
    """The helper's layout (which the interpreter cases rely on): used slots finite, the rest NaN."""
    seq_lens = [1, 18, 33]
    cache, tables = random_paged_cache(seq_lens, 16, (4,), torch.float32)
    used = set()
    for b, length in enumerate(seq_lens):
        for t in range(length):
            page = int(tables[b, t // 16])
            assert torch.isfinite(cache[page, t % 16]).all()
            used.add((page, t % 16))
        next_page = int(tables[b, (length + 15) // 16])
        assert cache[next_page].isnan().all()
    assert sum(cache[p, s].isfinite().all().item() for p in range(cache.shape[0]) for s in range(16)) == len(used)


def test_gather_sequences_is_the_per_sequence_gather_in_one_call():
    from moeserve.kernels.attention import gather_sequences
    from moeserve.layers.attention import gather_sequence

    seq_lens = [1, 18, 0, 33]
    for dtype in (torch.float32, torch.float8_e4m3fn):
        cache, tables = random_paged_cache(seq_lens, 16, (2, 8), dtype)
        want = torch.cat([gather_sequence(cache, tables[b], n) for b, n in enumerate(seq_lens)])
        memo = {}
        for _ in range(2):  # the second call reuses the slot indices kept in memo
            got = gather_sequences(cache, tables, seq_lens, memo)
            assert got.dtype == dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        assert len(memo) == 1


def test_prefill_plan_covers_every_query_once_longest_first():
    from moeserve.kernels.attention_triton import prefill_plan

    q_lens, k_lens, block_m = [5, 0, 1, 130, 64], [5, 9, 40, 200, 64], 64
    plan = prefill_plan(q_lens, k_lens, block_m, torch.device("cpu")).tolist()
    assert len(plan) == 1 + 1 + 3 + 1  # ceil(q_len / block_m) blocks, none for q_len 0
    covered = set()
    for seq, q_start, q_len, k_len, k_start, m0 in plan:
        assert (q_start, q_len, k_len, k_start) == (sum(q_lens[:seq]), q_lens[seq], k_lens[seq], sum(k_lens[:seq]))
        covered |= {q_start + i for i in range(m0, min(m0 + block_m, q_len))}
    assert covered == set(range(sum(q_lens)))
    keys_seen = [k_len - q_len + min(m0 + block_m, q_len) for _, _, q_len, k_len, _, m0 in plan]
    assert keys_seen == sorted(keys_seen, reverse=True) and keys_seen[0] == 200


def test_attention_bench_smoke_prefill(tmp_path):
    """benchmarks/kernel_bench_attention.py --smoke, prefill rows: tiny shapes on CPU under the interpreter."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "kernel_bench_attention.py"), "--smoke",
                           "--kernels", "prefill", "--models", "V2-Lite,Qwen3-MoE", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "kernels_attention.json").read_text())
    assert len(report["cases"]) == 4 + 8 and all(r["ok"] for r in report["cases"])
    assert {r["kernel"] for r in report["cases"]} == {"prefill_paged", "prefill_mla_packed"}
    assert all(r["t_sdpa_us"] > 0 and r["roof_us"] > 0 for r in report["cases"])
    assert proc.stdout.strip().splitlines()[-1].startswith("|")  # the table comes last


def test_mla_decode_tiles_many_heads_from_batch_16_on():
    from moeserve.kernels.attention_triton import MLA_TILES, MLA_TILES_MANY_HEADS, mla_decode_tiles

    assert mla_decode_tiles(128, 64) == MLA_TILES_MANY_HEADS == (64, 64, 8, 2)
    assert mla_decode_tiles(64, 16) == MLA_TILES_MANY_HEADS  # V3 at tp 2
    assert mla_decode_tiles(128, 8) == MLA_TILES  # measured even at batch 8, slower at 1
    assert mla_decode_tiles(16, 64) == MLA_TILES  # V2-Lite: 16 heads are one block already
    assert mla_decode_tiles(32, 128) == MLA_TILES  # V3 at tp 4


if __name__ == "__main__":
    print_interpreter_cases(_interpreter_cases)
