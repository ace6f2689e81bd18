"""Compute kernels. Each module holds a fast kernel (Triton, GPU) beside a plain-torch
reference of the same name with a `_ref` suffix; the un-suffixed name dispatches to the
fast one where it can run and to the reference otherwise."""
