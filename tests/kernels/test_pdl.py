"""Programmatic dependent launch (kernels/pdl.py): off the GPU nothing changes at launch; on a Hopper GPU
(skipped elsewhere) a chain of PDL kernels, each reading what the one before wrote, captured in a CUDA
graph and replayed, gives what the torch references give step by step. (Every PDL kernel compiles with
the grid-dependency instructions for sm_90 in test_compile_hopper.py.)"""

from __future__ import annotations

import pytest
import torch

from moeserve.kernels.pdl import pdl_enabled, pdl_launch


def test_no_pdl_off_the_gpu():
    assert pdl_launch(torch.device("cpu")) == {} and not pdl_enabled(torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs a Hopper or later GPU")
def test_chain_of_dependent_kernels_in_a_graph():
    from moeserve.kernels.argmax import greedy_argmax_triton
    from moeserve.kernels.rmsnorm import fused_add_rmsnorm_ref, fused_add_rmsnorm_triton

    assert pdl_enabled(torch.device("cuda"))
    x = torch.randn(64, 2048, device="cuda", dtype=torch.bfloat16)
    res = torch.randn_like(x)
    w = torch.randn(2048, device="cuda", dtype=torch.bfloat16)

    def chain(norm, x, res):
        for _ in range(50):  # each kernel reads the previous one's output and residual
            x, res = norm(x, res, w, 1e-6)
        return x, res, greedy_argmax_triton(x.float())

    want = chain(fused_add_rmsnorm_ref, x, res)
    graph = torch.cuda.CUDAGraph()
    chain(fused_add_rmsnorm_triton, x, res)  # compile outside the capture
    with torch.cuda.graph(graph):
        got = chain(fused_add_rmsnorm_triton, x, res)
    def rel_err(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    for _ in range(3):
        got[0].zero_()  # a replay that read before its predecessor wrote would not rebuild these
        got[2].zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(got[0], want[0]) < 1e-2 and rel_err(got[1], want[1]) < 1e-2
        assert torch.equal(got[2], greedy_argmax_triton(got[0].float()))
