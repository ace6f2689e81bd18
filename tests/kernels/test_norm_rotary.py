"""RMSNorm (plain and fused with the residual add) and rotary: the Triton kernels against the torch
references, on CPU.

The Triton cases run under the interpreter (TRITON_INTERPRET=1) in a child process, as in
test_attention.py: the variable must be set before triton is imported. fp32 (and one fp16 case
each); bf16 is wrong under the interpreter. Inputs are fresh random tensors every run (the seed
is reported on failure).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tests.helpers import interpreter_results as run_interpreted
from tests.helpers import print_interpreter_cases

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return float("inf")
    if ref.numel() == 0:
        return 0.0
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()


def strided(shape: tuple[int, ...], dtype: torch.dtype, pad: int) -> torch.Tensor:
    """A random tensor of `shape` that is a slice of a wider one (row stride > last dim)."""
    wide = torch.randn(*shape[:-1], shape[-1] + pad).to(dtype)
    return wide[..., pad:]


NORM_CASES = {  # name: (shape, dtype, fused, pad: > 0 makes x (and residual) a strided slice)
    "t0": ((0, 256), "fp32", False, 0),
    "t1_hidden2048": ((1, 2048), "fp32", False, 0),
    "t5_hidden96": ((5, 96), "fp32", False, 0),  # not a power of two
    "strided_rows": ((9, 160), "fp32", False, 64),  # e.g. the latent part of kv_a_proj's output
    "heads_3d_qwen3": ((3, 8, 128), "fp32", False, 0),  # per-head q/k norm: several rows per program
    "heads_3d_strided": ((5, 3, 64), "fp32", False, 32),
    "fp16": ((6, 512), "fp16", False, 0),
    "fused_t0": ((0, 256), "fp32", True, 0),
    "fused_t1": ((1, 2048), "fp32", True, 0),
    "fused_t7_hidden200": ((7, 200), "fp32", True, 0),
    "fused_strided": ((4, 128), "fp32", True, 16),
    "fused_fp16": ((6, 512), "fp16", True, 0),
}

# name: (T, q heads, kv heads, head dim, dtype): the per-head norms of q and k read in place from a
# merged q/k/v projection's output [T, (q + 2 kv) * head dim], as GQAAttention does
QK_OF_QKV_CASES = {
    "t5_qwen3": (5, 8, 2, 16, "fp32"),
    "t1": (1, 4, 1, 128, "fp32"),
    "t3_fp16": (3, 4, 4, 64, "fp16"),
}

ROTARY_CASES = {  # name: (T, q heads, k heads (0: q alone), rot_dim, nope dim (q is q[..., nope:]), dtype)
    # every case runs both styles, neox and interleaved
    "qwen3_heads": (5, 8, 2, 32, 0, "fp32"),
    "t1_head_dim128": (1, 4, 1, 128, 0, "fp32"),
    "t0": (0, 4, 1, 32, 0, "fp32"),
    "q_alone_strided": (3, 6, 0, 16, 8, "fp32"),
    "mla_rope_view_40_heads": (4, 40, 1, 64, 32, "fp32"),  # q[..., nope:]; two head blocks of q
    "mla_t1": (1, 16, 1, 64, 128, "fp32"),
    "q_alone_half12": (3, 5, 0, 24, 0, "fp32"),  # half = 12: masked lanes
    "fp16": (6, 8, 2, 64, 16, "fp16"),
}


def _norm_case(shape, dtype_name, fused, pad) -> float:
    from moeserve.kernels.rmsnorm import (_use_triton, fused_add_rmsnorm, fused_add_rmsnorm_ref, rmsnorm,
                                          rmsnorm_ref)

    dtype = DTYPES[dtype_name]
    x = strided(shape, dtype, pad)
    weight = (1 + 0.5 * torch.randn(shape[-1])).to(dtype)
    assert _use_triton(x, weight)  # the public names below run the kernels
    if not fused:
        return rel_err(rmsnorm(x, weight, 1e-6), rmsnorm_ref(x, weight, 1e-6))
    residual = strided(shape, dtype, pad)
    out, res = fused_add_rmsnorm(x, residual, weight, 1e-6)
    ref_out, ref_res = fused_add_rmsnorm_ref(x, residual, weight, 1e-6)
    return max(rel_err(out, ref_out), rel_err(res, ref_res))


def _qk_of_qkv_case(t, q_heads, kv_heads, head_dim, dtype_name) -> float:
    from moeserve.kernels.rmsnorm import _use_triton, rmsnorm, rmsnorm_ref

    dtype = DTYPES[dtype_name]
    qkv = torch.randn(t, (q_heads + 2 * kv_heads) * head_dim).to(dtype)
    q, k, _ = qkv.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    errs = []
    for x in (q.view(t, q_heads, head_dim), k.view(t, kv_heads, head_dim)):
        weight = (1 + 0.5 * torch.randn(head_dim)).to(dtype)
        assert _use_triton(x, weight)
        errs.append(rel_err(rmsnorm(x, weight, 1e-6), rmsnorm_ref(x, weight, 1e-6)))
    return max(errs)


def _rotary_case(t, q_heads, k_heads, rot_dim, nope, dtype_name) -> float:
    from moeserve.kernels.rotary import _use_triton, apply_rotary, apply_rotary_qk, apply_rotary_ref

    dtype = DTYPES[dtype_name]
    cache = torch.randn(300, rot_dim)  # fp32, as RotaryEmbedding keeps it
    positions = torch.randint(0, 300, (t,), dtype=torch.int32 if t % 2 else torch.int64)
    q = torch.randn(t, q_heads, nope + rot_dim).to(dtype)[..., nope:]
    errs = []
    for interleaved in (False, True):
        assert _use_triton(q, positions, cache)  # the public names below run the kernel
        if k_heads:
            k = torch.randn(t, k_heads, rot_dim).to(dtype)
            q_out, k_out = apply_rotary_qk(q, k, positions, cache, interleaved)
            errs.append(rel_err(k_out, apply_rotary_ref(k, positions, cache, interleaved)))
        else:
            q_out = apply_rotary(q, positions, cache, interleaved)
        errs.append(rel_err(q_out, apply_rotary_ref(q, positions, cache, interleaved)))
    return max(errs)


# name: (shape, dtype, with a residual, group): the norm that also quantizes its output for an FP8 GEMM
NORM_QUANT_CASES = {
    "t3_hidden256_g128": ((3, 256), "fp32", True, 128),
    "t1_no_residual": ((1, 512), "fp32", False, 128),
    "t5_hidden80_g32": ((5, 80), "fp32", True, 32),  # last group ragged, one group past the row
    "t20_hidden64_g32": ((20, 64), "fp16", True, 32),  # several rows a program
    "t2_hidden48_g64": ((2, 48), "fp32", False, 64),  # a row shorter than one group
}


def _norm_quant_case(shape, dtype_name, with_residual, group) -> float:
    """Mismatches: the out, residual and (e4m3, scales) bits against the reference (norm, then quant)."""
    from moeserve.kernels.rmsnorm import rmsnorm_quant, rmsnorm_quant_ref

    dtype = DTYPES[dtype_name]
    x = torch.randn(shape).to(dtype)
    residual = torch.randn(shape).to(dtype) if with_residual else None
    weight = (1 + 0.5 * torch.randn(shape[-1])).to(dtype)
    out, res, (q, s) = rmsnorm_quant(x, residual, weight, 1e-6, group)
    out_ref, res_ref, (q_ref, s_ref) = rmsnorm_quant_ref(x, residual, weight, 1e-6, group)
    if rel_err(out, out_ref) > TOL[dtype] or not torch.equal(res, res_ref):
        return float("inf")
    # quantized from the kernel's own output: compare with the reference quantization of that
    from moeserve.kernels.fp8 import per_token_group_quant_fp8_ref
    q_own, s_own = per_token_group_quant_fp8_ref(out, group)
    return float((q.view(torch.uint8) != q_own.view(torch.uint8)).sum() + (s != s_own).sum()
                 + (q.shape != q_ref.shape) + (s.shape != s_ref.shape))


# name: (tokens, experts a token, hidden, dtype, addend, group): a fused MoE's rows before their sum
# (fused_moe.ExpertRows) as the norm's input; some pairs' experts are elsewhere (id -1)
EXPERT_ROWS_CASES = {
    "t5_k3_h64": (5, 3, 64, "fp32", False, 0),
    "t4_k2_h80_addend": (4, 2, 80, "fp32", True, 0),  # 80: a ragged row
    "t20_k4_h64_fp16_g32": (20, 4, 64, "fp16", False, 32),  # several rows a program, and the quant
    "t3_k8_h256_addend_g128": (3, 8, 256, "fp32", True, 128),
}


def _expert_rows_case(tokens, k, hidden, dtype_name, with_addend, group) -> float:
    """Mismatched bits: the norm over ExpertRows (with a residual; without one too when not quantizing)
    against fused_moe's sum launch, then the same norm."""
    from moeserve.kernels.fused_moe import ExpertRows
    from moeserve.kernels.rmsnorm import fused_add_rmsnorm, rmsnorm, rmsnorm_quant

    dtype = DTYPES[dtype_name]
    ids = torch.randint(0, 6, (tokens, k))
    ids[torch.rand(tokens, k) < 0.3] = -1
    rows = ExpertRows(torch.randn(tokens * k, hidden).to(dtype), ids,
                      torch.randn(tokens, hidden).to(dtype) if with_addend else None)
    summed = rows.sum()
    residual = torch.randn(tokens, hidden).to(dtype)
    weight = (1 + 0.5 * torch.randn(hidden)).to(dtype)

    def differ(a, b) -> int:
        a, b = (t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t for t in (a, b))
        return int((a != b).sum()) if a.shape == b.shape else a.numel() + 1

    if group:
        got = rmsnorm_quant(rows, residual, weight, 1e-6, group)
        want = rmsnorm_quant(summed, residual, weight, 1e-6, group)
        return float(sum(differ(a, b) for a, b in zip((*got[:2], *got[2]), (*want[:2], *want[2]))))
    got, want = fused_add_rmsnorm(rows, residual, weight, 1e-6), fused_add_rmsnorm(summed, residual, weight, 1e-6)
    return float(sum(differ(a, b) for a, b in zip(got, want)) + differ(rmsnorm(rows, weight, 1e-6),
                                                                       rmsnorm(summed, weight, 1e-6)))


