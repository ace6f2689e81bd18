"""moe_align_block_size: both Triton paths (one launch of a program per expert up to moe_align.one_launch's
bound on experts x pairs, three launches above) against moe_align_block_size_ref, bit for bit: all of
sorted_ids (the reference fills the slots past num_padded with the sentinel too), block_expert (-1 past the
end) and num_padded. The kernels run under the interpreter (TRITON_INTERPRET=1) in a child process.
"""

from __future__ import annotations

import pytest
import torch

from moeserve.kernels import moe_align
from tests.helpers import interpreter_results as run_interpreted
from tests.helpers import print_interpreter_cases


def _routed(tokens: int, experts: int, top_k: int, pool: int | None = None) -> torch.Tensor:
    """top_k distinct experts per token; with pool > experts, ids drawn from pool and those >= experts
    become -1 (experts on other ranks)."""
    ids = torch.rand(tokens, pool or experts).topk(top_k, dim=1).indices
    return torch.where(ids < experts, ids, -1)


def _cases():
    """name -> (topk_ids, block_m, num_experts, paths): paths the case runs besides the dispatch."""
    both = moe_align.PATHS  # every path, whatever the dispatch would take
    return {
        "1_pair": (torch.randint(0, 64, (1, 1)), 16, 64, both),
        "6_pairs": (_routed(1, 64, 6), 16, 64, both),  # V2-Lite batch 1
        "6_pairs_some_dropped": (torch.tensor([[3, -1, 60, 3, -1, 0]]), 16, 64, both),
        "384_pairs_64_experts": (_routed(64, 64, 6), 16, 64, both),  # V2-Lite batch 64
        "512_pairs_66_experts": (_routed(64, 66, 8), 32, 66, both),  # + 2 shared-expert slots
        "512_pairs_66_experts_bm64": (_routed(64, 66, 8), 64, 66, both),
        "ep_local_ids": (_routed(96, 32, 8, pool=256), 16, 32, both),  # 7/8 of the ids are -1
        "random_ids_with_repeats": (torch.randint(-1, 20, (50, 7)), 16, 20, both),
        "one_expert_only": (torch.full((48, 4), 5), 64, 64, both),  # a run of 3 blocks, 63 experts empty
        "one_expert_last": (torch.full((9, 2), 65), 16, 66, both),
        "all_dropped": (torch.full((7, 2), -1), 32, 8, both),
        "no_pairs": (torch.zeros(0, 6, dtype=torch.long), 16, 64, both),
        "ids_past_num_experts": (torch.randint(-3, 12, (30, 3)), 16, 8, both),  # >= E dropped as the ref does
        "4096_pairs_66_experts": (torch.randint(-1, 66, (512, 8)), 16, 66, both),
        "2048_pairs_256_experts": (torch.randint(-1, 256, (256, 8)), 64, 256, both),
        "above_bound_256_experts": (torch.randint(-1, 256, (257, 8)), 16, 256, ("three_pass",)),
        "above_bound_1024_experts": (torch.randint(-1, 1024, (300, 2)), 64, 1024, ("three_pass",)),  # 1024 x 1024
    }


# ---- child process: the cases under the interpreter -----------------------------------------

def _interpreter_cases() -> dict:
    """name -> {path: mismatching elements}, and which kernel the dispatch ran for each case."""
    class Spy:  # counts launches of a kernel
        def __init__(self, kernel):
            self.kernel, self.launches = kernel, 0

        def __getitem__(self, grid):
            self.launches += 1
            return self.kernel[grid]

    def mismatches(ref, out) -> int:
        bad = sum(a.shape != b.shape for a, b in zip(ref, out))
        return bad + sum(int((a != b).sum()) for a, b in zip(ref, out) if a.shape == b.shape)

    spy = moe_align._align_per_expert_kernel = Spy(moe_align._align_per_expert_kernel)
    results = {}
    for name, (ids, block_m, experts, paths) in _cases().items():
        ref = moe_align.moe_align_block_size_ref(ids, block_m, experts)
        res = {}
        for path in paths:
            res[path] = mismatches(ref, moe_align.moe_align_block_size_triton(ids, block_m, experts, path=path))
        before = spy.launches
        res["dispatch"] = mismatches(ref, moe_align.moe_align_block_size_triton(ids, block_m, experts))
        res["dispatch_one_launch"] = spy.launches > before
        results[name] = res
    return results


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreted(__file__, timeout_s=300)


@pytest.mark.parametrize("case", list(_cases()))
def test_triton_matches_reference(interpreter_results, case):
    res = interpreter_results[case]
    bad = {path: n for path, n in res.items() if path != "dispatch_one_launch" and n}
    assert not bad, f"{case}: mismatching elements {bad} (seed {interpreter_results['seed']})"


def test_dispatch_bound(interpreter_results):
    assert moe_align.one_launch(128 * 10, 66) and moe_align.one_launch(128 * 9, 257)  # decode batches of 128
    assert moe_align.one_launch(8192, 66) and not moe_align.one_launch(257 * 8, 256)  # where it was measured
    assert not moe_align.one_launch(8193, 8)  # few experts: the pairs a program holds are capped too
    for name, (ids, _block_m, experts, _paths) in _cases().items():
        expect = moe_align.one_launch(ids.numel(), experts)
        assert interpreter_results[name]["dispatch_one_launch"] == expect, name


def test_ref_keeps_pair_order_within_expert():
    # The GEMM reads a block's pairs in slot order; both paths reproduce the reference's ascending
    # pair order within an expert (the stable sort), which this pins down on the reference itself.
    ids = torch.randint(-1, 6, (40, 3))
    sorted_ids, block_expert, num_padded = moe_align.moe_align_block_size_ref(ids, 16, 6)
    used = sorted_ids[:int(num_padded)]
    slot_expert = block_expert[:int(num_padded) // 16].repeat_interleave(16)
    for e in range(6):
        pairs = used[(slot_expert == e) & (used < ids.numel())]
        assert pairs.tolist() == sorted(pairs.tolist())
        assert pairs.tolist() == (ids.reshape(-1) == e).nonzero().reshape(-1).tolist()


if __name__ == "__main__":
    print_interpreter_cases(_interpreter_cases)
