"""Data-parallel attention + expert-parallel MoE through the whole engine (gloo, CPU, fp32):
`LLM(dp=2, ep=2)` and `moeserve serve --dp 2 --ep 2` (one node, and two "nodes" launched
separately) give the greedy tokens of a single process; so do both dispatch kernels (the
low-latency one also over the peer-memory transport), FP8 on the wire (within tolerance), a run
whose experts the balancer moves mid-generation, and one that warms up at prefill sizes first (every
rank the same forwards). On the GPU kernels: test_ep_gpu.py."""

import subprocess
import sys

import httpx
import pytest
from openai import OpenAI

from moeserve import LLM
from tests.helpers import ENGINE, SERVE_ARGS, ServerProcess, free_port, greedy, metric, prompts_for


@pytest.fixture(scope="module", params=["deepseek_v3", "qwen3_moe"])
def arch_ref(request, tiny_model):
    path = tiny_model(request.param)
    llm = LLM(path, **ENGINE)
    return path, {n: greedy(llm, prompts_for(n)) for n in (1, 7)}


def test_dp2_ep2_equals_single_process(arch_ref):
    path, ref = arch_ref
    llm = LLM(path, dp=2, ep=2, **ENGINE)
    try:
        assert greedy(llm, prompts_for(7)) == ref[7]
        # One request: the other rank has no requests at all and joins with dummy batches.
        assert greedy(llm, prompts_for(1)) == ref[1]
        per_rank = llm.engine.router.stats
        assert sorted(per_rank) == [0, 1]
        assert all(s["num_tokens_computed"] > 0 for s in per_rank.values())  # both ranks served requests
        assert llm.stats.kv_blocks_used == 0
    finally:
        llm.shutdown()
    assert all(p.exitcode == 0 for p in llm.engine.procs)


@pytest.mark.parametrize("extra", [{"dispatch_backend": "ht"}, {"dispatch_backend": "ll", "ll_threshold": 64},
                                   {"dispatch_backend": "ll", "ll_threshold": 64, "ll_transport": "peer"},
                                   {"num_redundant_experts": 2, "eplb_interval": 3, "eplb_window": 4},
                                   {"warmup_prefill": True, "ll_transport": "peer"}],
                         ids=["ht", "ll", "ll_peer", "eplb", "warmup"])
def test_dp2_ep2_variants(deepseek_v3_dir, extra):
    ref = greedy(LLM(deepseek_v3_dir, **ENGINE), prompts_for(7))
    llm = LLM(deepseek_v3_dir, dp=2, ep=2, **ENGINE, **extra)
    try:
        assert greedy(llm, prompts_for(7)) == ref
        if "eplb_interval" in extra:
            assert llm.stats.num_rebalances >= 3
            assert llm.stats.expert_bytes_moved > 0  # experts really moved between ranks mid-run
    finally:
        llm.shutdown()


def test_fp8_wire_stays_close(deepseek_v3_dir):
    """FP8 dispatch and combine quantize activations (~2.5% per hop): most greedy tokens survive."""
    prompts = prompts_for(7)
    ref = greedy(LLM(deepseek_v3_dir, **ENGINE), prompts)
    llm = LLM(deepseek_v3_dir, dp=2, ep=2, dispatch_dtype="fp8", combine_dtype="fp8", **ENGINE)
    try:
        got = greedy(llm, prompts)
    finally:
        llm.shutdown()
    same = sum(a == b for seq_a, seq_b in zip(got, ref) for a, b in zip(seq_a, seq_b))
    assert same >= 0.7 * sum(map(len, ref)), (got, ref)


