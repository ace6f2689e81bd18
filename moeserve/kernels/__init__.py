"""Compute kernels. Each module holds a fast kernel (Triton, GPU) beside a plain-torch
reference of the same name with a `_ref` suffix; the un-suffixed name dispatches to the
fast one where it can run and to the reference otherwise.

Arguments that change from step to step (token, row and pair counts, split counts, the width of
a step's block table) are listed in `do_not_specialize`: Triton otherwise compiles one variant per
value class of each integer (== 1, divisible by 16), so a serving engine met new variants long
after its warm-up, mid-traffic, and stalled for the compile (seconds on a 2x H200 EP run: see
docs/perf/ep.md). Sizes fixed by the model (hidden, heads, other strides) stay specialized.

The decode step's kernels launch with programmatic dependent launch on Hopper and later
(kernels/pdl.py): each waits for its predecessor at its start and lets its successor launch at
once, so the next grid is resident before this one ends."""
