"""Tensor parallelism through the whole engine (gloo, CPU, fp32): `LLM(tp=2)` and
`moeserve serve --tp 2` give the greedy tokens / text of a single process on tiny DeepSeek-V3
(also in FP8), DeepSeek-V2 (no q_lora) and Qwen3-MoE; idle workers outlive the collective
deadline (rank 0's heartbeats); a dead rank surfaces as an error and the others exit; shapes
that do not split fail before any process starts."""

import signal
import time

import pytest
from openai import OpenAI

from moeserve import LLM, SamplingParams
from tests.helpers import ENGINE, GREEDY, ServerProcess, greedy, prompts_for


def check_tp2_equals_single(path: str, **extra) -> None:
    prompts = prompts_for(6)
    single = LLM(path, **ENGINE, **extra)
    # the same calls in the same order (the second one hits the prefix cache)
    ref, ref_again = greedy(single, prompts), greedy(single, prompts[:1])
    llm = LLM(path, tp=2, **ENGINE, **extra)
    try:
        assert greedy(llm, prompts) == ref
        assert greedy(llm, prompts[:1]) == ref_again
        assert llm.stats.kv_blocks_used == 0 and llm.stats.num_tokens_computed > 0
    finally:
        llm.shutdown()
    assert [p.exitcode for p in llm.engine.procs] == [0, 0]  # the worker stopped when rank 0 did


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2", "qwen3_moe"])
def test_tp2_equals_single_process(tiny_model, arch):
    check_tp2_equals_single(tiny_model(arch))


def test_tp2_fp8_checkpoint(tiny_model, tmp_path):
    """DeepSeek's FP8 format with 16x16 blocks (the tiny shapes split on block boundaries)."""
    from moeserve.models.tiny import convert_to_fp8

    path = convert_to_fp8(tiny_model("deepseek_v3", weight_std=0.02), str(tmp_path / "fp8"), block=(16, 16))
    check_tp2_equals_single(path)


def test_tp2_idle_heartbeat_and_rank_death(deepseek_v3_dir):
    """Workers wait on rank 0 with a deadline (3 s here) yet survive a longer idle spell; a killed
    worker makes the next generate fail with a clear error; killing rank 0 ends the worker."""
    prompts = prompts_for(2)
    ref = greedy(LLM(deepseek_v3_dir, **ENGINE), prompts)
    llm = LLM(deepseek_v3_dir, tp=2, dist_timeout_s=3.0, **ENGINE)
    try:
        time.sleep(4.5)
        assert greedy(llm, prompts) == ref
        rank0, worker = llm.engine.procs
        worker.kill()
        worker.join(10)
        with pytest.raises(RuntimeError, match="engine"):
            llm.generate(prompts, GREEDY)
        rank0.join(15)  # its collective with the dead worker failed: it reported and exited
        assert not rank0.is_alive()
    finally:
        llm.engine.shutdown(timeout_s=5)

    llm = LLM(deepseek_v3_dir, tp=2, **ENGINE)
    try:
        rank0, worker = llm.engine.procs
        rank0.kill()
        worker.join(15)
        assert not worker.is_alive()
    finally:
        llm.engine.shutdown(timeout_s=5)


def test_bad_tp_configs(deepseek_v3_dir):
    with pytest.raises(ValueError, match="num_attention_heads 4 does not split over tp=3"):
        LLM(deepseek_v3_dir, tp=3, **ENGINE)


def test_server_tp2_same_text_as_offline(deepseek_v3_dir):
    prompts = prompts_for(4)
    offline = [o.outputs[0].text for o in LLM(deepseek_v3_dir, **ENGINE).generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=10))]
    server = ServerProcess(deepseek_v3_dir, "--tp", "2")
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="none", timeout=60, max_retries=0)
        model = client.models.list().data[0].id
        out = client.completions.create(model=model, prompt=prompts, max_tokens=10, temperature=0.0)
        assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == offline
        assert len(server.engine_pids()) >= 2  # rank 0 and its worker
    finally:
        assert server.stop(signal.SIGTERM) == 0, server.output()
