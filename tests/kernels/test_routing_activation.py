"""The fused MoE routing kernel and the SiLU-and-mul kernel against their torch references.

On CPU the Triton kernels run under the interpreter in a child process (TRITON_INTERPRET=1 must be
set before triton is imported), in fp32/fp16; on a GPU (skipped without one) they run in the
serving dtypes (bf16 activations, fp32 or bf16 router logits). Inputs are fresh random tensors every
run (the seed is reported on failure). Routing must pick exactly the reference's experts (inputs
are drawn without ties) with weights within 1e-6, and with fused shared experts both must end every
row with the shared slots' ids E..E+S-1 and weight exactly 1.0; SiLU-and-mul is within rounding of
the reference.
"""

from __future__ import annotations

import os

import pytest
import torch

from moeserve.kernels.routing import RoutingConfig
from tests.helpers import interpreter_results as run_interpreted
from tests.helpers import print_interpreter_cases

ROUTING_CASES = {  # name: (tokens, experts, RoutingConfig kwargs, bias?, logits dtype under the interpreter)
    "v2lite_softmax_greedy": (33, 64, dict(top_k=6), False, "fp32"),
    "v2_group_limited_160": (17, 160, dict(top_k=6, topk_method="group_limited_greedy", n_group=8, topk_group=3,
                                           routed_scaling_factor=16.0), False, "fp32"),
    "v3_noaux_tc_256": (19, 256, dict(top_k=8, scoring="sigmoid", topk_method="noaux_tc", n_group=8, topk_group=4,
                                      norm_topk_prob=True, routed_scaling_factor=2.5), True, "fp32"),
    "v3_tiny_16": (9, 16, dict(top_k=4, scoring="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2,
                               norm_topk_prob=True, routed_scaling_factor=2.5), True, "fp32"),
    "v3_ungrouped_sigmoid": (5, 48, dict(top_k=3, scoring="sigmoid", topk_method="noaux_tc", n_group=1,
                                         norm_topk_prob=True), True, "fp32"),
    "qwen3_renorm_fp16_logits": (12, 128, dict(top_k=8, norm_topk_prob=True), False, "fp16"),
    "top1_of_8": (4, 8, dict(top_k=1), False, "fp32"),
    "no_tokens": (0, 64, dict(top_k=6), False, "fp32"),
    # shared experts fused into the MoE pass: S trailing columns (k + S: 8 and 9, a padded K tile)
    "v2lite_2_shared": (33, 64, dict(top_k=6, num_fused_shared=2), False, "fp32"),
    "v2_group_limited_2_shared": (17, 160, dict(top_k=6, topk_method="group_limited_greedy", n_group=8,
                                                topk_group=3, routed_scaling_factor=16.0, num_fused_shared=2),
                                  False, "fp32"),
    "v3_noaux_tc_1_shared": (19, 256, dict(top_k=8, scoring="sigmoid", topk_method="noaux_tc", n_group=8,
                                           topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5,
                                           num_fused_shared=1), True, "fp32"),
    "no_tokens_shared": (0, 64, dict(top_k=6, num_fused_shared=2), False, "fp32"),
}

