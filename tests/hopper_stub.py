"""Compile Triton kernels for a Hopper GPU (sm_90) on a machine without one; launch nothing.

Why: kernel edits made without device time should at least be known to lower to a cubin.
install() makes a stub driver the active Triton driver (it reports GPUTarget("cuda", 90, 32), so
the CUDA backend compiles with the bundled ptxas) and patches JITFunction.run to warmup=True, so
calling a kernel's wrapper with CPU tensors compiles the kernel (TTIR -> TTGIR -> LLVM -> PTX ->
cubin) and returns without a launch. Call it in a fresh process without TRITON_INTERPRET, before
any kernel is called; tests/kernels/test_compile_hopper.py does.

This leans on Triton's driver API (triton.backends.driver.DriverBase, driver.set_active) and on
JITFunction.run's signature, which are not stable interfaces: a Triton upgrade may need this
file adjusted (written against Triton 3.9).
"""

from __future__ import annotations

import torch
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

H200 = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}


class _Utils:
    def get_device_properties(self, device):
        return dict(H200)


class HopperStubDriver(DriverBase):
    """What JITFunction.run asks of the active driver on the compile path, answered as an H200 would."""

    @classmethod
    def is_active(cls):
        return True

    def __init__(self):
        self.utils = _Utils()

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty):
        return ty

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_benchmarker(self):
        raise NotImplementedError("no GPU: compile only")

    def get_device_interface(self):
        raise NotImplementedError("no GPU: compile only")

    def get_empty_cache_for_benchmark(self):
        raise NotImplementedError("no GPU: compile only")

    def clear_cache(self, cache):
        pass


def install(constexpr_overrides: dict | None = None) -> list[str]:
    """Activate the stub driver and make every kernel call compile-only. Returns the list that then
    gets the name of each kernel compiled to a cubin (once per call, in call order).

    constexpr_overrides: keyword arguments forced on every launch of a kernel that has them (the
    wrappers choose some CUDA-only paths from tensor.is_cuda, which is False for the CPU tensors used
    here, and pass PDL only on a Hopper GPU)."""
    driver.set_active(HopperStubDriver())
    compiled: list[str] = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        for key, value in (constexpr_overrides or {}).items():
            if key in kwargs or key in self.arg_names:
                kwargs[key] = value
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        if "cubin" not in kernel.asm:
            raise RuntimeError(f"{self.fn.__name__}: compiled, but no cubin")
        compiled.append(self.fn.__name__)
        return kernel

    JITFunction.run = compile_only
    return compiled
