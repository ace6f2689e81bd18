"""Greedy sampling's chunked argmax against torch.argmax: under the Triton interpreter on CPU (fp32 and
fp16, in a child process: TRITON_INTERPRET=1 must be set before triton is imported) and on a GPU
(skipped without one). The token must be exactly torch's: the first index of the row's maximum, also
when the maximum repeats inside one chunk and across chunks."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import interpreter_results as run_interpreted
from tests.helpers import print_interpreter_cases

CASES = {  # name: (rows, vocab, dtype, ties: where to plant copies of the maximum)
    "v2lite_vocab_batch1": (1, 102400, "fp32", None),
    "batch5_odd_vocab": (5, 10007, "fp32", None),
    "short_vocab": (3, 100, "fp32", None),
    "ties_in_one_chunk": (2, 9000, "fp32", (10, 20)),
    "ties_across_chunks": (4, 20000, "fp32", (9000, 300, 15000)),
    "fp16_logits": (6, 5000, "fp16", (4097,)),
    "all_minus_inf": (2, 5000, "fp32", "inf"),
    "no_rows": (0, 5000, "fp32", None),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def logits_for(rows, vocab, dtype, ties, device="cpu") -> torch.Tensor:
    x = torch.randn(rows, vocab).to(dtype)
    if ties == "inf":
        x.fill_(float("-inf"))
    elif ties:
        for col in ties:
            x[:, col] = 10.0  # above every N(0, 1) draw: the first planted column must win
    return x.to(device)


def mismatches(rows, vocab, dtype, ties, device="cpu") -> int:
    from moeserve.kernels.argmax import greedy_argmax_triton

    x = logits_for(rows, vocab, dtype, ties, device)
    out = greedy_argmax_triton(x)
    assert out.dtype == torch.int64 and out.shape == (rows,)
    return int((out != x.argmax(dim=-1)).sum())


def _interpreter_cases() -> dict:
    return {name: mismatches(*args[:2], DTYPES[args[2]], args[3]) for name, args in CASES.items()}


@pytest.fixture(scope="module")
def interpreter_results():
    return run_interpreted(__file__)


@pytest.mark.parametrize("case", list(CASES))
def test_chunked_argmax_is_torch_argmax(interpreter_results, case):
    assert interpreter_results[case] == 0, f"{case}: tokens differ (seed {interpreter_results['seed']})"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_argmax_on_gpu(case):
    rows, vocab, dtype, ties = CASES[case]
    assert mismatches(rows, vocab, DTYPES[dtype], ties, "cuda") == 0
    assert mismatches(rows, vocab, torch.bfloat16, ties, "cuda") == 0


if __name__ == "__main__":
    print_interpreter_cases(_interpreter_cases)