def _interpreter_cases() -> dict[str, tuple[float, float]]:
    """name -> (relative error vs the reference, tolerance)."""
    results = {}
    for name, args in EXPERT_ROWS_CASES.items():
        results["expert_rows_" + name] = (_expert_rows_case(*args), 0.0)
    for name, args in NORM_QUANT_CASES.items():
        results["norm_quant_" + name] = (_norm_quant_case(*args), 0.0)
    for name, args in NORM_CASES.items():
        results["norm_" + name] = (_norm_case(*args), TOL[DTYPES[args[1]]])
    for name, args in QK_OF_QKV_CASES.items():
        results["qk_norm_" + name] = (_qk_of_qkv_case(*args), TOL[DTYPES[args[4]]])
    for name, args in ROTARY_CASES.items():
        results["rotary_" + name] = (_rotary_case(*args), TOL[DTYPES[args[5]]])
    return results


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", ["norm_" + n for n in NORM_CASES] + ["qk_norm_" + n for n in QK_OF_QKV_CASES]
                         + ["norm_quant_" + n for n in NORM_QUANT_CASES]
                         + ["expert_rows_" + n for n in EXPERT_ROWS_CASES]
                         + ["rotary_" + n for n in ROTARY_CASES])
def test_triton_matches_reference(interpreter_results, case):
    err, tol = interpreter_results[case]
    assert err <= tol, f"{case}: rel error {err} > {tol} (seed {interpreter_results['seed']})"


