"""The router-logits kernel (kernels/router_gemm.py) against cast + F.linear in fp32.

On CPU the kernel runs under the interpreter in a child process (fp32 and fp16 activations; bf16 is
wrong there); on a GPU (skipped without one) in bf16 too, at the decode batch sizes it serves.
Fresh random inputs every run (the seed is reported on failure). The kernel sums in another order
than the reference, so logits agree to fp32 rounding (relative error < 1e-6), and the experts a
routing picks from them are the same.
"""

from __future__ import annotations

import os

import pytest
import torch

from moeserve.kernels.routing import RoutingConfig, select_experts_ref
from tests.helpers import interpreter_results as run_interpreted
from tests.helpers import print_interpreter_cases

CASES = {  # name: (tokens, experts, hidden, activation dtype under the interpreter)
    "v2lite_b1": (1, 64, 2048, "fp32"),
    "v2lite_b16_fp16": (16, 64, 512, "fp16"),
    "ragged_hidden": (5, 6, 100, "fp32"),
    "odd_experts_b33": (33, 160, 384, "fp32"),  # two token blocks, a partial expert block
    "no_tokens": (0, 64, 256, "fp32"),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MAX_ERR = 1e-6


def logits_err(tokens, experts, hidden, dtype, device="cpu") -> tuple[float, int]:
    """(relative error of the kernel's logits, rows whose top-6 experts differ from the reference's)."""
    from moeserve.kernels.router_gemm import router_logits, router_logits_ref

    x = torch.randn(tokens, hidden, device=device).to(dtype)
    w = torch.randn(experts, hidden, device=device) / hidden ** 0.5
    got, ref = router_logits(x, w), router_logits_ref(x, w)
    assert got.dtype == torch.float32 and got.shape == (tokens, experts)
    if tokens == 0:
        return 0.0, 0
    err = ((got - ref).norm() / ref.norm()).item()
    cfg = RoutingConfig(top_k=min(6, experts))
    ids, ref_ids = select_experts_ref(got, cfg)[1], select_experts_ref(ref, cfg)[1]
    return err, int((ids.sort(1).values != ref_ids.sort(1).values).any(1).sum())


def _interpreter_cases() -> dict:
    return {name: logits_err(t, e, h, DTYPES[d]) for name, (t, e, h, d) in CASES.items()}


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", list(CASES))
def test_router_kernel_matches_reference(interpreter_results, case):
    err, bad_rows = interpreter_results[case]
    seed = interpreter_results["seed"]
    assert err < MAX_ERR, f"{case}: relative error {err} (seed {seed})"
    assert bad_rows == 0, f"{case}: {bad_rows} rows route to other experts (seed {seed})"


def test_cpu_without_interpreter_uses_the_reference():
    from moeserve.kernels.router_gemm import router_logits, router_logits_ref

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter set for the whole run")
    x, w = torch.randn(3, 32, dtype=torch.bfloat16), torch.randn(8, 32)
    assert torch.equal(router_logits(x, w), router_logits_ref(x, w))


def test_kernel_serves_decode_batches_only():
    from moeserve.kernels.router_gemm import kernel_serves

    v2_lite, v3 = 64 * 2048 * 4, 256 * 7168 * 4
    assert all(kernel_serves(t, v2_lite) for t in (1, 8, 16, 64))
    assert kernel_serves(16, v3) and not kernel_serves(64, v3)  # 16 re-reads of V3's 7.3 MB: cuBLAS wins
    assert not kernel_serves(65, v2_lite)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@cuda
@pytest.mark.parametrize("tokens", [1, 8, 64])
@pytest.mark.parametrize("experts,hidden", [(64, 2048), (256, 7168)])
def test_router_kernel_on_gpu_bf16(tokens, experts, hidden):
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference in full fp32, as transformers runs it
    err, bad_rows = logits_err(tokens, experts, hidden, torch.bfloat16, "cuda")
    assert err < MAX_ERR and bad_rows == 0, (err, bad_rows)


if __name__ == "__main__":
    print_interpreter_cases(_interpreter_cases)
