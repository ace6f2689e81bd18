"""The FP8 block GEMM's decode paths (split-K with a fixed-order reduce, by a second launch or by
each tile's last program, activation quantization fused into the GEMM) and the fused MoE's in-GEMM
quantization, against the torch references.

The Triton cases run under the interpreter (TRITON_INTERPRET=1) in a child process, as in
test_fp8.py; fp32/fp16 activations only (bf16 is wrong under the interpreter). The fused-quant
paths must quantize exactly as the separate quant kernel does, so they are also compared with the
unfused path bit for bit.
"""

from __future__ import annotations


import pytest
import torch

from moeserve.kernels import moe_config
from moeserve.kernels.fp8 import quant_block_fp8_ref
from tests.helpers import interpreter_results as run_interpreted
from tests.helpers import print_interpreter_cases



def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)).item()


def _cfg(bm, bn, split, fuse, bk=32):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_SIZE_M=1, num_warps=4, num_stages=1, SPLIT_K=split,
                FUSE_QUANT=fuse)


# M in {1, 3, 64, 200}; K groups not a multiple of the split (5 groups over 2 and 3 ranges, a partial
# last group); N not a multiple of BLOCK_N.
GEMM_CASES = {  # name: (m, n, k, block, dtype, config)
    "M1_split3_fused": (1, 40, 160, (32, 32), torch.float32, _cfg(16, 32, 3, True)),
    "M1_split8_fused_ragged_k": (1, 72, 150, (32, 32), torch.float32, _cfg(16, 32, 8, True)),
    "M3_split2_fused_fp16": (3, 40, 150, (32, 32), torch.float16, _cfg(16, 16, 2, True)),
    "M3_split3_unfused": (3, 40, 160, (32, 32), torch.float32, _cfg(16, 32, 3, False)),
    "M64_split2_fused": (64, 72, 160, (32, 32), torch.float32, _cfg(32, 32, 2, True)),
    "M64_split3_unfused_bk16": (64, 40, 150, (32, 32), torch.float32, _cfg(32, 32, 3, False, bk=16)),
    "M200_split2_fused_fp16": (200, 40, 96, (32, 32), torch.float16, _cfg(64, 32, 2, True)),
    "M200_split3_unfused": (200, 24, 130, (32, 32), torch.float32, _cfg(64, 16, 3, False)),
    "M3_group128_split2_fused": (3, 48, 300, (128, 128), torch.float32, _cfg(16, 32, 2, True)),
    # tiles twice a weight-scale row wide: a scale a column (fp8.scale_per_tile false)
    "M64_split2_unfused_bn64": (64, 72, 160, (32, 32), torch.float32, _cfg(32, 64, 2, False)),
}


