"""Paged decode attention: the split-KV Triton kernels (MLA absorbed, GQA) against the torch
references, on CPU.

The Triton cases run under the interpreter (TRITON_INTERPRET=1) in a child process, as in
test_fused_moe.py: the variable must be set before triton is imported. fp32/fp16 queries only
(bf16 is wrong under the interpreter); float8_e4m3fn caches are loaded and upcast there too.
Every case: shuffled block tables, mixed lengths (1, odd, several blocks), NaN in every cache slot
and block-table entry that the sequence does not use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from moeserve.kernels.attention_triton import MAX_SPLITS, choose_num_splits

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
}

GQA_CASES = {  # name: (seq_lens, heads, kv heads, head dim, page_size, q dtype, cache dtype, num_splits)
    "gqa_fp32_bs16": ([1, 33, 70, 16], 8, 2, 64, 16, torch.float32, torch.float32, 3),
    "gqa_fp16_bs64_qwen3_heads": ([1, 129, 65], 32, 4, 128, 64, torch.float16, torch.float16, None),
    "gqa_fp8_cache_fp16_q": ([5, 90], 8, 4, 128, 16, torch.float16, torch.float8_e4m3fn, 2),
    # group of 1 (MHA), head dim 80 (not a power of two), more splits than tiles: empty splits
    "gqa_fp32_mha_d80_empty_splits": ([7, 40], 3, 3, 80, 16, torch.float32, torch.float32, 5),
}


def _mla_case(seq_lens, heads, latent, rope, page_size, q_dtype, cache_dtype, num_splits, strided):
    from moeserve.kernels.attention import mla_decode_ref
    from moeserve.kernels.attention_triton import mla_decode_triton

    kv, tables = random_paged_cache(seq_lens, page_size, (latent + rope,), cache_dtype)
    q = torch.randn(len(seq_lens), heads, latent + rope).to(q_dtype)
    if strided:
        q_latent, q_rope = q[..., :latent], q[..., latent:]
    else:
        q_latent, q_rope = q[..., :latent].contiguous(), q[..., latent:].contiguous()
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    scale = (latent + rope) ** -0.5
    out = mla_decode_triton(q_latent, q_rope, kv, tables, lens, scale, num_splits=num_splits)
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
    out = paged_decode_triton(q, k, v, tables, lens, scale, num_splits=num_splits)
    ref = paged_decode_ref(q, k, v, tables, lens, scale)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    return rel_err(out, ref) if torch.isfinite(out).all() else float("inf")


def _interpreter_cases() -> dict[str, tuple[float, float]]:
    """name -> (relative error vs the reference, tolerance)."""
    results = {}
    for name, args in MLA_CASES.items():
        results[name] = (_mla_case(*args), TOL[args[5]])
    for name, args in GQA_CASES.items():
        results[name] = (_gqa_case(*args), TOL[args[5]])
    return results


@pytest.fixture(scope="module")
def interpreter_results():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", list(MLA_CASES) + list(GQA_CASES))
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


if __name__ == "__main__":
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    out = _interpreter_cases()
    out["seed"] = seed
    print(json.dumps(out))
