"""The engine core in its own process, talking to the API server over two ZMQ sockets.

server -> engine (PUSH/PULL): ("add", [(request_id, prompt_token_ids, sampling params dict), ...]),
                              ("abort", [request_id, ...]), ("shutdown", None)
engine -> server (PUSH/PULL): ("ready", info), ("step", [EngineOutput, ...], stats),
                              ("error", message)
One "step" message carries every request's new tokens of one engine step, so streaming many
requests costs one socket message per step. The process exits when its parent dies, so the
engine never outlives the server.

With tensor parallelism this process is TP rank 0 and drives the other TP ranks (worker
processes, engine/tp.py) itself; the front end talks to it alone.
With data parallelism there is one such process per data-parallel group, each with its own
input socket, all pushing to the one output socket; under expert parallelism the groups step in
lockstep (engine/dp.py), so a group keeps stepping (and syncing) while any group has work, and
all stop together.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import logging
import os
import signal
import sys
import traceback

import msgspec
import zmq

from moeserve.config import EngineConfig
from moeserve.engine.output import EngineOutput
from moeserve.engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

ENCODER = msgspec.msgpack.Encoder()
DECODER = msgspec.msgpack.Decoder()
STEP_DECODER = msgspec.msgpack.Decoder(tuple[str, list[EngineOutput], dict])
IDLE_POLL_MS = 50  # how long an idle engine waits for input before checking on its parent
DP_IDLE_POLL_MS = 2  # idle data-parallel ranks meet every few ms, so a new request starts at once


def encode_add(requests: list[tuple[str, list[int], SamplingParams]]) -> bytes:
    return ENCODER.encode(("add", [(rid, ids, dataclasses.asdict(p)) for rid, ids, p in requests]))


def _set_parent_death_signal() -> None:
    """Linux: get SIGTERM when the parent dies (the poll below covers everything else)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start_rank_process() -> None:
    """First thing in a rank process: a Python traceback of every thread on a fatal signal (an
    abort inside a C++ library otherwise leaves only its one-line message), and SIGTERM when the
    parent dies (the parent poll in the loops covers everything else)."""
    faulthandler.enable()
    _set_parent_death_signal()


def exit_rank_process(code: int) -> None:
    """Last thing in a rank process, after it left its process groups and closed its sockets (their
    linger flushed what was queued): end now, without the interpreter's teardown. Our objects still
    hold the destroyed process groups, and their C++ destructors running during finalization can
    abort the process ("terminate called without an active exception", exit -6), turning a clean
    stop into a failed one; there is nothing left that finalization would need to do."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_engine_core(config: EngineConfig, input_addr: str, output_addr: str, parent_pid: int,
                    rank: int = 0) -> None:
    start_rank_process()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the server, which shuts us down
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s engine[{rank}] %(levelname)s %(message)s")
    ctx = zmq.Context()
    inp = ctx.socket(zmq.PULL)
    inp.connect(input_addr)
    out = ctx.socket(zmq.PUSH)
    out.setsockopt(zmq.LINGER, 2000)
    out.connect(output_addr)
    engine = None
    code = 0
    try:
        from moeserve.engine.core import EngineCore

        engine = EngineCore(config, rank=rank)
        out.send(ENCODER.encode(("ready", {
            "max_model_len": engine.max_model_len,
            "kv_capacity_tokens": engine.kv.num_usable_blocks * engine.kv.block_size,
            "num_blocks": engine.kv.num_usable_blocks,
            "vocab_size": engine.model_config.vocab_size,
            "pid": os.getpid(),
            "rank": rank,
        })))
        _loop(engine, inp, out, parent_pid)
    except Exception:
        msg = traceback.format_exc()
        log.error("engine core failed:\n%s", msg)
        out.send(ENCODER.encode(("error", msg)))
        code = 1
    finally:
        if engine is not None:
            engine.shutdown()
        inp.close(linger=0)
        out.close()
        ctx.term()
    exit_rank_process(code)


def _loop(engine, inp, out, parent_pid: int) -> None:
    poller = zmq.Poller()
    poller.register(inp, zmq.POLLIN)
    lockstep = engine.dp is not None
    busy = False  # under DP: did any rank run the last step
    while not engine.stopped:
        if parent_pid and os.getppid() != parent_pid:
            log.warning("parent process is gone; engine exits")
            if not lockstep:
                return
            engine.stop_requested = True  # the other ranks stop at the next sync too
        # Block only when there is nothing to run.
        timeout = 0 if engine.has_unfinished() or busy else (DP_IDLE_POLL_MS if lockstep else IDLE_POLL_MS)
        got_input = False
        while not engine.stop_requested and poller.poll(timeout):
            kind, payload = DECODER.decode(inp.recv())
            got_input = True
            timeout = 0
            if kind == "shutdown":
                if not lockstep:
                    return
                engine.stop_requested = True
                break
            rejected = _handle(engine, kind, payload)
            if rejected:
                out.send(ENCODER.encode(("step", rejected, dataclasses.asdict(engine.stats))))
        if lockstep:
            outputs = engine.step()  # every rank, every turn: the ranks meet here
            busy = engine.global_tokens > 0
        elif engine.has_unfinished():
            outputs = engine.step()
        else:
            engine.heartbeat()  # tensor-parallel workers wait on rank 0 with a deadline
            outputs = []
        if outputs or got_input:
            out.send(ENCODER.encode(("step", outputs, dataclasses.asdict(engine.stats))))


def _handle(engine, kind: str, payload) -> list[EngineOutput]:
    rejected = []
    if kind == "add":
        for rid, ids, params in payload:
            try:
                engine.add_request(rid, ids, SamplingParams(**params))
            except (ValueError, TypeError) as e:  # validated by the server already; never fatal here
                rejected.append(EngineOutput(rid, [], finish_reason="abort", stop_reason=f"rejected: {e}"))
    elif kind == "abort":
        engine.abort_requests(payload)
    else:
        log.error("unknown message %r", kind)
    return rejected