def _interpreter_cases() -> dict[str, tuple[float, float]]:
    """name -> (error, tolerance)."""
    from moeserve.kernels.fp8 import block_fp8_matmul, block_fp8_matmul_ref, block_fp8_matmul_triton
    from moeserve.kernels.fused_moe import fused_moe_triton, fused_moe_w8a8_ref

    results = {}
    for name, (m, n, k, block, dtype, cfg) in GEMM_CASES.items():
        x = (torch.randn(m, k) * torch.rand(m, 1) * 4).to(dtype)
        w, ws = quant_block_fp8_ref(torch.randn(n, k), block)
        ref = block_fp8_matmul_ref(x, w, ws, block)
        out = block_fp8_matmul_triton(x, w, ws, block, cfg)
        tol = 1e-5 if dtype == torch.float32 else 2e-3  # test_fp8.py's bounds
        results[name] = (rel_err(out, ref), tol)
        # the same GEMM without split and without fusion: fusion must not change a bit; the split
        # only reorders fp32 sums (tolerance as above)
        plain = block_fp8_matmul_triton(x, w, ws, block, dict(cfg, SPLIT_K=1, FUSE_QUANT=False))
        results[name + "_vs_unsplit"] = (rel_err(out, plain), tol)
        # same K steps (one scale group each), with and without the in-GEMM quantization
        one_group = dict(cfg, BLOCK_K=block[1])
        same_steps = out if cfg["BLOCK_K"] == block[1] or cfg["FUSE_QUANT"] else \
            block_fp8_matmul_triton(x, w, ws, block, one_group)
        flipped = block_fp8_matmul_triton(x, w, ws, block, dict(one_group, FUSE_QUANT=not cfg["FUSE_QUANT"]))
        results[name + "_fused_eq_unfused"] = (float((same_steps.float() - flipped.float()).abs().max()), 0.0)
        # the split summed by each tile's last program or by the second launch: the same order, the same bits
        in_gemm, by_pass = (block_fp8_matmul_triton(x, w, ws, block, dict(cfg, REDUCE_IN_GEMM=r)) for r in (True, False))
        results[name + "_reduce_in_gemm_eq_pass"] = (float((in_gemm.float() - by_pass.float()).abs().max()), 0.0)
        columns = _scale_columns(block_fp8_matmul_triton, x, w, ws, block, cfg)
        results[name + "_tile_scale_vs_columns"] = (rel_err(out, columns), tol)

    # the default CPU config (a pretend 4-SM device) through the public name
    x = torch.randn(2, 256)
    w, ws = quant_block_fp8_ref(torch.randn(40, 256), (32, 32))
    results["dispatch_default_config"] = (rel_err(block_fp8_matmul(x, w, ws, (32, 32)),
                                                  block_fp8_matmul_ref(x, w, ws, (32, 32))), 1e-5)
    x_strided = torch.randn(5, 512)[:, :256]
    results["fused_strided_x"] = (rel_err(block_fp8_matmul_triton(x_strided, w, ws, (32, 32), _cfg(16, 32, 2, True)),
                                          block_fp8_matmul_ref(x_strided, w, ws, (32, 32))), 1e-5)

    # the unquantized gemv (same kernel) with a bias, its split summed in the GEMM
    from moeserve.kernels.gemv import gemv_ref, gemv_triton
    x, wb, bias = torch.randn(3, 150), torch.randn(40, 150), torch.randn(40)
    gcfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_SIZE_M=1, num_warps=4, num_stages=1, SPLIT_K=3,
                REDUCE_IN_GEMM=True)
    results["gemv_bias_reduce_in_gemm"] = (rel_err(gemv_triton(x, wb, bias, gcfg), gemv_ref(x, wb, bias)), 1e-5)
    # every tile's last program put its arrival counter back to zero (the next call's start)
    from moeserve.kernels.fp8 import _split_counters
    results["split_counters_back_to_zero"] = (float(sum(int(c.abs().sum()) for c in _split_counters.values())), 0.0)

    # fused MoE, W8A8 with the quantization inside both GEMMs
    block = (32, 32)
    for name, (t, e, h, i, top_k, dtype) in {"moe_T1": (1, 4, 96, 64, 2, torch.float32),
                                              "moe_T9_fp16": (9, 4, 80, 48, 2, torch.float16),
                                              "moe_T40": (40, 3, 64, 40, 2, torch.float32)}.items():
        x = (torch.randn(t, h) * 2).to(dtype)
        w13 = torch.randn(e, 2 * i, h) * h ** -0.5
        w2 = torch.randn(e, h, i) * i ** -0.5
        q13, s13 = quant_block_fp8_ref(w13, block)
        q2, s2 = quant_block_fp8_ref(w2, block)
        ids = torch.rand(t, e).topk(top_k, dim=1).indices
        ids = torch.where(torch.rand(t, top_k) < 0.2, -1, ids)
        rw = torch.rand(t, top_k)
        cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_SIZE_M=1, num_warps=4, num_stages=1)
        fused = fused_moe_triton(x, q13, q2, rw, ids, s13, s2, block, config=dict(cfg, FUSE_QUANT=True))
        unfused = fused_moe_triton(x, q13, q2, rw, ids, s13, s2, block, config=dict(cfg, FUSE_QUANT=False))
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        results[name + "_fused"] = (rel_err(fused, fused_moe_w8a8_ref(x, q13, q2, rw, ids, s13, s2, block)), tol)
        results[name + "_fused_eq_unfused"] = (float((fused.float() - unfused.float()).abs().max()), 0.0)
    return results


def _scale_columns(fn, *args, **kwargs):
    """fn's result with a weight scale a column (moe_config.DENSE_FP8_SCALE_PER_TILE off): the form with one
    scale a tile differs from it in fp32 rounding only."""
    moe_config.DENSE_FP8_SCALE_PER_TILE = False
    try:
        return fn(*args, **kwargs)
    finally:
        moe_config.DENSE_FP8_SCALE_PER_TILE = True


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreted(__file__)


