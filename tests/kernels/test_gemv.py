"""The small-M unquantized GEMM (kernels/gemv.py) against its torch reference, and the engine option
that routes Linear layers through it.

The Triton cases run under the interpreter (TRITON_INTERPRET=1) in a child process, in fp32/fp16
(bf16 is wrong under the interpreter): M from 1 to 16, N and K not multiples of the blocks, with
and without bias, K cut into 1 to 5 ranges; each case runs twice and must repeat bit for bit (the
partial sums are added in a fixed order). On a GPU (skipped without one) the Linear layer's path in
bf16 at V2-Lite's shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from moeserve.kernels import moe_config
from tests.helpers import REPO
from tests.helpers import interpreter_results as run_interpreted
from tests.helpers import print_interpreter_cases


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()


def _cfg(split: int, bn: int = 16) -> dict:
    return dict(BLOCK_M=16, BLOCK_N=bn, BLOCK_K=32, GROUP_SIZE_M=1, num_warps=4, num_stages=1, SPLIT_K=split)


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# K in 32-wide steps: 150 -> 5 steps (the last ragged), 200 -> 7, 96 -> 3 (a split of 8 becomes 3).
CASES = {  # name: (m, n, k, bias, dtype, config)
    "M1_split1": (1, 40, 150, False, torch.float32, _cfg(1)),
    "M1_split3_bias": (1, 72, 160, True, torch.float32, _cfg(3)),
    "M3_split2_bias_fp16": (3, 40, 150, True, torch.float16, _cfg(2)),
    "M5_split5": (5, 33, 200, False, torch.float32, _cfg(5)),
    "M7_split8_fp16": (7, 50, 96, False, torch.float16, _cfg(8)),
    "M11_split2_bias": (11, 17, 100, True, torch.float32, _cfg(2)),
    "M16_split3_bias_fp16": (16, 70, 130, True, torch.float16, _cfg(3)),
    "M16_bn32_split1_bias": (16, 40, 64, True, torch.float32, _cfg(1, bn=32)),
}


def _interpreter_cases() -> dict[str, tuple[float, float]]:
    """name -> (error, tolerance)."""
    from moeserve.kernels.gemv import gemv_ref, gemv_triton

    results = {}
    for name, (m, n, k, has_bias, dtype, cfg) in CASES.items():
        x = (torch.randn(m, k) * torch.rand(m, 1) * 4).to(dtype)
        w = (torch.randn(n, k) * k ** -0.5).to(dtype)
        bias = torch.randn(n).to(dtype) if has_bias else None
        out = gemv_triton(x, w, bias, cfg)
        results[name] = (rel_err(out, gemv_ref(x, w, bias)), TOL[dtype])
        results[name + "_repeats"] = (float((gemv_triton(x, w, bias, cfg) != out).sum()), 0.0)

    # the default CPU config (a pretend 4-SM device, so K is split) and a strided x
    x, w, bias = torch.randn(6, 256)[:, :200], torch.randn(24, 200), torch.randn(24)
    assert moe_config.gemv_config(6, 24, 200, x.device)["SPLIT_K"] > 1
    results["default_config_strided_x"] = (rel_err(gemv_triton(x, w, bias), gemv_ref(x, w, bias)), 1e-5)
    results["no_rows"] = (float(gemv_triton(torch.randn(0, 64), w[:, :64]).shape != (0, 24)), 0.0)
    return results


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreted(__file__)


NAMES = [f"{n}{s}" for n in CASES for s in ("", "_repeats")] + ["default_config_strided_x", "no_rows"]


@pytest.mark.parametrize("case", NAMES)
def test_triton_matches_reference(interpreter_results, case):
    err, tol = interpreter_results[case]
    assert err <= tol, f"{case}: error {err} > {tol} (seed {interpreter_results['seed']})"


# ---- plain CPU: the config heuristic, the layer, the engine option -----------------------------

V2LITE_NK = [(3648, 2048), (2048, 2048), (5632, 2048), (2048, 2816)]
V3_NK = [(2112, 7168), (24576, 1536), (4096, 7168), (7168, 2048), (7168, 16384)]


@pytest.mark.parametrize("n,k", V2LITE_NK + V3_NK)
def test_config_fills_the_gpu(n, k):
    cfg = moe_config.default_gemv_config(n, k, sms=132, on_cpu=False)
    steps = -(-k // cfg["BLOCK_K"])
    per_split = -(-steps // cfg["SPLIT_K"])
    programs = -(-n // cfg["BLOCK_N"]) * -(-steps // per_split)
    assert per_split >= moe_config.GEMV_MIN_STEPS
    assert programs >= moe_config.PROGRAMS_PER_SM * 132 or per_split == moe_config.GEMV_MIN_STEPS


def test_layer_on_cpu_is_f_linear():
    from moeserve.layers.linear import Linear, use_gemv_kernel

    layer = Linear(48, 20, bias=True)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    use_gemv_kernel(layer, True)
    x = torch.randn(2, 3, 48)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_engine_option_reaches_the_layers(deepseek_v3_dir):
    from moeserve import LLM, SamplingParams
    from moeserve.engine.llm import add_engine_args, engine_kwargs
    from moeserve.layers.linear import Linear, use_gemv_kernel

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--model", deepseek_v3_dir, "--dense-gemv"])
    assert engine_kwargs(args)["dense_gemv"] and not engine_kwargs(parser.parse_args(["--model", "m"]))["dense_gemv"]

    llm = LLM(deepseek_v3_dir, dtype="float32", device="cpu", block_size=4, num_blocks=64,
              enable_prefix_caching=False, dense_gemv=True)
    model = llm.engine.runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.gemv for m in linears)
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    prompts = [[5, 7, 9, 11], [3, 4]]
    with_option = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
    use_gemv_kernel(model, False)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)] == with_option  # CPU: F.linear


# ---- GPU, bf16: the layer's path -----------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("n,k,bias", [(3648, 2048, False), (2048, 2816, False), (300, 512, True)])
def test_layer_on_gpu_bf16(n, k, bias):
    from moeserve.kernels.gemv import gemv_fits, gemv_ref
    from moeserve.layers.linear import Linear, use_gemv_kernel

    with torch.device("cuda"):
        layer = Linear(k, n, bias=bias).to(torch.bfloat16)
    torch.nn.init.normal_(layer.weight, std=k ** -0.5)
    if bias:
        torch.nn.init.normal_(layer.bias)
    use_gemv_kernel(layer, True)
    for m in [1, 2, 3, 5, 8, 13, 16, 17]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        out = layer(x)
        assert gemv_fits(x, layer.weight) == (m <= moe_config.GEMV_MAX_M)
        assert rel_err(out, gemv_ref(x, layer.weight, layer.bias)) < TOL[torch.bfloat16], m
        assert torch.equal(layer(x), out), m  # the fixed-order reduce: the same bits every run


def test_dense_bench_smoke(tmp_path):
    """benchmarks/kernel_bench_dense.py --smoke --tune: tiny shapes on CPU under the interpreter, end to end."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "kernel_bench_dense.py"), "--smoke",
                           "--tune", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cases = json.loads((tmp_path / "kernels_dense.json").read_text())["cases"]
    assert len(cases) == 4 and all(r["ok"] and "best_config" in r for r in cases)
    table = json.loads((tmp_path / "dense_gemv_cpu.json").read_text())
    assert set(table) == {"N=40,K=150", "N=72,K=96"} and all(set(t) == {"1", "3"} for t in table.values())
    assert proc.stdout.strip().splitlines()[-1].startswith("|")  # the table comes last


def test_router_bench_smoke(tmp_path):
    """kernel_bench_dense.py --smoke --router: the router kernel's rows, checked against cast + GEMM."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "kernel_bench_dense.py"), "--smoke",
                           "--router", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cases = json.loads((tmp_path / "kernels_router.json").read_text())["cases"]
    assert [r["M"] for r in cases] == [1, 3] and all(r["ok"] and r["t_triton_us"] > 0 for r in cases)


if __name__ == "__main__":
    print_interpreter_cases(_interpreter_cases)