# ---- plain CPU ------------------------------------------------------------------------------------

def test_cpu_without_interpreter_uses_the_references():
    from moeserve.kernels.rmsnorm import _use_triton

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter set for the whole run")
    assert not _use_triton(torch.randn(2, 8), torch.ones(8))


def test_rotary_embedding_rotates_q_and_k_like_the_reference():
    """RotaryEmbedding's q+k path (one launch on GPU) returns what rotating each alone returns."""
    from moeserve.config import RopeConfig
    from moeserve.kernels.rotary import apply_rotary_ref
    from moeserve.layers.rotary import RotaryEmbedding

    rope = RotaryEmbedding(RopeConfig(), 16, 64, interleaved=True)
    positions = torch.tensor([3, 0, 63])
    q, k = torch.randn(3, 4, 24)[..., 8:], torch.randn(3, 1, 16)
    q_out, k_out = rope(positions, q, k)
    assert torch.equal(q_out, apply_rotary_ref(q, positions, rope.cos_sin_cache, True))
    assert torch.equal(k_out, apply_rotary_ref(k, positions, rope.cos_sin_cache, True))
    (k_only,) = rope(positions, k)
    assert torch.equal(k_only, k_out)


def test_norm_bench_smoke(tmp_path):
    """benchmarks/kernel_bench_norm.py --smoke: tiny shapes on CPU under the interpreter, end to end."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "kernel_bench_norm.py"), "--smoke",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "kernels_norm.json").read_text())
    assert report["cases"] and all(r["ok"] for r in report["cases"])
    assert {r["kernel"] for r in report["cases"]} == {"rmsnorm", "fused_add_rmsnorm", "rotary_qk"}
    assert proc.stdout.strip().splitlines()[-1].startswith("|")  # the table comes last


if __name__ == "__main__":
    print_interpreter_cases(_interpreter_cases)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("rows,hidden,with_residual", [(1, 2048, True), (64, 2048, False), (33, 7168, True)])
def test_norm_quant_on_gpu_bf16(rows, hidden, with_residual):
    """bf16 on the GPU: the norm's own quantization is bit for bit the quant kernel's of its output,
    and the output and residual are the plain fused kernel's."""
    from moeserve.kernels.fp8 import per_token_group_quant_fp8
    from moeserve.kernels.rmsnorm import fused_add_rmsnorm, rmsnorm, rmsnorm_quant

    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn_like(x) if with_residual else None
    weight = (1 + 0.5 * torch.randn(hidden, device="cuda")).to(torch.bfloat16)
    out, res, (q, s) = rmsnorm_quant(x, residual, weight, 1e-6, 128)
    plain_out, plain_res = fused_add_rmsnorm(x, residual, weight, 1e-6) if with_residual else (
        rmsnorm(x, weight, 1e-6), x)
    assert torch.equal(out, plain_out) and torch.equal(res, plain_res)
    q_ref, s_ref = per_token_group_quant_fp8(out, 128)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("tokens,k,addend,group", [(1, 8, False, 128), (64, 8, False, 0), (64, 6, True, 128)])
