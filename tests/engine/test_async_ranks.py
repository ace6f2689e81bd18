"""Asynchronous scheduling on parallel ranks (gloo, CPU, fp32): tensor-parallel workers read the
pending tokens rank 0 shares, data-parallel groups agree on step n+1 while step n runs. With it on
and off, `LLM(tp=2)`, `LLM(dp=2, ep=2)` and `LLM(dp=2, tp=2, ep=4)` give the tokens of one
process, also when stop tokens end requests while their next step is in flight and when one
data-parallel group has no requests; seeded sampling under tp=2 gives the same tokens either
way; every rank process exits cleanly."""

from moeserve import LLM, SamplingParams
from tests.helpers import ENGINE, prompts_for


def mixed_params(path: str, prompts: list[list[int]], seeded: bool) -> list[SamplingParams]:
    """Greedy requests ended by a stop token the model emits at output position 3 (the step after
    it is already launched when it is seen); with `seeded`, every other request samples."""
    plain = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    first = [o.outputs[0].token_ids for o in LLM(path, **ENGINE).generate(prompts, plain)]
    params = []
    for i, tokens in enumerate(first):
        if seeded and i % 2:
            params.append(SamplingParams(temperature=0.9, top_k=20, seed=7 + i, max_tokens=8, ignore_eos=True))
        else:
            params.append(SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, stop_token_ids=[tokens[3]]))
    return params


def outputs(llm: LLM, prompts, params) -> list[tuple[list[int], str]]:
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in llm.generate(prompts, params)]


def run_parallel(path: str, calls, async_scheduling: bool, **parallel):
    """The outputs of each (prompts, params) call in turn, and the instance's stats at the end."""
    llm = LLM(path, async_scheduling=async_scheduling, **parallel, **ENGINE)
    try:
        got = [outputs(llm, prompts, params) for prompts, params in calls]
        stats = llm.stats
    finally:
        llm.shutdown()
    assert all(p.exitcode == 0 for p in llm.engine.procs)  # workers stopped with their rank 0, no hang
    return got, stats


def check_async_equals_sync(path: str, calls, **parallel) -> None:
    single = LLM(path, **ENGINE)
    expected = [outputs(single, prompts, params) for prompts, params in calls]
    overlapped, stats = run_parallel(path, calls, True, **parallel)
    synchronous, sync_stats = run_parallel(path, calls, False, **parallel)
    assert overlapped == expected
    assert synchronous == expected
    assert any(reason == "stop" for call in expected for _, reason in call)  # requests did end early
    assert stats.num_pending_inputs > 0 and sync_stats.num_pending_inputs == 0  # the overlap really ran
    assert stats.kv_blocks_used == 0


def test_tp2_async_equals_sync_and_single_process(deepseek_v3_dir):
    prompts = prompts_for(6)
    check_async_equals_sync(deepseek_v3_dir, [(prompts, mixed_params(deepseek_v3_dir, prompts, seeded=True))], tp=2)


def test_dp2_ep2_async_equals_sync_and_single_process(deepseek_v3_dir):
    prompts = prompts_for(7)
    params = mixed_params(deepseek_v3_dir, prompts, seeded=False)
    # The second call has one request: the other group idles (dummy batches) while its step is
    # in flight and after.
    check_async_equals_sync(deepseek_v3_dir, [(prompts, params), (prompts[:1], params[:1])], dp=2, ep=2)


def test_dp2_tp2_ep4_async_equals_sync_and_single_process(deepseek_v3_dir):
    path = deepseek_v3_dir
    prompts = prompts_for(5)
    params = mixed_params(path, prompts, seeded=False)
    check_async_equals_sync(path, [(prompts, params), (prompts[:1], params[:1])], dp=2, tp=2, ep=4)


def test_dp2_ep2_async_with_rebalances_equals_single_process(deepseek_v3_dir):
    """The balancer moves experts every 3 steps (collectives inside the step) while the next step
    is already scheduled: the placement changes between launched steps on every rank alike."""
    path = deepseek_v3_dir
    prompts = prompts_for(7)
    params = mixed_params(path, prompts, seeded=False)
    expected = outputs(LLM(path, **ENGINE), prompts, params)
    (got,), stats = run_parallel(path, [(prompts, params)], True, dp=2, ep=2, num_redundant_experts=2,
                                 eplb_interval=3, eplb_window=4)
    assert got == expected
    assert stats.num_rebalances > 0 and stats.num_pending_inputs > 0
