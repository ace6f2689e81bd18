"""GQA's fused prologue (q/k RMSNorm + rope of q and k + k/v cache write) against its torch reference
(today's composition: rmsnorm_ref, apply_rotary_ref, the index_copy_ writes): under the Triton
interpreter on CPU (fp32/fp16, in a child process: TRITON_INTERPRET=1 must be set before triton is
imported) and on a GPU in bf16 (skipped without one). Fresh random inputs every run.

What is compared, per case: the returned q against the reference's (relative error); the whole K
cache (relative error: the kernel rotates in fp32 with one rounding where the reference rounds each
op); the whole V cache bit for bit (a copy, with torch's FP8 conversion in the FP8 cases); and
every cache entry the step must not touch, bit for bit. Bounds: fp32 1e-6, fp16 2e-3 (a rounding
or two of fp16), bf16 1e-2; with an FP8 cache, k's entries are the reference's or one e4m3 step
away (a last-bit difference before the e4m3 rounding can move it across a rounding boundary), and
no more than 2% of them differ; on the GPU in bf16, k within FP8's 1e-2 as mla_cache's test.
The e4m3 conversion (both fused cache writes': round to nearest even, saturating at +-448, NaN
kept) is torch 2.13's; torch 2.11's (the device machines') turns |x| >= 464 and inf into NaN, so
on the GPU values in range must be torch's bytes and the others saturate.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import interpreter_results as run_interpreted
from tests.helpers import print_interpreter_cases

CASES = {  # name: (tokens, q heads, kv heads, head dim, interleaved, dtype, cache: "same" | "fp8", padding rows)
    "qwen3_decode_t1": (1, 32, 4, 128, False, "fp32", "same", 0),
    "qwen3_t6_positions": (6, 32, 4, 128, False, "fp32", "same", 0),
    "qwen3_t5_interleaved": (5, 32, 4, 128, True, "fp32", "same", 0),
    "qwen3_padding_rows": (3, 32, 4, 128, False, "fp32", "same", 3),
    "odd_h5_kv1_d48": (7, 5, 1, 48, False, "fp32", "same", 0),
    "odd_interleaved": (4, 6, 3, 24, True, "fp32", "same", 2),
    "tp_replicated_kv": (3, 4, 1, 128, False, "fp32", "same", 0),  # tp 8 over Qwen3's 4 KV heads: 1 local
    "fp16_qwen3": (5, 32, 4, 128, False, "fp16", "same", 0),
    "fp16_interleaved": (4, 6, 2, 64, True, "fp16", "same", 1),
    "fp8_fp32": (6, 32, 4, 128, False, "fp32", "fp8", 2),
    "fp8_fp16": (5, 8, 2, 64, True, "fp16", "fp8", 0),
    "no_tokens": (0, 4, 2, 32, False, "fp32", "same", 0),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
FP8 = torch.float8_e4m3fn
NUM_BLOCKS, BLOCK = 6, 4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()


def _e4m3_steps(codes: torch.Tensor) -> torch.Tensor:
    """e4m3 codes (uint8, no NaN) as their signed step counts from zero, in value order: -0 and +0 are
    both 0, the smallest subnormals -1 and +1, so adjacent values are one apart across zero too (a
    tiny k may round to -0 one way and to -2^-9 the other)."""
    codes = codes.int()
    return torch.where(codes & 0x80 != 0, -(codes & 0x7F), codes)


def _inputs(tokens, heads, kv_heads, dim, dtype, cache_dtype, padding, device):
    """The merged projection's output split as GQAAttention splits it (strided views); padding rows
    (as CUDA graphs pad a decode batch: position 0, slot 0 of scratch block 0, the same input) last."""
    real = tokens
    tokens = real + padding
    width = (heads + 2 * kv_heads) * dim
    qkv = torch.randn(tokens, width + 8)  # 8 spare columns: a row stride no view could hide
    if padding:
        qkv[real:] = torch.randn(1, width + 8)
    qkv = qkv.to(dtype).to(device)
    q, k, v = qkv[:, :width].split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim)
    q_w = (1 + 0.3 * torch.randn(dim)).to(dtype).to(device)
    k_w = (1 + 0.3 * torch.randn(dim)).to(dtype).to(device)
    cos_sin = torch.randn(300, dim).to(device)
    positions = torch.cat((torch.randperm(300)[:real], torch.zeros(padding, dtype=torch.long))).to(device)
    slots = torch.cat((BLOCK + torch.randperm((NUM_BLOCKS - 1) * BLOCK)[:real],  # blocks 1.. for real tokens
                       torch.zeros(padding, dtype=torch.long))).to(device)
    cache = (torch.randn(2, NUM_BLOCKS, BLOCK, kv_heads, dim) * 3).to(dtype).to(cache_dtype).to(device)
    return q, k, v, q_w, k_w, positions, cos_sin, cache, slots


def case_errors(tokens, heads, kv_heads, dim, interleaved, dtype, cache_kind, padding, device="cpu") -> dict:
    from moeserve.kernels.gqa_cache import gqa_qkv_write_ref, gqa_qkv_write_triton

    cache_dtype = FP8 if cache_kind == "fp8" else dtype
    q, k, v, q_w, k_w, positions, cos_sin, cache, slots = _inputs(tokens, heads, kv_heads, dim, dtype, cache_dtype,
                                                                   padding, device)
    ref_cache = cache.clone()
    untouched = torch.ones(NUM_BLOCKS * BLOCK, dtype=torch.bool, device=device)
    untouched[slots] = False
    before = cache.view(torch.uint8).view(2, NUM_BLOCKS * BLOCK, -1)[:, untouched].clone()
    q_out = gqa_qkv_write_triton(q, k, v, q_w, k_w, 1e-6, positions, cos_sin, interleaved, cache[0], cache[1], slots)
    q_ref = gqa_qkv_write_ref(q, k, v, q_w, k_w, 1e-6, positions, cos_sin, interleaved, ref_cache[0], ref_cache[1],
                              slots)
    got, want = cache.view(torch.uint8), ref_cache.view(torch.uint8)
    out = {
        "q": _rel(q_out, q_ref) if q_out.shape == q_ref.shape and q_out.dtype == q_ref.dtype else float("inf"),
        "k": _rel(cache[0], ref_cache[0]),
        "v_bytes_differ": int((got[1] != want[1]).sum()),
        "untouched_bytes_changed": int((cache.view(torch.uint8).view(2, NUM_BLOCKS * BLOCK, -1)[:, untouched]
                                        != before).sum()),
    }
    if cache_kind == "fp8":  # k entries: equal, or one e4m3 step apart
        a, b = _e4m3_steps(got[0].flatten()), _e4m3_steps(want[0].flatten())
        differ = a != b
        out["k_fp8_far"] = int(((a - b).abs() > 1).sum())
        out["k_fp8_frac_differ"] = differ.float().mean().item()
    return out


def fp8_special_values(device="cpu") -> int:
    """v values across e4m3's range and past it (saturation at 480, inf, NaN, subnormals, the rounding
    across powers of two the interpreter's own cast gets wrong): cache bytes differing from the
    saturating conversion's (torch 2.13's; for an older torch, its bytes where |v| < 464 and the
    saturated code or a NaN code elsewhere)."""
    from moeserve.kernels.gqa_cache import gqa_qkv_write_triton

    special = [0.0, -0.0, 2.0**-10, 2.0**-9, 3 * 2.0**-10, 2.0**-7, 2.0**-6 * 0.99, 2.0**-6, 1.0625, 1.1875,
               15.9, 126.8, -126.8, 447.0, 448.0, 463.9, 464.0, 470.0, 479.9, 480.0, 1e6, float("inf"),
               -float("inf"), float("nan"), -float("nan"), 1e-30, -1e-30, 0.3, -0.7]
    v_vals = torch.cat((torch.tensor(special), torch.randn(64 - len(special)) * 100))
    v = v_vals.view(1, 2, 32).to(device)
    k, q = torch.randn(1, 2, 32, device=device), torch.randn(1, 2, 32, device=device)
    w, cos_sin = torch.ones(32, device=device), torch.randn(4, 32, device=device)
    cache = torch.zeros(2, 2, 4, 2, 32, device=device).to(FP8)
    slots, positions = torch.tensor([5], device=device), torch.tensor([1], device=device)
    gqa_qkv_write_triton(q, k, v, w, w, 1e-6, positions, cos_sin, False, cache[0], cache[1], slots)
    want = v[0].to(FP8).view(torch.uint8)
    got = cache[1].view(-1, 2, 32)[5].view(torch.uint8)
    big = v[0].abs() >= 464  # inf included; torch before 2.13 makes these NaN
    want = torch.where(big, torch.where(v[0] < 0, 0xFE, 0x7E).to(torch.uint8), want)
    nan = v[0].isnan()  # a NaN code of either sign
    return int(((got != want) & ~(nan & ((got & 0x7F) == 0x7F))).sum())


def _interpreter_cases() -> dict:
    out = {name: case_errors(*args[:5], DTYPES[args[5]], *args[6:]) for name, args in CASES.items()}
    out["fp8_special_values"] = fp8_special_values()
    return out


def check(name: str, errs: dict, dtype: torch.dtype) -> None:
    tol = TOL[dtype]
    assert errs["q"] <= tol, f"{name}: q rel error {errs['q']} > {tol}"
    assert errs["v_bytes_differ"] == 0, f"{name}: V cache differs from the reference in {errs['v_bytes_differ']} bytes"
    assert errs["untouched_bytes_changed"] == 0, f"{name}: cache entries outside the slots changed"
    if "k_fp8_far" in errs and dtype == torch.bfloat16:  # the GPU's bf16 rounding: a tolerance, as for MLA
        assert errs["k"] <= 1e-2 and errs["k_fp8_frac_differ"] <= 0.02, f"{name}: FP8 K cache {errs}"
    elif "k_fp8_far" in errs:
        assert errs["k_fp8_far"] == 0, f"{name}: {errs['k_fp8_far']} FP8 K entries more than one e4m3 step off"
        assert errs["k_fp8_frac_differ"] <= 0.02, f"{name}: {errs['k_fp8_frac_differ']:.3f} of FP8 K entries differ"
    else:
        assert errs["k"] <= tol, f"{name}: K cache rel error {errs['k']} > {tol}"


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreted(__file__, timeout_s=300)


@pytest.mark.parametrize("case", list(CASES))
def test_fused_prologue_matches_reference(interpreter_results, case):
    check(f"{case} (seed {interpreter_results['seed']})", interpreter_results[case], DTYPES[CASES[case][5]])


def test_fp8_cache_conversion_is_torchs_bit_for_bit(interpreter_results):
    assert interpreter_results["fp8_special_values"] == 0


def test_cpu_dispatch_is_the_reference():
    """Plain CPU (no interpreter): the dispatch is the torch reference, bit for bit, FP8 cache included."""
    from moeserve.kernels.gqa_cache import gqa_qkv_write, gqa_qkv_write_ref

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter set for the whole run")
    for cache_dtype in (torch.float32, FP8):
        q, k, v, q_w, k_w, positions, cos_sin, cache, slots = _inputs(3, 4, 2, 16, torch.float32, cache_dtype, 1,
                                                                       "cpu")
        ref_cache = cache.clone()
        q_out = gqa_qkv_write(q, k, v, q_w, k_w, 1e-6, positions, cos_sin, False, cache[0], cache[1], slots)
        q_ref = gqa_qkv_write_ref(q, k, v, q_w, k_w, 1e-6, positions, cos_sin, False, ref_cache[0], ref_cache[1],
                                  slots)
        assert torch.equal(q_out, q_ref)
        assert torch.equal(cache.view(torch.uint8), ref_cache.view(torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("case", list(CASES))
def test_fused_prologue_on_gpu_bf16(case):
    args = CASES[case]
    check(case, case_errors(*args[:5], torch.bfloat16, *args[6:], device="cuda"), torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fp8_cache_conversion_on_gpu():
    assert fp8_special_values("cuda") == 0


if __name__ == "__main__":
    print_interpreter_cases(_interpreter_cases)