def test_expert_rows_on_gpu_bf16(tokens, k, addend, group):
    """bf16 on the GPU: the norm over a fused MoE's rows before their sum gives the bits of the sum launch
    followed by the norm (the output, the residual and the quantization)."""
    from moeserve.kernels.fused_moe import ExpertRows
    from moeserve.kernels.rmsnorm import fused_add_rmsnorm, rmsnorm_quant

    ids = torch.randint(0, 66, (tokens, k), device="cuda")
    ids[torch.rand(tokens, k, device="cuda") < 0.2] = -1
    rows = ExpertRows(torch.randn(tokens * k, 2048, device="cuda", dtype=torch.bfloat16), ids,
                      torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16) if addend else None)
    residual = torch.randn(tokens, 2048, device="cuda", dtype=torch.bfloat16)
    weight = (1 + 0.5 * torch.randn(2048, device="cuda")).to(torch.bfloat16)
    if group:
        got, want = rmsnorm_quant(rows, residual, weight, 1e-6, group), rmsnorm_quant(rows.sum(), residual, weight,
                                                                                     1e-6, group)
        got, want = (*got[:2], got[2][0].view(torch.uint8), got[2][1]), (*want[:2], want[2][0].view(torch.uint8),
                                                                         want[2][1])
    else:
        got, want = fused_add_rmsnorm(rows, residual, weight, 1e-6), fused_add_rmsnorm(rows.sum(), residual, weight,
                                                                                       1e-6)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