SILU_CASES = {  # name: (rows, n, up_offset, dtype under the interpreter)
    "shared_expert_2816": (3, 1408, 1408, "fp32"),
    "dense_fp8_padded_gate": (2, 10944, 11008, "fp32"),  # gate padded to the 128-row weight block
    "odd_width": (5, 100, 100, "fp16"),
    "no_rows": (0, 64, 64, "fp32"),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SILU_TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def distinct_logits(tokens: int, experts: int, dtype: torch.dtype) -> torch.Tensor:
    """Per row a permutation of distinct values exactly representable in `dtype` (no ties)."""
    if dtype == torch.float32:
        return torch.randn(tokens, experts)
    rows = [torch.randperm(experts).float() / 32 - experts / 64 for _ in range(tokens)]
    return (torch.stack(rows) if rows else torch.empty(0, experts)).to(dtype)


def routing_mismatch(tokens, experts, kwargs, bias, dtype, device="cpu") -> tuple[float, float, float]:
    """(rows whose expert sets differ, max |weight difference| / max(1, scale), rows whose fused
    shared-expert columns are not exactly ids E..E+S-1 with weight 1.0 in the kernel's output or
    the reference's) vs the reference."""
    from moeserve.kernels.routing import select_experts_ref, select_experts_triton

    cfg = RoutingConfig(**kwargs)
    logits = distinct_logits(tokens, experts, dtype).to(device)
    correction = (0.1 * torch.randn(experts)).to(device) if bias else None
    w, ids = select_experts_triton(logits, cfg, correction)
    w_ref, ids_ref = select_experts_ref(logits, cfg, correction)
    width = cfg.top_k + cfg.num_fused_shared
    assert w.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == w.shape == (tokens, width)
    assert ids_ref.shape == w_ref.shape == (tokens, width)
    if tokens == 0:
        return 0.0, 0.0, 0.0
    shared_ids = torch.arange(experts, experts + cfg.num_fused_shared, device=device)
    bad_shared = torch.zeros(tokens, dtype=torch.bool, device=device)
    for got_w, got_ids in ((w, ids), (w_ref, ids_ref)):
        bad_shared |= (got_ids[:, cfg.top_k:] != shared_ids).any(dim=1) | (got_w[:, cfg.top_k:] != 1.0).any(dim=1)
        assert bool((got_ids[:, :cfg.top_k] < experts).all())  # the routed columns stay routed
    ids, order = ids.sort(dim=1)
    ids_ref, order_ref = ids_ref.sort(dim=1)
    w, w_ref = w.gather(1, order), w_ref.gather(1, order_ref)
    bad_rows = float((ids != ids_ref).any(dim=1).sum())
    return (bad_rows, ((w - w_ref).abs().max() / max(1.0, cfg.routed_scaling_factor)).item(),
            float(bad_shared.sum()))


def silu_err(rows, n, up_offset, dtype, device="cpu") -> float:
    from moeserve.kernels.activation import silu_and_mul_ref, silu_and_mul_triton

    y = (2 * torch.randn(rows, up_offset + n + 7)).to(dtype).to(device)[:, : up_offset + n]  # a strided view
    out, ref = silu_and_mul_triton(y, n, up_offset), silu_and_mul_ref(y, n, up_offset)
    assert out.shape == ref.shape == (rows, n) and out.dtype == ref.dtype
    if rows == 0:
        return 0.0
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _interpreter_cases() -> dict:
    results = {}
    for name, (tokens, experts, kwargs, bias, dtype) in ROUTING_CASES.items():
        results["routing_" + name] = routing_mismatch(tokens, experts, kwargs, bias, DTYPES[dtype])
    for name, (rows, n, up_offset, dtype) in SILU_CASES.items():
        results["silu_" + name] = silu_err(rows, n, up_offset, DTYPES[dtype])
    return results


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", list(ROUTING_CASES))
def test_routing_kernel_matches_reference(interpreter_results, case):
    bad_rows, w_err, bad_shared = interpreter_results["routing_" + case]
    seed = interpreter_results["seed"]
    assert bad_rows == 0, f"{case}: {bad_rows} rows with other experts (seed {seed})"
    assert w_err <= 1e-6, f"{case}: weights off by {w_err} (seed {seed})"
    assert bad_shared == 0, f"{case}: {bad_shared} rows with wrong shared-expert columns (seed {seed})"


@pytest.mark.parametrize("case", list(SILU_CASES))
def test_silu_and_mul_kernel_matches_reference(interpreter_results, case):
    err = interpreter_results["silu_" + case]
    tol = SILU_TOL[DTYPES[SILU_CASES[case][3]]]
    assert err <= tol, f"{case}: rel error {err} > {tol} (seed {interpreter_results['seed']})"


def test_cpu_without_interpreter_uses_the_references():
    """The public names fall back to the references on plain CPU (and give the same experts)."""
    from moeserve.kernels.activation import silu_and_mul, silu_and_mul_ref
    from moeserve.kernels.routing import select_experts, select_experts_ref

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter set for the whole run")
    cfg = RoutingConfig(top_k=2)
    logits = torch.randn(3, 8)
    assert all(torch.equal(a, b) for a, b in zip(select_experts(logits, cfg), select_experts_ref(logits, cfg)))
    # fused shared experts: the same routed columns, then the shared slots
    w, ids = select_experts(logits, RoutingConfig(top_k=2, routed_scaling_factor=2.0, num_fused_shared=2))
    w_plain, ids_plain = select_experts_ref(logits, RoutingConfig(top_k=2, routed_scaling_factor=2.0))
    assert torch.equal(ids[:, :2], ids_plain) and torch.equal(w[:, :2], w_plain)
    assert torch.equal(ids[:, 2:], torch.tensor([[8, 9]] * 3)) and torch.equal(w[:, 2:], torch.ones(3, 2))
    y = torch.randn(2, 12)
    assert torch.equal(silu_and_mul(y, 6), silu_and_mul_ref(y, 6, 6))


# ---- GPU: bf16 activations, fp32 (DeepSeek) and bf16 (Qwen3) router logits ------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@cuda
@pytest.mark.parametrize("case", list(ROUTING_CASES))
def test_routing_kernel_on_gpu(case):
    tokens, experts, kwargs, bias, dtype = ROUTING_CASES[case]
    logits_dtype = torch.bfloat16 if dtype == "fp16" else torch.float32  # Qwen3's gate runs in bf16
    bad_rows, w_err, bad_shared = routing_mismatch(tokens, experts, kwargs, bias, logits_dtype, "cuda")
    assert bad_rows == 0 and w_err <= 1e-6 and bad_shared == 0, (bad_rows, w_err, bad_shared)


@cuda
@pytest.mark.parametrize("case", list(SILU_CASES))
def test_silu_and_mul_kernel_on_gpu_bf16(case):
    rows, n, up_offset, _ = SILU_CASES[case]
    for r in (rows, 64 * rows):
        assert silu_err(r, n, up_offset, torch.bfloat16, "cuda") <= SILU_TOL[torch.bfloat16]


if __name__ == "__main__":
    print_interpreter_cases(_interpreter_cases)
