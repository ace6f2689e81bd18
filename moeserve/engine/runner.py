"""The model runner: owns the model and the KV cache tensors, turns a scheduled step into one
flat variable-length batch (no padding), runs the forward and samples.

On GPU the KV cache is sized from the memory left after a profiling forward of the largest
step (`gpu_memory_utilization`); on CPU from `num_blocks` or `cpu_kv_cache_mb`.

Under tensor parallelism (engine/tp.py) every TP rank has a runner over its shard of the model;
rank 0's `launch` broadcasts each step's flat batch and the workers run `worker_step` on it (with
asynchronous scheduling rank 0 also shares each step's sampled tokens, which the workers' next
step may read on the device).
All ranks of a TP group size the KV cache alike: the fewest blocks any of them has room for.
"""

from __future__ import annotations

import logging
import time

import torch

try:
    import triton
except ImportError:  # CPU-only installs
    triton = None

from moeserve.config import EngineConfig, ModelConfig, default_block_size, resolve_dtype
from moeserve.distributed.groups import get_parallel_state, ranks_on_gpu
from moeserve.engine.cuda_graphs import CudaGraphs
from moeserve.engine.request import Request
from moeserve.engine.scheduler import SchedulerOutput
from moeserve.engine.step_io import SampledStep, TokenFixup
from moeserve.engine.tp import StepBatch, TPChannel
from moeserve.host_copy import to_device, upload_int64
from moeserve.kernels.argmax import greedy_argmax
from moeserve.layers.attention import AttentionMetadata
from moeserve.layers.linear import use_gemv_kernel
from moeserve.layers.sampler import SamplingBatch, sample_tokens
from moeserve.models.loader import load_model

log = logging.getLogger(__name__)


def prefill_warmup_sizes(max_tokens: int, smallest: int = 1) -> list[int]:
    """Token counts whose forwards compile the kernel variants prefill steps use: the powers of two from
    `smallest` up to max_tokens, and max_tokens (the kernels' block-size tables are keyed by token counts
    and looked up nearest on a log scale, and small tiles are the next power of two of the rows), each
    also one token past it (Triton compiles integer arguments divisible by 16 apart). The small ones
    matter without CUDA graphs (eager engines, a TP rank's share of a step), whose capture would
    otherwise have compiled them."""
    sizes = {max_tokens}
    p = smallest
    while p <= max_tokens:
        sizes.update((p, min(p + 1, max_tokens)))
        p *= 2
    return sorted(sizes)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA GPU is visible")
    if device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    if name == "auto":
        return model_dtype
    if name in ("fp8", "fp8_e4m3"):
        return torch.float8_e4m3fn
    raise ValueError(f"unknown kv_cache_dtype {name!r}; use auto or fp8")


_compile_hook_installed = False
_engines_starting = 0  # runners of this process inside __init__: their compiles are the start-up's


