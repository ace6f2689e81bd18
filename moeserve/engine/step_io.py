"""A step's inputs and outputs that live on the device under asynchronous scheduling: the
sampled tokens of a launched step on their way to the host (SampledStep), and the next step's
input ids that are those tokens, written in on the device (TokenFixup)."""

from __future__ import annotations

import torch

from moeserve.host_copy import to_host, upload_int64
from moeserve.layers.sampler import LogprobTensors, format_logprobs


class TokenFixup:
    """Input ids that are still on the GPU (asynchronous scheduling): the tokens the step in
    flight samples. The batch carries a placeholder at `rows`; apply() writes them there."""

    def __init__(self, rows: list[int], source: torch.Tensor, source_rows: list[int]):
        self.rows, source_idx = upload_int64(rows, source_rows, device=source.device)
        self.values = source[source_idx]

    def apply(self, input_ids: torch.Tensor) -> None:
        input_ids.index_copy_(0, self.rows, self.values)


class SampledStep:
    """One step's sampled tokens on their way to the host. `launch` returns it as soon as the
    step's GPU work is queued and the copy to pinned memory is started; result() waits for it.
    The next step, scheduled while this one runs, reads its inputs from `tokens` on the device."""

    def __init__(self, request_ids: list[str], tokens: torch.Tensor | None, logprobs: LogprobTensors | None,
                 num_logprobs: list[int | None]):
        self.request_ids, self.tokens, self.num_logprobs = request_ids, tokens, num_logprobs
        self.row_of = {rid: i for i, rid in enumerate(request_ids)}
        self._tokens = to_host(tokens) if tokens is not None else None
        self._logprobs = None if logprobs is None else LogprobTensors(
            to_host(logprobs.chosen), to_host(logprobs.top_values), to_host(logprobs.top_ids))
        self._event = None
        if tokens is not None and tokens.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()

    def result(self) -> dict[str, tuple[int, object]]:
        """request id -> (sampled token, logprobs or None); waits for this step's GPU work."""
        if self._tokens is None:
            return {}
        if self._event is not None:
            self._event.synchronize()
        logprobs = format_logprobs(self._logprobs, self.num_logprobs)
        return {rid: (t, lp) for rid, t, lp in zip(self.request_ids, self._tokens.tolist(), logprobs)}
