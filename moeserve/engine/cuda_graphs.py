"""CUDA graphs for decode steps: captured once per batch size of a ladder, replayed with the
step's inputs copied into static buffers (the model runner decides when a step can use one)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from moeserve.engine.step_io import TokenFixup
from moeserve.host_copy import to_device
from moeserve.layers.attention import AttentionMetadata

log = logging.getLogger(__name__)


class CudaGraphs:
    """Decode-only steps replayed from CUDA graphs captured at a ladder of batch sizes.

    A batch of B decodes runs the graph of the smallest captured size >= B; the padding rows
    write their KV into scratch block 0 and attend to one slot of it, and their outputs are
    dropped. Every graph reads its inputs from the same static buffers.
    """

    def __init__(self, model, device: torch.device, max_num_seqs: int, max_blocks_per_seq: int, block_size: int,
                 ep_runtime=None):
        self.model, self.device, self.block_size = model, device, block_size
        self.ep_runtime = ep_runtime
        top = min(max_num_seqs, 512)
        if ep_runtime is not None:
            top = min(top, ep_runtime.graph_capacity())
        self.sizes = sorted({s for s in [1, 2, 4] + list(range(8, top + 1, 8)) if s <= top} | {top})
        n = self.sizes[-1]
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.zeros(n, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, **i32)
        self.seq_lens = torch.ones(n, **i32)
        self.outputs: dict[int, torch.Tensor] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._capture()

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(self.slot_mapping[:bs], self.block_tables[:bs], self.seq_lens[:bs], [1] * bs,
                                 [1] * bs, bs)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for bs in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
                if self.ep_runtime is not None:  # every rank captures the same sizes in the same order
                    self.ep_runtime.dispatcher.step_backend = "ll"
                for _ in range(2):  # warm up: Triton compiles and autotunes outside the capture
                    self.model(self.input_ids[:bs], self.positions[:bs], self._meta(bs))
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self.outputs[bs] = self.model(self.input_ids[:bs], self.positions[:bs], self._meta(bs))
                self.graphs[bs] = graph
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        log.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def can_run(self, query_lens: list[int]) -> bool:
        return len(query_lens) <= self.sizes[-1] and all(q == 1 for q in query_lens)

    def size_for(self, num_seqs: int) -> int:
        return next(s for s in self.sizes if s >= max(num_seqs, 1))

    def run(self, ids: list[int], positions: list[int], seq_lens: list[int], tables: list[list[int]],
            bs: int | None = None, fixup: TokenFixup | None = None) -> torch.Tensor:
        """Replay the graph of size bs (default: the smallest that fits); rows past len(ids) are padding
        (under expert parallelism every rank replays the size the ranks agreed on, possibly all padding).
        The inputs go up in one pinned copy, so nothing here waits for a step still in flight."""
        b = len(ids)
        bs = bs or self.size_for(b)
        width = self.block_tables.shape[1]
        packed = np.zeros((4 + width) * bs, dtype=np.int64)  # ids, positions, seq lens, slots, tables
        packed[:b] = ids
        packed[bs:bs + b] = positions
        packed[2 * bs:3 * bs] = 1
        packed[2 * bs:2 * bs + b] = seq_lens
        bt = packed[4 * bs:].reshape(bs, width)
        for i, (table, n) in enumerate(zip(tables, seq_lens)):
            bt[i, :len(table)] = table
            packed[3 * bs + i] = table[(n - 1) // self.block_size] * self.block_size + (n - 1) % self.block_size
        up = to_device(packed, torch.int64, self.device)
        self.input_ids[:bs].copy_(up[:bs])
        self.positions[:bs].copy_(up[bs:2 * bs])
        self.seq_lens[:bs].copy_(up[2 * bs:3 * bs])
        self.slot_mapping[:bs].copy_(up[3 * bs:4 * bs])
        self.block_tables[:bs].copy_(up[4 * bs:].view(bs, width))
        if fixup is not None:
            fixup.apply(self.input_ids)
        self.graphs[bs].replay()
        return self.outputs[bs][:b]