def warn_on_compiles() -> None:
    """From now on, log each Triton compile in this process as a warning: after the warm-up and the
    CUDA graphs a compile stalls every request of its step (under expert parallelism, every rank)
    for as long as it takes (seconds on a fresh machine). The warning names the variant, whose
    argument classes say what to warm up or leave unspecialized."""
    global _compile_hook_installed
    runtime = getattr(getattr(triton, "knobs", None), "runtime", None)
    if _compile_hook_installed or runtime is None or not hasattr(runtime, "jit_post_compile_hook"):
        return

    def hook(**kwargs):
        if _engines_starting:  # another engine of this process starting up (benchmarks, tests)
            return
        key = kwargs.get("key")  # Triton 3.6: a string holding each argument's specialization
        variant = " ".join(str(key if isinstance(key, str) else kwargs.get("repr")).split())  # one line
        log.warning("Triton compiled a kernel after start-up (every request in the step waited for it): %s", variant)

    runtime.jit_post_compile_hook = hook
    _compile_hook_installed = True


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, device: torch.device | None = None,
                 tp_channel: TPChannel | None = None):
        global _engines_starting
        _engines_starting += 1
        try:
            self._start_up(config, model_config, device, tp_channel)
        finally:
            _engines_starting -= 1
        if self.device.type == "cuda":
            warn_on_compiles()

    def _start_up(self, config: EngineConfig, model_config: ModelConfig, device: torch.device | None,
                  tp_channel: TPChannel | None) -> None:
        """Load the model, allocate the KV cache, warm up and capture the CUDA graphs."""
        self.config = config
        self.tp_channel = tp_channel  # tensor parallel: rank 0 sends each step on it, workers receive
        # Asynchronous scheduling under TP: rank 0 sends each step's sampled tokens to the workers,
        # whose next step may read them (a worker keeps the latest in shared_tokens).
        self.share_tokens = tp_channel is not None and tp_channel.is_leader and config.scheduler.async_scheduling
        self.shared_tokens: torch.Tensor | None = None
        self.model_config = model_config = config.model_build_config(model_config)
        self.device = device or resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, model_config)
        self.block_size = config.cache.block_size or default_block_size(model_config)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.model = load_model(model_config, config.model, self.dtype, self.device, config.load_format,
                                seed=config.seed)
        self.model.eval()
        use_gemv_kernel(self.model, config.dense_gemv)
        self.kv_dtype = kv_cache_dtype(config.cache.kv_cache_dtype, self.dtype)
        self.num_blocks = self._decide_num_blocks()
        if tp_channel is not None:  # every TP rank holds the same block ids
            self.num_blocks = tp_channel.min_over_ranks(self.num_blocks)
        self._allocate_kv_cache(self.num_blocks)
        state = get_parallel_state()
        self.ep_runtime = ep_runtime = state.ep_runtime if state is not None else None
        if config.warmup_prefill or (config.warmup_prefill is None and self.device.type == "cuda"):
            self._warm_up_prefill()
        self.graphs: CudaGraphs | None = None
        self.last_step: SampledStep | None = None  # the latest launched step (its tokens may be pending)
        self.num_pending_inputs = 0  # input tokens read from the step in flight, in total
        if ep_runtime is not None:
            ep_runtime.start()
        if self.device.type == "cuda" and not config.enforce_eager and (ep_runtime is None or
                                                                       ep_runtime.graph_capacity() > 0):
            self.graphs = CudaGraphs(self.model, self.device, config.scheduler.max_num_seqs,
                                     -(-self.max_model_len_hint() // self.block_size), self.block_size, ep_runtime)

    # ---- KV cache ---------------------------------------------------------------------------
    def _block_bytes(self) -> int:
        elem = torch.empty((), dtype=self.kv_dtype).element_size()
        total = 0
        for attn in self.model.attention_layers():
            shape = attn.kv_cache_shape(1, self.block_size)
            n = 1
            for d in shape:
                n *= d
            total += n * elem
        return total

    def _allocate_kv_cache(self, num_blocks: int) -> None:
        for attn in self.model.attention_layers():
            attn.kv_cache = None
        for attn in self.model.attention_layers():
            attn.kv_cache = torch.zeros(attn.kv_cache_shape(num_blocks, self.block_size), dtype=self.kv_dtype,
                                        device=self.device)

    def _decide_num_blocks(self) -> int:
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        if self.device.type != "cuda":
            return max(2, cache.cpu_kv_cache_mb * (1 << 20) // self._block_bytes())
        # Profile the largest step on a throwaway cache, then give what is left to the KV cache.
        max_tokens = min(self.config.scheduler.max_num_batched_tokens, self.max_model_len_hint())
        self._allocate_kv_cache(-(-max_tokens // self.block_size) + 1)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self._profile_forward(max_tokens)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        self._allocate_kv_cache(0)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        # Ranks sharing this GPU (dist_backend "gloo") take equal parts of gpu_memory_utilization; what
        # the others hold when this one measures depends on who started first, so it is not subtracted.
        sharing = ranks_on_gpu(self.config.parallel.ranks_per_node, self.device.index) \
            if self.config.parallel.world_size > 1 else 1
        used_by_others = total - free - torch.cuda.memory_allocated() if sharing == 1 else 0
        budget = total * cache.gpu_memory_utilization / sharing - used_by_others - peak
        num_blocks = int(budget // self._block_bytes())
        if num_blocks < 2:
            raise RuntimeError(f"no GPU memory left for the KV cache (peak {peak / 2**30:.1f} GiB of "
                               f"{total / 2**30:.1f} GiB); raise gpu_memory_utilization or lower max_num_batched_tokens")
        log.info("KV cache: %d blocks of %d tokens (%.1f GiB)", num_blocks, self.block_size,
                 num_blocks * self._block_bytes() / 2**30)
        return num_blocks

    def max_model_len_hint(self) -> int:
        return self.config.scheduler.max_model_len or self.model_config.max_position_embeddings

    @torch.inference_mode()
    def _profile_forward(self, num_tokens: int, num_seqs: int = 1) -> torch.Tensor:
        """The prefill of num_seqs sequences of num_tokens in all (their KV into blocks 1, 2, ...,
        free at start) -> the logits of the last rows, at most max_num_seqs of them."""
        lens = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
        tables, first = [], 1
        for n in lens:
            tables.append(list(range(first, first + -(-n // self.block_size))))
            first += len(tables[-1])
        meta = AttentionMetadata.build(lens, lens, tables, self.block_size, self.device)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        pos = torch.cat([torch.arange(n, device=self.device) for n in lens])
        hidden = self.model(ids, pos, meta)
        return self.model.compute_logits(hidden[-min(num_tokens, self.config.scheduler.max_num_seqs):])

    def _warm_up_prefill(self) -> None:
        """Compile the prefill kernel variants now (EngineConfig.warmup_prefill): the forward (and greedy
        sampling) at prefill_warmup_sizes, one sequence each, and a few small batches of several."""
        cap = min(self.config.scheduler.max_num_batched_tokens, self.max_model_len_hint(),
                  (self.num_blocks - 4) * self.block_size)
        if self.ep_runtime is not None:  # every rank runs the same forwards: their MoE layers exchange tokens
            cap = self.ep_runtime.min_over_ranks(cap)
        if cap < 2:
            return
        t0 = time.perf_counter()
        runs = [(n, 1) for n in prefill_warmup_sizes(cap)] + [(n, 3) for n in (17, 48) if n <= cap]
        for num_tokens, num_seqs in runs:
            greedy_argmax(self._profile_forward(num_tokens, num_seqs))
        if self.ep_runtime is not None:
            # The eager one-token dummy batch a rank with no requests runs while others prefill (a
            # one-row eager step, which neither the prefill sizes nor the graphs' padded batches run),
            # beside a small and a large step elsewhere (low-latency and high-throughput dispatch).
            for ep_max in (1, cap):
                self.forward_step(StepBatch.dummy(None, ep_max))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("warmed up %d prefill forwards (up to %d tokens) in %.1f s", len(runs), cap, time.perf_counter() - t0)

    # ---- one step ---------------------------------------------------------------------------
    def _sampling_batch(self, requests: list[Request]) -> SamplingBatch:
        gens, banned = [], []
        for r in requests:
            p = r.params
            if p.seed is not None and r.generator is None:
                r.generator = torch.Generator(device=self.device).manual_seed(p.seed)
            gens.append(r.generator if p.seed is not None else None)
            ban = []
            if len(r.output_token_ids) + r.num_pending_tokens - 1 < p.min_tokens:
                ban = list(p.stop_token_ids) + ([] if p.ignore_eos else list(r.eos_token_ids))
            banned.append(ban)
        params = [r.params for r in requests]
        f32 = dict(dtype=torch.float32, device=self.device)
        return SamplingBatch(
            temperature=to_device([0.0 if p.greedy else p.temperature for p in params], **f32),
            top_k=[p.top_k for p in params],
            top_p=to_device([p.top_p for p in params], **f32),
            min_p=to_device([p.min_p for p in params], **f32),
            generators=gens,
            banned=banned,
            num_logprobs=[p.logprobs for p in params],
            all_greedy=all(p.greedy for p in params),
            filters_p=any(p.top_p < 1.0 or p.min_p > 0 for p in params if not p.greedy),
        )

    @staticmethod
    def _plain_greedy(r: Request) -> bool:
        """Greedy, no logprobs, and no token banned (eos before min_tokens): sampling is an argmax."""
        p = r.params
        return p.greedy and p.logprobs is None and len(r.output_token_ids) + r.num_pending_tokens - 1 >= p.min_tokens

    def can_graph(self, sched: SchedulerOutput) -> bool:
        """Could this rank run the step from a CUDA graph (decodes only, few enough)?"""
        return self.graphs is not None and self.graphs.can_run([s.num_new_tokens for s in sched.scheduled])

    @torch.inference_mode()
    def execute_dummy(self, graph_size: int | None = None, ep_max: int = 0) -> None:
        """Padding only (KV written to scratch block 0, nothing sampled): the forward a
        data-parallel group with no requests runs so that its MoE layers join the others'
        (its tensor-parallel workers too)."""
        batch = StepBatch.dummy(graph_size, ep_max)
        if self.tp_channel is not None:
            self.tp_channel.send_step(batch)
        self.forward_step(batch)

    def execute(self, sched: SchedulerOutput, graph_size: int | None = None,
                local_graph_choice: bool = True, ep_max: int = 0) -> dict[str, tuple[int, object]]:
        """launch() and wait: request id -> (sampled token, logprobs) for the requests whose
        sequence this step completes (mid-prompt chunks sample nothing)."""
        return self.launch(sched, graph_size, local_graph_choice, ep_max).result()

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, graph_size: int | None = None,
               local_graph_choice: bool = True, ep_max: int = 0) -> SampledStep:
        """Queue the forward and sampling of the scheduled tokens on the device and start
        copying the sampled tokens (and logprobs) back; nothing here waits for the GPU.

        A decode whose input token is still pending (sampled by the step in flight, see
        Scheduler) takes it from that step's device tensor. Under expert parallelism the
        data-parallel groups decide together: graph_size (or eager when None), with
        local_graph_choice=False, and ep_max, the most tokens any group runs. Under tensor
        parallelism (rank 0) the batch goes to the workers first."""
        ids: list[int] = []
        positions: list[int] = []
        query_lens, seq_lens, tables, sample_rows, sample_reqs = [], [], [], [], []
        fix_rows, fix_sources = [], []
        for s in sched.scheduled:
            r, start, n = s.request, s.start, s.num_new_tokens
            known = r.num_known_tokens
            ids += r.token_slice(start, min(start + n, known))
            if start + n > known:  # its last input is the token the step in flight samples
                prev = self.last_step
                if start + n != known + 1 or prev is None or r.request_id not in prev.row_of:
                    raise RuntimeError(f"request {r.request_id}: input token {known} is pending, but the "
                                       f"previous step did not sample it")
                fix_rows.append(len(ids))
                fix_sources.append(prev.row_of[r.request_id])
                ids.append(0)
            positions += range(start, start + n)
            query_lens.append(n)
            seq_lens.append(start + n)
            tables.append(r.block_ids)
            if s.completes_sequence:
                sample_rows.append(len(ids) - 1)
                sample_reqs.append(r)
        if fix_rows and self.tp_channel is not None and not self.share_tokens:
            raise RuntimeError("tensor-parallel workers do not have the pending tokens: enable async_scheduling")
        fixup = TokenFixup(fix_rows, self.last_step.tokens, fix_sources) if fix_rows else None
        self.num_pending_inputs += len(fix_rows)
        if not graph_size and local_graph_choice and self.graphs is not None and self.graphs.can_run(query_lens):
            graph_size = self.graphs.size_for(len(query_lens))
        share = self.share_tokens and bool(sample_rows)
        batch = StepBatch(ids, positions, query_lens, seq_lens, tables, sample_rows, graph_size, ep_max,
                          fix_rows, fix_sources, share)
        if self.tp_channel is not None:
            self.tp_channel.send_step(batch)
        logits = self.forward_step(batch, fixup)
        request_ids = [r.request_id for r in sample_reqs]
        if logits is None:
            step = SampledStep([], None, None, [])
        elif all(self._plain_greedy(r) for r in sample_reqs):
            # The common serving case: no per-row parameter tensors, one argmax.
            step = SampledStep(request_ids, greedy_argmax(logits), None, [None] * len(sample_reqs))
        else:
            batch = self._sampling_batch(sample_reqs)
            tokens, logprobs = sample_tokens(logits, batch)
            step = SampledStep(request_ids, tokens, logprobs, batch.num_logprobs)
        if share:
            self.tp_channel.share_tokens(step.tokens)
        self.last_step = step
        return step

    @torch.inference_mode()
    def worker_step(self, b: StepBatch) -> None:
        """A tensor-parallel worker's step: the forward of the batch rank 0 sent (its placeholder
        rows filled from the tokens rank 0 shared last), then, if rank 0 shares this step's
        sampled tokens, receive them (on NCCL queued on the stream: the worker goes on to wait
        for the next batch while the GPU still computes)."""
        fixup = None
        if b.fix_rows:
            if self.shared_tokens is None:
                raise RuntimeError("rank 0 sent pending-token rows, but no sampled tokens were shared yet")
            fixup = TokenFixup(b.fix_rows, self.shared_tokens, b.fix_sources)
        self.forward_step(b, fixup)
        if b.share_tokens:
            self.shared_tokens = self.tp_channel.recv_tokens(len(b.sample_rows), self.device)

    @torch.inference_mode()
    def forward_step(self, b: StepBatch, fixup: TokenFixup | None = None) -> torch.Tensor | None:
        """The forward of one flat batch (from a CUDA graph when b.graph_size; a one-token dummy
        into scratch block 0 when it has no ids) -> fp32 logits of the rows to sample, or None
        when there are none. Tensor-parallel workers call this with the batch rank 0 broadcast.
        Under expert parallelism every rank brackets the forward alike: begin_step (the real
        rows and the dispatch kernel), after_step (the balancer; a collective)."""
        if self.ep_runtime is not None:
            self.ep_runtime.begin_step(len(b.ids), b.ep_max)
        if b.graph_size:
            hidden = self.graphs.run(b.ids, b.positions, b.seq_lens, b.tables, bs=b.graph_size, fixup=fixup)
        elif not b.ids:
            meta = AttentionMetadata.build([1], [1], [[0]], self.block_size, self.device)
            zero = torch.zeros(1, dtype=torch.long, device=self.device)
            hidden = self.model(zero, zero, meta)
        else:
            meta = AttentionMetadata.build(b.query_lens, b.seq_lens, b.tables, self.block_size, self.device)
            ids, positions = upload_int64(b.ids, b.positions, device=self.device)
            if fixup is not None:
                fixup.apply(ids)
            hidden = self.model(ids, positions, meta)
        logits = None
        if b.sample_rows:
            if len(b.sample_rows) != hidden.shape[0]:  # not every row samples (prefill chunks)
                hidden = hidden[to_device(b.sample_rows, torch.int64, self.device)]
            logits = self.model.compute_logits(hidden)
        if self.ep_runtime is not None:
            self.ep_runtime.after_step()
        return logits
