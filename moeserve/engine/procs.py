"""Starting engine-core processes, one per data-parallel rank, and routing requests to them.
Under tensor parallelism the ranks of a TP group after the first are workers (engine/tp.py):
they get no input socket; they push only errors to the output socket.

Used by the API server's engine client and by the offline LLM when dp > 1. The front end
binds one PUSH socket per rank and one PULL socket for every rank's outputs; the ranks connect.
On one node the sockets are IPC files; across nodes they are TCP ports next to the rendezvous
port of dist_init_addr (output on port + 1, rank r's input on port + 2 + r), so the ranks of
node R > 0, started by `moeserve serve --node-rank R` (headless), find node 0's front end.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import tempfile
import time
import uuid

from moeserve.config import EngineConfig
from moeserve.distributed.groups import free_port
from moeserve.engine.core_proc import run_engine_core
from moeserve.engine.tp import run_tp_worker

log = logging.getLogger(__name__)

# Stats that add up over ranks; the rest are recomputed from the sums.
_SUMMED = ("num_running", "num_waiting", "kv_blocks_used", "kv_blocks_free", "prefix_cache_queries",
           "prefix_cache_hits", "num_scheduled_tokens", "num_preemptions", "num_partial_prefills",
           "num_tokens_computed", "expert_bytes_moved", "num_pending_inputs")


def with_rendezvous(config: EngineConfig) -> EngineConfig:
    """A multi-rank config with dist_init_addr set (a free local port on one node)."""
    p = config.parallel
    if p.world_size == 1 or p.dist_init_addr:
        return config
    return dataclasses.replace(config, parallel=dataclasses.replace(p, dist_init_addr=f"127.0.0.1:{free_port()}"))


@dataclasses.dataclass
class Addresses:
    bind_inputs: list[str]
    bind_output: str
    inputs: list[str]  # what rank r connects to
    output: str


def addresses(config: EngineConfig) -> Addresses:
    """One input per engine core (data-parallel rank), one output for all."""
    p = config.parallel
    if p.nnodes == 1:
        folder, tag = tempfile.mkdtemp(prefix="moeserve-"), uuid.uuid4().hex[:8]
        inputs = [f"ipc://{folder}/in-{tag}-{r}" for r in range(p.dp)]
        output = f"ipc://{folder}/out-{tag}"
        return Addresses(inputs, output, inputs, output)
    host, port = p.dist_init_addr.rsplit(":", 1)
    port = int(port)
    return Addresses([f"tcp://*:{port + 2 + r}" for r in range(p.dp)], f"tcp://*:{port + 1}",
                     [f"tcp://{host}:{port + 2 + r}" for r in range(p.dp)], f"tcp://{host}:{port + 1}")


def local_ranks(config: EngineConfig) -> list[int]:
    p = config.parallel
    return list(range(p.node_rank * p.ranks_per_node, (p.node_rank + 1) * p.ranks_per_node))


def spawn_ranks(config: EngineConfig, addrs: Addresses, parent_pid: int) -> list[multiprocessing.Process]:
    """Start this node's engine-core processes (they connect to addrs): TP rank 0 of each
    data-parallel rank runs the engine core, other TP ranks run workers."""
    mp = multiprocessing.get_context("spawn")
    tp = config.parallel.tp
    procs = []
    for r in local_ranks(config):
        if r % tp == 0:
            proc = mp.Process(target=run_engine_core, name=f"moeserve-engine-{r}", daemon=True,
                              args=(config, addrs.inputs[r // tp], addrs.output, parent_pid, r))
        else:
            proc = mp.Process(target=run_tp_worker, name=f"moeserve-tp-worker-{r}", daemon=True,
                              args=(config, addrs.output, parent_pid, r))
        proc.start()
        procs.append(proc)
    return procs


def stop_processes(procs: list[multiprocessing.Process], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()


class RankRouter:
    """Which rank serves which request: the least loaded at arrival (requests in flight); the
    n samples of one request go to the same rank, so they share its prompt's KV blocks."""

    def __init__(self, world_size: int):
        self.load = [0] * world_size
        self.owner: dict[str, int] = {}  # engine request id -> rank
        self.parents: dict[str, list[int]] = {}  # parent request id -> [rank, children in flight]
        self.stats: dict[int, dict] = {}

    def assign(self, request_id: str) -> int:
        parent = self.parents.get(request_id.split("#", 1)[0])
        if parent is None:
            rank = min(range(len(self.load)), key=lambda r: (self.load[r], r))
            parent = self.parents[request_id.split("#", 1)[0]] = [rank, 0]
        parent[1] += 1
        self.owner[request_id] = parent[0]
        self.load[parent[0]] += 1
        return parent[0]

    def finished(self, request_id: str) -> None:
        rank = self.owner.pop(request_id, None)
        if rank is None:
            return
        self.load[rank] -= 1
        key = request_id.split("#", 1)[0]
        self.parents[key][1] -= 1
        if not self.parents[key][1]:
            del self.parents[key]

    def by_rank(self, request_ids: list[str]) -> dict[int, list[str]]:
        groups: dict[int, list[str]] = {}
        for rid in request_ids:
            if rid in self.owner:
                groups.setdefault(self.owner[rid], []).append(rid)
        return groups

    def merged_stats(self, stats: dict, rank: int) -> dict:
        """The instance's stats from the latest of each rank."""
        self.stats[rank] = stats
        if len(self.stats) == 1:
            return dict(stats)
        merged = {k: sum(s.get(k, 0) for s in self.stats.values()) for k in _SUMMED}
        merged["num_steps"] = max(s.get("num_steps", 0) for s in self.stats.values())
        merged["num_rebalances"] = max(s.get("num_rebalances", 0) for s in self.stats.values())
        total = merged["kv_blocks_used"] + merged["kv_blocks_free"]
        merged["kv_usage"] = merged["kv_blocks_used"] / total if total else 0.0
        q = merged["prefix_cache_queries"]
        merged["prefix_cache_hit_rate"] = merged["prefix_cache_hits"] / q if q else 0.0
        return merged


def run_headless(config: EngineConfig) -> int:
    """Node R > 0 of a multi-node instance: run this node's ranks until they exit (node 0's
    front end shuts them down; SIGTERM here stops them)."""
    procs = spawn_ranks(config, addresses(config), os.getpid())
    log.info("node %d: engine ranks %s started, serving node 0 at %s", config.parallel.node_rank,
             local_ranks(config), config.parallel.dist_init_addr)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(True))
    while any(p.is_alive() for p in procs) and not stopping:
        time.sleep(0.2)
    stop_processes(procs, 0 if stopping else 5)
    codes = [p.exitcode for p in procs]
    log.info("node %d: engine ranks exited with %s", config.parallel.node_rank, codes)
    return 0 if stopping or all(c == 0 for c in codes) else 1
