"""Tensor parallelism in the engine: TP rank 0 is the engine core, ranks 1..tp-1 are workers.

Rank 0 owns the scheduler and the KV block manager. Each step it packs the flat batch it built
(input ids, positions, query and sequence lengths, block tables, rows to sample, the CUDA graph
size, and under expert parallelism the most tokens any data-parallel group runs this step) into
one int64 tensor and broadcasts it over a CPU (gloo) group: a fixed 8-value header, then the
payload. Every rank runs the same forward on its shard of the weights (the layers' all_reduces
and the logits' all_gather run over the TP group, NCCL on GPU); rank 0 alone samples. The
workers hold no scheduler state at all. Under data parallelism there is one such TP group per
data-parallel rank (engine/dp.py); an idle group's rank 0 sends its workers the empty batch
(the dummy forward that joins the other groups' MoE collectives).

When rank 0 is idle it sends a heartbeat at least every HEARTBEAT_S, so a worker's wait has a
deadline (the group's timeout, dist_timeout_s) and still never fires while the instance is
idle. A worker exits on STOP (rank 0 shuts down), when rank 0's connection drops (gloo raises),
or when its parent process dies (SIGTERM); an error on a worker goes to the front end's output
socket as ("error", traceback), so LLM / the server report it.
"""

from __future__ import annotations

import logging
import os
import signal
import time
import traceback

import numpy as np
import torch
import torch.distributed as dist

from moeserve.config import EngineConfig, ModelConfig

log = logging.getLogger(__name__)

STEP, NOOP, STOP = 1, 2, 3
HEADER = 8  # kind, tokens, sequences, block-table width, sampled rows, graph size, EP max tokens, 0
HEARTBEAT_S = 1.0


class StepBatch:
    """The flat batch of one step, as the runner forwards it (host lists). No ids: the dummy
    forward of an idle data-parallel group. ep_max: under expert parallelism, the most tokens
    any data-parallel group runs this step (it picks the dispatch kernel on every rank alike)."""

    __slots__ = ("ids", "positions", "query_lens", "seq_lens", "tables", "sample_rows", "graph_size", "ep_max")

    def __init__(self, ids, positions, query_lens, seq_lens, tables, sample_rows, graph_size=None, ep_max=0):
        self.ids, self.positions, self.query_lens, self.seq_lens = ids, positions, query_lens, seq_lens
        self.tables, self.sample_rows, self.graph_size, self.ep_max = tables, sample_rows, graph_size, ep_max

    @classmethod
    def dummy(cls, graph_size: int | None = None, ep_max: int = 0) -> "StepBatch":
        return cls([], [], [], [], [], [], graph_size, ep_max)


class TPChannel:
    """Rank 0 -> workers, one broadcast of a header and one of a payload per step. `group` is the
    TP group's control group; ranks are the group's own (rank 0 is the data-parallel group's
    engine core, whatever its global rank)."""

    def __init__(self, group, rank: int, tp: int):
        self.group, self.rank, self.tp = group, rank, tp
        self.last_send = time.monotonic()
        self._header = torch.zeros(HEADER, dtype=torch.int64)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def _send_header(self, *values: int) -> None:
        header = self._header
        header.zero_()
        header[: len(values)] = torch.tensor(values, dtype=torch.int64)
        dist.broadcast(header, group=self.group, group_src=0)
        self.last_send = time.monotonic()

    def send_step(self, b: StepBatch) -> None:
        t, n = len(b.ids), len(b.query_lens)
        width = max((len(x) for x in b.tables), default=0)
        s = len(b.sample_rows)
        self._send_header(STEP, t, n, width, s, b.graph_size or 0, b.ep_max)
        payload = np.zeros(2 * t + 2 * n + n * width + s, dtype=np.int64)
        payload[:t] = b.ids
        payload[t:2 * t] = b.positions
        payload[2 * t:2 * t + n] = b.query_lens
        payload[2 * t + n:2 * t + 2 * n] = b.seq_lens
        tables = payload[2 * t + 2 * n:2 * t + 2 * n + n * width].reshape(n, width)
        for i, table in enumerate(b.tables):
            tables[i, :len(table)] = table
        payload[len(payload) - s:] = b.sample_rows
        if len(payload):  # a dummy batch is the header alone
            dist.broadcast(torch.from_numpy(payload), group=self.group, group_src=0)

    def heartbeat(self) -> None:
        if time.monotonic() - self.last_send >= HEARTBEAT_S:
            self._send_header(NOOP)

    def stop(self) -> None:
        self._send_header(STOP)

    def recv(self) -> tuple[int, StepBatch | None]:
        header = self._header
        dist.broadcast(header, group=self.group, group_src=0)
        kind, t, n, width, s, graph_size, ep_max = header[:7].tolist()
        if kind != STEP:
            return kind, None
        payload = torch.empty(2 * t + 2 * n + n * width + s, dtype=torch.int64)
        if len(payload):
            dist.broadcast(payload, group=self.group, group_src=0)
        p = payload.numpy()
        tables = p[2 * t + 2 * n:2 * t + 2 * n + n * width].reshape(n, width).tolist()
        return STEP, StepBatch(p[:t].tolist(), p[t:2 * t].tolist(), p[2 * t:2 * t + n].tolist(),
                               p[2 * t + n:2 * t + 2 * n].tolist(), tables, p[len(p) - s:].tolist(),
                               graph_size or None, ep_max)

    def min_over_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t[0])


def run_tp_worker(config: EngineConfig, output_addr: str, parent_pid: int, rank: int) -> None:
    """TP ranks 1..tp-1: build this rank's shard of the model and KV cache, then run every step
    rank 0 broadcasts until it says STOP."""
    import msgspec
    import zmq

    from moeserve.engine.core_proc import exit_rank_process, start_rank_process
    from moeserve.engine.dp import setup_rank, teardown_rank
    from moeserve.engine.runner import ModelRunner

    start_rank_process()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-worker[{rank}] %(levelname)s %(message)s")
    ctx = zmq.Context()
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.LINGER, 2000)
    out.connect(output_addr)
    code = 0
    try:
        model_config = ModelConfig.from_pretrained(config.model)
        channel = setup_rank(config, model_config, rank).tp_channel
        torch.manual_seed(config.seed)
        runner = ModelRunner(config, model_config, tp_channel=channel)
        steps = 0
        while True:
            if parent_pid and os.getppid() != parent_pid:
                log.warning("parent process is gone; worker exits")
                break
            kind, batch = channel.recv()
            if kind == STOP:
                break
            if kind == STEP:
                runner.forward_step(batch)
                steps += 1
        log.info("tensor-parallel worker %d stops after %d steps", rank, steps)
    except Exception:
        msg = traceback.format_exc()
        log.error("tensor-parallel worker failed:\n%s", msg)
        out.send(msgspec.msgpack.encode(("error", f"tensor-parallel rank {rank}:\n{msg}")))
        code = 1
    finally:
        teardown_rank()
        out.close()
        ctx.term()
    exit_rank_process(code)
