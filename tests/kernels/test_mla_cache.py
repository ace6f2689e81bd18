"""MLA's fused cache write (latent RMSNorm + rope key rotation + store at the slot) against its torch
reference: under the Triton interpreter on CPU (fp32/fp16, in a child process: TRITON_INTERPRET=1
must be set before triton is imported) and on a GPU in bf16 (skipped without one). Fresh random
inputs every run; the whole cache is compared, so entries the step must not touch stay as they were.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import interpreter_results as run_interpreted
from tests.helpers import print_interpreter_cases

CASES = {  # name: (tokens, kv_lora_rank, rope_dim, q columns before kv_a in the GEMM output, interleaved, dtype)
    "v2lite_decode_t1": (1, 512, 64, 3072, True, "fp32"),
    "v3_t9_interleaved": (9, 512, 64, 1536, True, "fp32"),
    "neox_t5": (5, 96, 32, 40, False, "fp32"),
    "fp16_t7": (7, 128, 32, 64, True, "fp16"),
    "no_tokens": (0, 64, 16, 8, True, "fp32"),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def cache_err(tokens, rank, rope, q_cols, interleaved, dtype, device="cpu") -> float:
    from moeserve.kernels.mla_cache import mla_kv_write_ref, mla_kv_write_triton

    num_blocks, block = 6, 4
    gemm_out = torch.randn(tokens, q_cols + rank + rope).to(dtype).to(device)
    kv_a = gemm_out[:, q_cols:]  # a strided view, as the merged GEMM's split gives it
    weight = (1 + 0.3 * torch.randn(rank)).to(dtype).to(device)
    cos_sin = torch.randn(300, rope).to(device)
    positions = torch.randint(0, 300, (tokens,)).to(device)
    slots = torch.randperm(num_blocks * block)[:tokens].to(device)
    cache = torch.randn(num_blocks, block, rank + rope).to(dtype).to(device)
    ref = cache.clone()
    mla_kv_write_triton(kv_a, weight, 1e-6, positions, cos_sin, interleaved, cache, slots)
    mla_kv_write_ref(kv_a, weight, 1e-6, positions, cos_sin, interleaved, ref, slots)
    return ((cache.float() - ref.float()).norm() / ref.float().norm()).item()


def _interpreter_cases() -> dict:
    return {name: cache_err(*args[:-1], DTYPES[args[-1]]) for name, args in CASES.items()}


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", list(CASES))
def test_fused_cache_write_matches_reference(interpreter_results, case):
    err, tol = interpreter_results[case], TOL[DTYPES[CASES[case][-1]]]
    assert err <= tol, f"{case}: rel error {err} > {tol} (seed {interpreter_results['seed']})"


def test_cpu_dispatch_is_the_reference():
    from moeserve.kernels.mla_cache import mla_kv_write, mla_kv_write_ref

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter set for the whole run")
    kv_a, weight, cos_sin = torch.randn(3, 24), torch.randn(16), torch.randn(10, 8)
    positions, slots = torch.tensor([1, 5, 9]), torch.tensor([7, 0, 3])
    caches = [torch.zeros(2, 4, 24), torch.zeros(2, 4, 24)]
    mla_kv_write(kv_a, weight, 1e-6, positions, cos_sin, True, caches[0], slots)
    mla_kv_write_ref(kv_a, weight, 1e-6, positions, cos_sin, True, caches[1], slots)
    assert torch.equal(*caches)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("case", list(CASES))
def test_fused_cache_write_on_gpu_bf16(case):
    assert cache_err(*CASES[case][:-1], torch.bfloat16, "cuda") <= TOL[torch.bfloat16]


if __name__ == "__main__":
    print_interpreter_cases(_interpreter_cases)
