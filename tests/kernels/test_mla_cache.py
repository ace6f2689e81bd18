"""MLA's fused cache write (latent RMSNorm + rope key rotation + store at the slot, and the query's
rope part rotated in the same launch) against its torch reference: under the Triton interpreter on
CPU (fp32/fp16, in a child process: TRITON_INTERPRET=1 must be set before triton is imported) and
on a GPU in bf16 (skipped without one). Fresh random inputs every run; the whole cache is compared,
so entries the step must not touch stay as they were.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO
from tests.helpers import interpreter_results as run_interpreted
from tests.helpers import print_interpreter_cases

CASES = {  # name: (tokens, kv_lora_rank, rope_dim, q columns before kv_a in the GEMM output, query heads
    #                 (0: no q_pe given), interleaved, dtype)
    "v2lite_decode_t1": (1, 512, 64, 3072, 16, True, "fp32"),
    "v3_t9_interleaved": (9, 512, 64, 1536, 128, True, "fp32"),
    "v3_tp8_t3": (3, 512, 64, 1536, 16, True, "fp32"),
    "neox_t5": (5, 96, 32, 40, 3, False, "fp32"),
    "no_q_t4": (4, 96, 32, 40, 0, True, "fp32"),
    "fp16_t7": (7, 128, 32, 64, 5, True, "fp16"),
    "no_tokens": (0, 64, 16, 8, 2, True, "fp32"),
    # an e4m3 cache (--kv-cache-dtype fp8): each entry rounded to the activations' dtype, then cast
    "fp8_cache_fp16_t6": (6, 128, 32, 64, 4, True, "fp16+fp8"),
    "fp8_cache_fp32_v2lite_t3": (3, 512, 64, 3072, 16, True, "fp32+fp8"),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# An FP8 cache: one e4m3 step is 6-12% of a value, so a last-bit difference before the cast (the
# kernel's fp32 math against the reference's) moves a few entries by that much.
FP8_CACHE_TOL = 1e-2


def case_dtypes(name: str) -> tuple[torch.dtype, torch.dtype | None, float]:
    """(activation dtype, cache dtype (None: the same), tolerance) of a case."""
    act, _, cache = CASES[name][-1].partition("+")
    return DTYPES[act], (torch.float8_e4m3fn if cache else None), (FP8_CACHE_TOL if cache else TOL[DTYPES[act]])


def cache_err(tokens, rank, rope, q_cols, heads, interleaved, dtype, device="cpu", cache_dtype=None) -> float:
    """The larger of the cache's and the rotated query's relative errors."""
    from moeserve.kernels.mla_cache import mla_kv_write_ref, mla_kv_write_triton

    num_blocks, block = 6, 4
    gemm_out = torch.randn(tokens, q_cols + rank + rope).to(dtype).to(device)
    kv_a = gemm_out[:, q_cols:]  # a strided view, as the merged GEMM's split gives it
    weight = (1 + 0.3 * torch.randn(rank)).to(dtype).to(device)
    cos_sin = torch.randn(300, rope).to(device)
    positions = torch.randint(0, 300, (tokens,)).to(device)
    slots = torch.randperm(num_blocks * block)[:tokens].to(device)
    cache = torch.randn(num_blocks, block, rank + rope).to(cache_dtype or dtype).to(device)
    ref = cache.clone()
    # the query as the layer has it: [T, H, nope + rope], its rope part a strided view
    q_pe = torch.randn(tokens, heads, 8 + rope).to(dtype).to(device)[..., 8:] if heads else None
    q_out = mla_kv_write_triton(kv_a, weight, 1e-6, positions, cos_sin, interleaved, cache, slots, q_pe)
    q_ref = mla_kv_write_ref(kv_a, weight, 1e-6, positions, cos_sin, interleaved, ref, slots, q_pe)
    err = ((cache.float() - ref.float()).norm() / ref.float().norm()).item()
    if q_pe is None:
        assert q_out is None and q_ref is None
        return err
    assert q_out.shape == q_pe.shape and q_out.is_contiguous()
    return max(err, ((q_out.float() - q_ref.float()).norm() / q_ref.float().norm().clamp(min=1e-30)).item())


def _interpreter_cases() -> dict:
    return {name: cache_err(*args[:-1], case_dtypes(name)[0], cache_dtype=case_dtypes(name)[1])
            for name, args in CASES.items()}


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", list(CASES))
def test_fused_cache_write_matches_reference(interpreter_results, case):
    err, tol = interpreter_results[case], case_dtypes(case)[2]
    assert err <= tol, f"{case}: rel error {err} > {tol} (seed {interpreter_results['seed']})"


def test_cpu_dispatch_is_the_reference():
    from moeserve.kernels.mla_cache import mla_kv_write, mla_kv_write_ref

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter set for the whole run")
    kv_a, weight, cos_sin = torch.randn(3, 24), torch.randn(16), torch.randn(10, 8)
    positions, slots = torch.tensor([1, 5, 9]), torch.tensor([7, 0, 3])
    q_pe = torch.randn(3, 2, 8)
    caches = [torch.zeros(2, 4, 24), torch.zeros(2, 4, 24)]
    q_out = mla_kv_write(kv_a, weight, 1e-6, positions, cos_sin, True, caches[0], slots, q_pe)
    q_ref = mla_kv_write_ref(kv_a, weight, 1e-6, positions, cos_sin, True, caches[1], slots, q_pe)
    assert torch.equal(*caches) and torch.equal(q_out, q_ref)


def test_mla_layer_bench_smoke(tmp_path):
    """benchmarks/kernel_bench_mla_layer.py --smoke: the fused rope, the per-head matrix-vector kernel and
    the chunked argmax agree with the launches they replace (tiny shapes, CPU, interpreter)."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "kernel_bench_mla_layer.py"), "--smoke",
                           "--batches", "1,9", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "kernels_mla_layer.json").read_text())["rows"]
    assert {(r["model"], r["batch"], r["piece"]) for r in rows} == {
        (m, b, p) for m in ("V2-Lite", "V3") for b in (1, 9) for p in ("rope", "absorb", "value", "argmax")}
    assert all(r["ok"] and r["old_us"] > 0 and r["new_us"] > 0 for r in rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("case", list(CASES))
def test_fused_cache_write_on_gpu_bf16(case):
    cache_dtype = case_dtypes(case)[1]
    assert cache_err(*CASES[case][:-1], torch.bfloat16, "cuda", cache_dtype) <= (FP8_CACHE_TOL if cache_dtype
                                                                                 else TOL[torch.bfloat16])


if __name__ == "__main__":
    print_interpreter_cases(_interpreter_cases)