def test_bad_parallel_config(deepseek_v3_dir):
    with pytest.raises(ValueError, match="ep must be 1 or"):
        LLM(deepseek_v3_dir, dp=2, ep=3, **ENGINE)
    with pytest.raises(ValueError, match="ll_transport"):
        LLM(deepseek_v3_dir, dp=2, ep=2, ll_transport="nvlink", **ENGINE)
    with pytest.raises(ValueError, match="one node only"):
        LLM(deepseek_v3_dir, dp=2, ep=2, nnodes=2, dist_init_addr="127.0.0.1:1", ll_transport="peer", **ENGINE)
    with pytest.raises(ValueError, match="do not split evenly"):  # 16 experts + 1 over 2 ranks
        LLM(deepseek_v3_dir, dp=2, ep=2, num_redundant_experts=1, **ENGINE).shutdown()
    with pytest.raises(ValueError, match="dist_backend"):
        LLM(deepseek_v3_dir, dp=2, ep=2, dist_backend="mpi", **ENGINE)
    # gloo on GPUs: its collectives wait on the host, so CUDA graphs need the peer transport (checked
    # before any rank starts, so this runs without a GPU)
    gpu = {**ENGINE, "device": "cuda", "dist_backend": "gloo"}
    with pytest.raises(ValueError, match="only with ll_transport 'peer'"):
        LLM(deepseek_v3_dir, dp=2, ep=2, **gpu)
    with pytest.raises(ValueError, match="set enforce_eager"):
        LLM(deepseek_v3_dir, tp=2, **gpu)


def completions(url: str, prompts: list[list[int]]) -> list[str]:
    client = OpenAI(base_url=url + "/v1", api_key="none", timeout=60, max_retries=0)
    model = client.models.list().data[0].id
    out = client.completions.create(model=model, prompt=prompts, max_tokens=10, temperature=0.0)
    return [c.text for c in sorted(out.choices, key=lambda c: c.index)]


def test_server_dp2_ep2_one_node_and_two_nodes(deepseek_v3_dir):
    prompts = prompts_for(5)
    single = ServerProcess(deepseek_v3_dir)
    try:
        expected = completions(single.url, prompts)
    finally:
        assert single.stop() == 0
    dp = ServerProcess(deepseek_v3_dir, "--dp", "2", "--ep", "2")
    try:
        assert completions(dp.url, prompts) == expected
    finally:
        assert dp.stop() == 0, dp.output()

    # Two "nodes" on localhost: node 1 runs rank 1 headless, node 0 runs rank 0 and the HTTP server.
    # The balancer runs hierarchically (the tiny model has 4 expert groups: 2 stay on each node)
    # and moves experts between the nodes mid-generation.
    addr = f"127.0.0.1:{free_port(span=4)}"  # + output and 2 input sockets
    nodes = ["--dp", "2", "--ep", "2", "--nnodes", "2", "--dist-init-addr", addr, "--num-redundant-experts", "2",
             "--eplb-interval", "3", "--eplb-window", "4"]
    node1 = subprocess.Popen([sys.executable, "-m", "moeserve.cli", "serve", "--model", deepseek_v3_dir, *SERVE_ARGS,
                              *nodes, "--node-rank", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        node0 = ServerProcess(deepseek_v3_dir, *nodes, "--node-rank", "0")
        try:
            assert completions(node0.url, prompts) == expected
            metrics = httpx.get(node0.url + "/metrics", timeout=10).text
            assert metric(metrics, "moeserve_eplb_rebalances") >= 2
            assert metric(metrics, "moeserve_eplb_expert_bytes_moved") > 0
        finally:
            assert node0.stop() == 0, node0.output()
        # Node 0's shutdown reaches the remote rank, and node 1 exits cleanly.
        assert node1.wait(60) == 0, node1.stdout.read()
    finally:
        if node1.poll() is None:
            node1.kill()


def test_dp2_ep2_rank_death_is_an_error_not_a_hang(deepseek_v3_dir):
    """A rank killed between steps, over the peer-memory transport: the next generate fails with a
    clear error within the collective deadline (3 s here) and the surviving rank exits; nothing waits
    forever on a peer that will never store its rows."""
    import time

    llm = LLM(deepseek_v3_dir, dp=2, ep=2, dispatch_backend="ll", ll_transport="peer", dist_timeout_s=3.0, **ENGINE)
    try:
        assert len(greedy(llm, prompts_for(2))) == 2
        survivor, victim = llm.engine.procs
        victim.kill()
        victim.join(10)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="engine"):
            greedy(llm, prompts_for(2))
        survivor.join(15)
        assert not survivor.is_alive() and time.monotonic() - start < 30
    finally:
        llm.shutdown()
