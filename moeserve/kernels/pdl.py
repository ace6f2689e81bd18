"""Programmatic dependent launch (PDL, Hopper and later) for the decode step's Triton kernels.

A decode step at small batch is a chain of ~16 short kernels a layer, and the GPU spends part of
each boundary launching the next grid after the previous one has drained. With PDL a kernel is
launched with `launch_pdl=True` and may start while its predecessor still runs: each kernel
here first waits for the previous grid to complete with its writes visible (griddepcontrol.wait,
so no kernel ever reads or writes before its predecessor is done), then at once lets its own
successor launch (griddepcontrol.launch_dependents). The successor's blocks are then resident and
waiting by the time this kernel ends. The successor launches only once every block of this grid
has started, so the waiting blocks never take a slot this grid still needs. CUDA graphs capture
the launches as programmatic edges.

Kernels take `PDL: tl.constexpr` (False compiles the instructions out: the CPU interpreter, GPUs
before sm_90) and call `pdl_begin(PDL)` first; launch sites pass `**pdl_launch(device)`.
MOESERVE_PDL=0 turns it off.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - installs without triton
    triton = None
try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - a Triton without grid dependency control: no PDL
    gdc_wait = None


@functools.lru_cache(maxsize=None)
def pdl_enabled(device: torch.device) -> bool:
    if device.type != "cuda" or os.environ.get("MOESERVE_PDL", "1") == "0" or gdc_wait is None:
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0) and torch.version.cuda is not None


def pdl_launch(device: torch.device) -> dict:
    """Launch arguments of a PDL-aware kernel on this device."""
    return {"PDL": True, "launch_pdl": True} if pdl_enabled(device) else {}


if triton is not None and gdc_wait is not None:

    @triton.jit
    def pdl_begin(PDL: tl.constexpr):
        if PDL:
            gdc_wait()
            gdc_launch_dependents()

    @triton.jit
    def pdl_begin_no_wait(PDL: tl.constexpr):
        # Only lets the successor launch: for a kernel that waits on finer-grained flags of its
        # predecessor itself (the fused MoE's down GEMM, per block of rows), so it overlaps the
        # predecessor's tail. What earlier kernels wrote is complete (the predecessor waited for
        # them before it let this one launch); what the predecessor writes, it may read only behind
        # those flags.
        if PDL:
            gdc_launch_dependents()

elif triton is not None:  # pragma: no cover - never launched with PDL (pdl_enabled is False)

    @triton.jit
    def pdl_begin(PDL: tl.constexpr):
        pass

    @triton.jit
    def pdl_begin_no_wait(PDL: tl.constexpr):
        pass
