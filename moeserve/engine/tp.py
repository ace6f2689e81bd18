"""Tensor parallelism in the engine: TP rank 0 is the engine core, ranks 1..tp-1 are workers.

Rank 0 owns the scheduler and the KV block manager. Each step it packs the flat batch it built
into one int64 tensor and broadcasts it over a CPU (gloo) group: a fixed header, then the
payload (both below). Every rank runs the same forward on its shard of the weights (the layers'
all_reduces and the logits' all_gather run over the TP group, NCCL on GPU); rank 0 alone
samples. The workers hold no scheduler state at all.

Wire format, all int64 (t tokens, n sequences, w block-table width, s sampled rows, f pending):
  header  [kind, t, n, w, s, graph size (0: eager), EP max tokens, f, share, 0]   (HEADER values)
  payload ids[t] positions[t] query_lens[n] seq_lens[n] tables[n*w] sample_rows[s]
          fix_rows[f] fix_sources[f]                       (none for a dummy batch or NOOP/STOP)
Asynchronous scheduling (share = 1): right after sampling, rank 0 broadcasts the step's s sampled
tokens over the TP data group (NCCL on GPU: queued on the stream, no host wait; gloo on CPU) and
every worker receives them into a device tensor. The next step's ids then hold placeholders at
fix_rows, filled on the device from rows fix_sources of the latest shared token tensor (a
decode whose input token was sampled by the step still in flight).

Under data parallelism there is one such TP group per data-parallel rank (engine/dp.py); an idle
group's rank 0 sends its workers the empty batch (the dummy forward that joins the other groups'
MoE collectives).

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
HEADER = 10  # kind, tokens, sequences, block-table width, sampled rows, graph size, EP max tokens,
#              pending-token fixups, share sampled tokens, 0
HEARTBEAT_S = 1.0


class StepBatch:
    """The flat batch of one step, as the runner forwards it (host lists). No ids: the dummy
    forward of an idle data-parallel group. ep_max: under expert parallelism, the most tokens
    any data-parallel group runs this step (it picks the dispatch kernel on every rank alike).
    fix_rows / fix_sources: placeholder rows of ids and the rows of the previous sampled-token
    tensor that fill them (asynchronous scheduling); share_tokens: rank 0 broadcasts this step's
    sampled tokens to the workers after sampling."""

    __slots__ = ("ids", "positions", "query_lens", "seq_lens", "tables", "sample_rows", "graph_size", "ep_max",
                 "fix_rows", "fix_sources", "share_tokens")

    def __init__(self, ids, positions, query_lens, seq_lens, tables, sample_rows, graph_size=None, ep_max=0,
                 fix_rows=(), fix_sources=(), share_tokens=False):
        self.ids, self.positions, self.query_lens, self.seq_lens = ids, positions, query_lens, seq_lens
        self.tables, self.sample_rows, self.graph_size, self.ep_max = tables, sample_rows, graph_size, ep_max
        self.fix_rows, self.fix_sources, self.share_tokens = list(fix_rows), list(fix_sources), share_tokens

    @classmethod
    def dummy(cls, graph_size: int | None = None, ep_max: int = 0) -> "StepBatch":
        return cls([], [], [], [], [], [], graph_size, ep_max)


def _payload_len(t: int, n: int, width: int, s: int, f: int) -> int:
    return 2 * t + 2 * n + n * width + s + 2 * f


class TPChannel:
    """Rank 0 -> workers, one broadcast of a header and one of a payload per step. `group` is the
    TP group's control group; ranks are the group's own (rank 0 is the data-parallel group's
    engine core, whatever its global rank)."""

    def __init__(self, group, rank: int, tp: int, data_group=None):
        self.group, self.rank, self.tp = group, rank, tp
        self.data_group = data_group if data_group is not None else group  # sampled tokens go here
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
        t, n, s, f = len(b.ids), len(b.query_lens), len(b.sample_rows), len(b.fix_rows)
        width = max((len(x) for x in b.tables), default=0)
        self._send_header(STEP, t, n, width, s, b.graph_size or 0, b.ep_max, f, int(b.share_tokens))
        payload = np.zeros(_payload_len(t, n, width, s, f), dtype=np.int64)
        payload[:t] = b.ids
        payload[t:2 * t] = b.positions
        payload[2 * t:2 * t + n] = b.query_lens
        payload[2 * t + n:2 * t + 2 * n] = b.seq_lens
        tables = payload[2 * t + 2 * n:2 * t + 2 * n + n * width].reshape(n, width)
        for i, table in enumerate(b.tables):
            tables[i, :len(table)] = table
        end = 2 * t + 2 * n + n * width
        payload[end:end + s] = b.sample_rows
        payload[end + s:end + s + f] = b.fix_rows
        payload[end + s + f:] = b.fix_sources
        if len(payload):  # a dummy batch is the header alone
            dist.broadcast(torch.from_numpy(payload), group=self.group, group_src=0)

    def share_tokens(self, tokens: torch.Tensor) -> None:
        """Rank 0, after sampling a step sent with share_tokens: its sampled tokens (int64, one per
        sampled row) to every worker. On NCCL this is queued on the stream; the host goes on."""
        dist.broadcast(tokens, group=self.data_group, group_src=0)

    def recv_tokens(self, num: int, device: torch.device) -> torch.Tensor:
        """A worker's side of share_tokens."""
        tokens = torch.empty(num, dtype=torch.int64, device=device)
        dist.broadcast(tokens, group=self.data_group, group_src=0)
        return tokens

    def heartbeat(self) -> None:
        if time.monotonic() - self.last_send >= HEARTBEAT_S:
            self._send_header(NOOP)

    def stop(self) -> None:
        self._send_header(STOP)

    def recv(self) -> tuple[int, StepBatch | None]:
        header = self._header
        dist.broadcast(header, group=self.group, group_src=0)
        kind, t, n, width, s, graph_size, ep_max, f, share = header[:9].tolist()
        if kind != STEP:
            return kind, None
        payload = torch.empty(_payload_len(t, n, width, s, f), dtype=torch.int64)
        if len(payload):
            dist.broadcast(payload, group=self.group, group_src=0)
        p = payload.numpy()
        end = 2 * t + 2 * n + n * width
        tables = p[2 * t + 2 * n:end].reshape(n, width).tolist()
        return STEP, StepBatch(p[:t].tolist(), p[t:2 * t].tolist(), p[2 * t:2 * t + n].tolist(),
                               p[2 * t + n:2 * t + 2 * n].tolist(), tables, p[end:end + s].tolist(),
                               graph_size or None, ep_max, p[end + s:end + s + f].tolist(),
                               p[end + s + f:].tolist(), bool(share))

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
                runner.worker_step(batch)
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
