"""Tensor parallelism inside data-parallel attention + expert parallelism through the whole engine
(gloo, CPU, fp32): `LLM(dp=2, tp=2, ep=4)` gives the greedy tokens of a single process on tiny
DeepSeek-V3 and Qwen3-MoE, with the high-throughput dispatch kernel (and the balancer moving
experts) and the low-latency one (forced by MOESERVE_DISPATCH), also when one data-parallel group
has no requests at all; so do tp with ep in one group and independent TP replicas (ep 1); tp
over two "nodes" (separate launches on localhost, TCP rendezvous), alone and inside dp/ep, does
too; bad combinations fail before any process starts."""

import subprocess
import sys

import pytest

from moeserve import LLM
from moeserve.config import EngineConfig, ModelConfig
from moeserve.engine.dp import validate_parallel
from moeserve.models.tiny import TINY_CONFIGS
from tests.helpers import ENGINE, free_port, greedy, prompts_for


@pytest.fixture(scope="module")
def refs(tiny_model):
    """arch -> (checkpoint, {number of prompts: single-process greedy tokens})."""
    out = {}

    def ref(arch):
        if arch not in out:
            path = tiny_model(arch)
            llm = LLM(path, **ENGINE)
            out[arch] = path, {n: greedy(llm, prompts_for(n)) for n in (1, 7)}
        return out[arch]

    return ref


CASES = {
    "deepseek_v3-ht-eplb": ("deepseek_v3", {"dispatch_backend": "ht", "num_redundant_experts": 4,
                                            "eplb_interval": 3, "eplb_window": 4}, {}),
    # Forced through the environment; 40 rows per rank in the low-latency buffers hold a step's
    # share of 7 prompts' prefill (at most 75 tokens over a group's 2 ranks).
    "qwen3_moe-ll": ("qwen3_moe", {"ll_capacity": 40}, {"MOESERVE_DISPATCH": "ll"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dp2_tp2_ep4_equals_single_process(refs, monkeypatch, case):
    arch, extra, env = CASES[case]
    path, ref = refs(arch)
    for name, value in env.items():  # the rank processes inherit it
        monkeypatch.setenv(name, value)
    llm = LLM(path, dp=2, tp=2, ep=4, **ENGINE, **extra)
    try:
        assert greedy(llm, prompts_for(7)) == ref[7]
        per_rank = llm.engine.router.stats
        assert sorted(per_rank) == [0, 1] and all(s["num_tokens_computed"] > 0 for s in per_rank.values())
        # One request: the other data-parallel group has none and runs dummy batches, its worker too.
        assert greedy(llm, prompts_for(1)) == ref[1]
        assert llm.stats.kv_blocks_used == 0
        if "eplb_interval" in extra:
            assert llm.stats.num_rebalances >= 3 and llm.stats.expert_bytes_moved > 0
    finally:
        llm.shutdown()
    assert [p.exitcode for p in llm.engine.procs] == [0, 0, 0, 0]  # workers stopped with their rank 0


@pytest.mark.parametrize("arch,parallel", [("deepseek_v3", {"tp": 2, "ep": 2}), ("qwen3_moe", {"dp": 2, "tp": 2})],
                         ids=["tp2-ep2", "dp2-tp2-ep1"])
def test_one_tp_group_with_ep_and_tp_replicas(refs, arch, parallel):
    """tp 2 with ep 2: one group, nobody to agree with, its two ranks split the experts and the
    rows; dp 2 x tp 2 with ep 1: two independent TP engines, experts split by tp in each."""
    path, ref = refs(arch)
    llm = LLM(path, **parallel, **ENGINE)
    try:
        assert greedy(llm, prompts_for(7)) == ref[7]
    finally:
        llm.shutdown()
    assert all(p.exitcode == 0 for p in llm.engine.procs)


@pytest.mark.parametrize("parallel", [["--tp", "2"], ["--dp", "2", "--tp", "2", "--ep", "4"]],
                         ids=["tp2", "dp2-tp2-ep4"])
def test_tp_over_two_nodes(refs, parallel):
    """Node 1 (a headless `moeserve serve`) runs the second half of the ranks: the TP worker of
    rank 0 (tp 2), or the second data-parallel group (dp 2 x tp 2); node 0 is an offline LLM."""
    path, ref = refs("deepseek_v3")
    addr = f"127.0.0.1:{free_port(span=4)}"  # + output and 2 input sockets
    args = dict(zip([a.lstrip("-") for a in parallel[::2]], map(int, parallel[1::2])))
    engine_args = ["--device", "cpu", "--dtype", "float32", "--block-size", str(ENGINE["block_size"]),
                   "--num-blocks", str(ENGINE["num_blocks"])]
    node1 = subprocess.Popen([sys.executable, "-m", "moeserve.cli", "serve", "--model", path, *engine_args,
                              *parallel, "--nnodes", "2", "--node-rank", "1", "--dist-init-addr", addr],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        llm = LLM(path, nnodes=2, node_rank=0, dist_init_addr=addr, **args, **ENGINE)
        try:
            assert greedy(llm, prompts_for(7)) == ref[7]
        finally:
            llm.shutdown()
        assert all(p.exitcode == 0 for p in llm.engine.procs)
        assert node1.wait(60) == 0, node1.stdout.read()  # node 0's shutdown reached node 1's ranks
    finally:
        if node1.poll() is None:
            node1.kill()


def test_bad_combinations(deepseek_v3_dir):
    with pytest.raises(ValueError, match=r"ep must be 1 or dp \* tp = 2 \* 2 = 4"):
        LLM(deepseek_v3_dir, dp=2, tp=2, ep=2, **ENGINE)
    with pytest.raises(ValueError, match="do not split evenly over 4 expert-parallel ranks"):  # 16 + 2 slots
        LLM(deepseek_v3_dir, dp=2, tp=2, ep=4, num_redundant_experts=2, **ENGINE)
    with pytest.raises(ValueError, match="num_attention_heads 4 does not split over tp=3"):
        LLM(deepseek_v3_dir, dp=2, tp=3, ep=6, **ENGINE)
    # Under expert parallelism the experts stay whole: an intermediate size that tp does not
    # divide is fine there, and an error only when tp splits the experts.
    cfg = ModelConfig.from_dict({"architectures": ["DeepseekV3ForCausalLM"],
                                 **dict(TINY_CONFIGS["deepseek_v3"], moe_intermediate_size=33)})
    validate_parallel(EngineConfig.from_kwargs(deepseek_v3_dir, dp=2, tp=2, ep=4), cfg)
    with pytest.raises(ValueError, match="moe_intermediate_size 33 does not split over tp=2"):
        validate_parallel(EngineConfig.from_kwargs(deepseek_v3_dir, dp=2, tp=2), cfg)
