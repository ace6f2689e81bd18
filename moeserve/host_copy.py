"""Host -> device uploads that do not make the host wait for the GPU.

A copy from pageable host memory first waits for the work already queued on the stream, so
with a step in flight every small `torch.tensor(..., device="cuda")` would stall the host
until that step is done. Staging through pinned memory (torch's caching host allocator keeps
the buffer alive until the copy has run) lets the copy queue behind the step instead.
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(values, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """values: a list, numpy array or CPU tensor."""
    t = torch.as_tensor(values, dtype=dtype)
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_host(t: torch.Tensor) -> torch.Tensor:
    """Start copying a device tensor to pinned host memory (record an event to know when it is there)."""
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def upload_int64(*arrays, device: torch.device | str) -> list[torch.Tensor]:
    """Int sequences -> int64 tensors on `device`, views of one upload. Each starts 16 bytes aligned:
    Triton specializes a pointer argument on 16-byte alignment, so a view at an odd int64 offset (the
    positions after an odd number of input ids) would run another compiled variant of every kernel
    reading it, one that no warm-up compiled."""
    parts, spans, start = [], [], 0
    for a in arrays:
        a = np.asarray(a, dtype=np.int64).reshape(-1)
        pad = -len(a) % 2
        parts += [a, np.zeros(pad, dtype=np.int64)]
        spans.append((start, len(a)))
        start += len(a) + pad
    up = to_device(np.concatenate(parts), torch.int64, device)
    return [up[s:s + n] for s, n in spans]
