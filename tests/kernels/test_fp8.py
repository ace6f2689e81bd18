"""FP8 block quantization and the W8A8 block-scaled GEMM: Triton kernels against the torch
references on CPU. The Triton cases run under the interpreter (TRITON_INTERPRET=1) in a child
process (see test_fused_moe.py for why); fp32/fp16 activations only, bf16 is wrong there."""

from __future__ import annotations


import pytest
import torch

from moeserve.kernels.fp8 import (FP8_MAX, block_fp8_matmul, block_fp8_matmul_ref, dequant_block_fp8_ref,
                                  per_token_group_quant_fp8_ref, quant_block_fp8_ref)
from tests.helpers import interpreter_results as run_interpreted
from tests.helpers import print_interpreter_cases



def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()


def _interpreter_cases() -> dict[str, tuple[float, float]]:
    """name -> (error, tolerance); quantization must match bit for bit."""
    from moeserve.kernels.fp8 import block_fp8_matmul_triton, per_token_group_quant_fp8_triton

    results = {}
    for name, (m, k, group, dtype, spread) in {
        "quant_fp32": (5, 96, 32, torch.float32, 3.0),
        "quant_fp16_ragged_k": (3, 80, 32, torch.float16, 1.0),  # last group of 16 columns
        "quant_one_row_wide_range": (1, 256, 128, torch.float32, 1e4),
    }.items():
        x = (torch.randn(m, k) * spread * torch.rand(m, 1)).to(dtype)
        if name == "quant_one_row_wide_range":  # magnitudes over 6 decades: subnormals, signed zeros
            x = x * 10.0 ** -torch.randint(0, 7, (m, k))
        q, s = per_token_group_quant_fp8_triton(x, group)
        q_ref, s_ref = per_token_group_quant_fp8_ref(x, group)
        bad = int((q.view(torch.uint8) != q_ref.view(torch.uint8)).sum()) + int((s != s_ref).sum())
        results[name] = (float(bad), 0.0)

    for name, (m, n, k, block, dtype, tol) in {
        "gemm_fp32": (7, 48, 96, (32, 32), torch.float32, 1e-5),
        "gemm_fp16_ragged": (19, 40, 80, (32, 32), torch.float16, 2e-3),  # N, K not multiples of the block
        "gemm_M1_block_16x64": (1, 32, 128, (16, 64), torch.float32, 1e-5),
    }.items():
        x = torch.randn(m, k).to(dtype)
        w, ws = quant_block_fp8_ref(torch.randn(n, k), block)
        results[name] = (rel_err(block_fp8_matmul(x, w, ws, block), block_fp8_matmul_ref(x, w, ws, block)), tol)
    x = torch.randn(20, 64)
    w, ws = quant_block_fp8_ref(torch.randn(48, 64), (32, 32))
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_SIZE_M=2, num_warps=4, num_stages=1)
    results["gemm_grouped_order"] = (rel_err(block_fp8_matmul_triton(x, w, ws, (32, 32), cfg),
                                             block_fp8_matmul_ref(x, w, ws, (32, 32))), 1e-5)
    x_strided = torch.randn(6, 128)[:, :64]  # rows with a stride wider than the row
    results["gemm_strided_x"] = (rel_err(block_fp8_matmul(x_strided, w, ws, (32, 32)),
                                         block_fp8_matmul_ref(x_strided, w, ws, (32, 32))), 1e-5)
    # x's quantization handed in (as the RMSNorm before makes it): the same bits out as the separate
    # quant launch, also under a fused-quant config (which must then not quantize the given e4m3 again)
    x = torch.randn(5, 64)
    x_fp8 = per_token_group_quant_fp8_triton(x, 32)
    apart = block_fp8_matmul_triton(x, w, ws, (32, 32), cfg)
    for name, given_cfg in (("gemm_x_fp8_given", cfg), ("gemm_x_fp8_given_fuse_cfg", dict(cfg, FUSE_QUANT=True))):
        given = block_fp8_matmul_triton(x, w, ws, (32, 32), given_cfg, x_fp8=x_fp8)
        results[name] = (float((given != apart).sum()), 0.0)
    return results


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreted(__file__)


CASES = ["quant_fp32", "quant_fp16_ragged_k", "quant_one_row_wide_range", "gemm_fp32", "gemm_fp16_ragged",
         "gemm_M1_block_16x64", "gemm_grouped_order", "gemm_strided_x", "gemm_x_fp8_given", "gemm_x_fp8_given_fuse_cfg"]


@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference(interpreter_results, case):
    err, tol = interpreter_results[case]
    assert err <= tol, f"{case}: error {err} > {tol} (seed {interpreter_results['seed']})"


# ---- plain CPU: the references ---------------------------------------------------------------

def test_block_quant_roundtrip():
    w = torch.randn(200, 300)  # not multiples of 128: the last blocks are partial
    q, s = quant_block_fp8_ref(w)
    assert s.shape == (2, 3)
    assert rel_err(dequant_block_fp8_ref(q, s), w) < 4e-2  # e4m3 keeps 3 mantissa bits
    assert q.float().abs().amax() <= FP8_MAX


def test_group_quant_scale_is_group_amax():
    x = torch.randn(4, 256)
    q, s = per_token_group_quant_fp8_ref(x, 128)
    amax = x.view(4, 2, 128).abs().amax(-1)
    assert torch.allclose(s * FP8_MAX, amax)
    # the largest element of each group lands on the top of e4m3's range
    assert torch.equal(q.float().view(4, 2, 128).abs().amax(-1), torch.full((4, 2), FP8_MAX))


def test_dispatch_on_cpu():
    x = torch.randn(3, 128)
    w, ws = quant_block_fp8_ref(torch.randn(64, 128))
    ref = block_fp8_matmul_ref(x, w, ws)
    assert rel_err(block_fp8_matmul(x, w, ws), ref) < 1e-5
    assert rel_err(ref, x @ dequant_block_fp8_ref(w, ws).t()) < 4e-2  # activation quantization alone


def test_no_rows():
    """An empty batch (a tensor-parallel share with no rows, an idle rank) is a valid input."""
    w, ws = quant_block_fp8_ref(torch.randn(64, 200))
    q, s = per_token_group_quant_fp8_ref(torch.randn(0, 200), 128)
    assert q.shape == (0, 200) and s.shape == (0, 2)
    assert block_fp8_matmul(torch.randn(0, 200), w, ws).shape == (0, 64)


if __name__ == "__main__":
    print_interpreter_cases(_interpreter_cases)