CASES = ([f"{n}{s}" for n in GEMM_CASES for s in ("", "_vs_unsplit", "_fused_eq_unfused", "_reduce_in_gemm_eq_pass",
                                                   "_tile_scale_vs_columns")]
         + ["dispatch_default_config", "fused_strided_x", "gemv_bias_reduce_in_gemm", "split_counters_back_to_zero"]
         + [f"{n}{s}" for n in ("moe_T1", "moe_T9_fp16", "moe_T40") for s in ("_fused", "_fused_eq_unfused")])


@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference(interpreter_results, case):
    err, tol = interpreter_results[case]
    assert err <= tol, f"{case}: error {err} > {tol} (seed {interpreter_results['seed']})"


# ---- plain CPU: the config heuristic ---------------------------------------------------------

@pytest.mark.parametrize("m", [1, 8, 32, 64, 128, 256])
@pytest.mark.parametrize("n,k", [(2048, 2048), (576, 2048), (4096, 512), (2048, 10944), (24576, 1536)])
def test_decode_config_fills_the_gpu(m, n, k):
    cfg = moe_config.default_dense_fp8_config(m, n, k, sms=132, on_cpu=False)
    groups = -(-k // 128)
    tiles = -(-m // cfg["BLOCK_M"]) * -(-n // cfg["BLOCK_N"])
    split = cfg["SPLIT_K"]
    assert 1 <= split <= groups
    assert cfg["BLOCK_M"] >= min(m, 64) and cfg["BLOCK_M"] >= 16
    if split > 1:  # the fp32 partials stay under a quarter of the weight bytes
        assert split * m * 4 <= k / 4 + 1e-9
        assert tiles * (split - 1) < moe_config.PROGRAMS_PER_SM * 132  # no more splits than needed
    assert cfg["FUSE_QUANT"] == (m <= moe_config.FUSE_MAX_M)


def test_table_speaks_up_to_twice_its_largest_entry(monkeypatch):
    # a shape tuned at decode sizes only: its split-K tiles for up to 2 x 128 rows, the heuristic past that
    tables = {"dense_fp8": {moe_config.dense_shape_key(2048, 2048): {"1": {"SPLIT_K": 4}, "128": {"SPLIT_K": 2}}}}
    monkeypatch.setattr(moe_config, "load_configs", lambda kind, arch: tables.get(kind, {}))
    cpu = torch.device("cpu")
    assert moe_config.dense_fp8_config(200, 2048, 2048, cpu) == {"SPLIT_K": 2}
    assert moe_config.dense_fp8_config(4096, 2048, 2048, cpu) == moe_config.default_dense_fp8_config(
        4096, 2048, 2048, moe_config.num_sms(cpu), True)


def test_prefill_config_is_one_program_per_tile():
    cfg = moe_config.default_dense_fp8_config(4096, 2048, 2048, sms=132, on_cpu=False)
    assert cfg["SPLIT_K"] == 1 and not cfg["FUSE_QUANT"] and cfg["BLOCK_M"] == 128


def test_moe_fuse_quant_never_at_prefill_sizes():
    # off by default after the H200 measurements (see moe_config); never at prefill sizes
    assert not moe_config.moe_fuse_quant(8192, 64, 6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_reduce_in_gemm_on_gpu_eager_and_graph():
    """On the GPU, a split summed by each tile's last program equals the second-launch sum bit for bit,
    eager and on every replay of a CUDA graph (the arrival counters are back at zero after each call)."""
    from moeserve.kernels.fp8 import _split_counters, block_fp8_matmul_triton

    torch.manual_seed(0)
    dev = torch.device("cuda")
    w, ws = quant_block_fp8_ref(torch.randn(2048, 2048), (128, 128))
    w, ws = w.to(dev), ws.to(dev)
    cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, GROUP_SIZE_M=1, num_warps=4, num_stages=4, SPLIT_K=4,
               FUSE_QUANT=True, REDUCE_IN_GEMM=True)
    x = torch.randn(8, 2048, device=dev, dtype=torch.bfloat16)
    in_gemm = block_fp8_matmul_triton(x, w, ws, (128, 128), cfg)
    by_pass = block_fp8_matmul_triton(x, w, ws, (128, 128), dict(cfg, REDUCE_IN_GEMM=False))
    assert torch.equal(in_gemm, by_pass)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = block_fp8_matmul_triton(x, w, ws, (128, 128), cfg)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(replayed, block_fp8_matmul_triton(x, w, ws, (128, 128), dict(cfg, REDUCE_IN_GEMM=False)))
    assert int(_split_counters[x.device].abs().sum()) == 0


if __name__ == "__main__":
    print_interpreter_cases(_interpreter_cases)
