"""MLA decode's per-head matrix-vector products (kernels/head_matvec.py) against the cuBLAS reference:
under the Triton interpreter on CPU (fp32/fp16, in a child process: TRITON_INTERPRET=1 must be set
before triton is imported) and on a GPU in bf16 (skipped without one). Fresh random inputs every run.
Both uses: the query's absorb (W [H, K, N]) from a strided view of q, and the value projection (W
stored [H, N, K]) written into rows of a caller's buffer whose other rows must stay."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import interpreter_results as run_interpreted
from tests.helpers import print_interpreter_cases

CASES = {  # name: (batch, heads, K, N, w stored transposed, tiles (None: the defaults), dtype)
    "absorb_v2lite_b1": (1, 16, 128, 512, False, None, "fp32"),
    "value_v2lite_b1": (1, 16, 512, 128, True, None, "fp32"),
    "absorb_b16": (16, 4, 128, 512, False, None, "fp32"),
    "value_b20_two_row_blocks": (20, 3, 96, 48, True, None, "fp32"),
    "absorb_odd_sizes_b3": (3, 5, 40, 72, False, None, "fp16"),
    "value_fp16_b7": (7, 16, 512, 128, True, None, "fp16"),
    "absorb_one_row_a_program": (5, 4, 128, 512, False, (1, 64, 128), "fp32"),
    "value_one_row_a_program": (5, 4, 512, 128, True, (1, 256, 32), "fp16"),
    "no_rows": (0, 16, 128, 512, False, None, "fp32"),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def matvec_err(batch, heads, k, n, transposed, tiles, dtype, device="cpu") -> float:
    from moeserve.kernels.head_matvec import head_matvec_ref, head_matvec_triton

    x = torch.randn(batch, heads, k + 8, device=device).to(dtype)[..., :k]  # a view, as q_nope is
    w = (torch.randn(heads, n, k) if transposed else torch.randn(heads, k, n)).mul(k ** -0.5).to(dtype).to(device)
    buf = torch.full((batch + 2, heads, n), 7.0, dtype=dtype, device=device)
    out = head_matvec_triton(x, w, transposed, out=buf[1:-1], tiles=tiles)
    ref = head_matvec_ref(x.float(), w.float(), transposed)
    assert (buf[0] == 7).all() and (buf[-1] == 7).all() and out.shape == (batch, heads, n)
    if batch == 0:
        return 0.0
    assert out.data_ptr() == buf[1].data_ptr()
    return ((out.float() - ref).norm() / ref.norm()).item()


def _interpreter_cases() -> dict:
    return {name: matvec_err(*args[:-1], DTYPES[args[-1]]) for name, args in CASES.items()}


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", list(CASES))
def test_head_matvec_matches_reference(interpreter_results, case):
    err, tol = interpreter_results[case], TOL[DTYPES[CASES[case][-1]]]
    assert err <= tol, f"{case}: rel error {err} > {tol} (seed {interpreter_results['seed']})"


def test_large_batches_take_cublas():
    """Above HEAD_MATVEC_MAX_BATCH (a CUDA-graph size) the dispatcher is the reference; below it on plain
    CPU too (no interpreter), so the layer's CPU path is unchanged."""
    from moeserve.kernels.head_matvec import HEAD_MATVEC_MAX_BATCH, head_matvec, head_matvec_ref

    w = torch.randn(4, 8, 16)
    for batch in (1, HEAD_MATVEC_MAX_BATCH + 1):
        x = torch.randn(batch, 4, 8)
        assert torch.equal(head_matvec(x, w), head_matvec_ref(x, w))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_dispatch_by_batch_and_weight_size(monkeypatch):
    """On a GPU: the kernel for V2-Lite's 2 MB weights up to batch 16, cuBLAS for V3's 16 MB and past 16."""
    from moeserve.kernels import head_matvec as hm

    calls = []
    monkeypatch.setattr(hm, "head_matvec_triton", lambda *a, **k: calls.append("triton"))
    monkeypatch.setattr(hm, "head_matvec_ref", lambda *a, **k: calls.append("cublas"))
    for batch, heads in ((1, 16), (16, 16), (17, 16), (1, 128)):
        hm.head_matvec(torch.randn(batch, heads, 128, device="cuda", dtype=torch.bfloat16),
                       torch.randn(heads, 128, 512, device="cuda", dtype=torch.bfloat16))
    assert calls == ["triton", "triton", "cublas", "cublas"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("case", list(CASES))
def test_head_matvec_on_gpu_bf16(case):
    assert matvec_err(*CASES[case][:-1], torch.bfloat16, "cuda") <= TOL[torch.bfloat16]


if __name__ == "__main__":
    print_interpreter_cases(_interpreter_cases)
