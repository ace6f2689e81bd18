"""The offline API, shaped like vLLM's:

    from moeserve import LLM, SamplingParams
    llm = LLM(model="path/to/checkpoint", dtype="auto", device="cuda")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    print(outs[0].outputs[0].text)
"""

from __future__ import annotations

import argparse
import itertools
import sys

from moeserve.config import EngineConfig
from moeserve.engine.core import EngineCore
from moeserve.engine.output import OutputProcessor, RequestOutput
from moeserve.engine.sampling_params import SamplingParams
from moeserve.models.tokenizer import load_tokenizer


class LLM:
    def __init__(self, model: str, dtype: str = "auto", device: str = "auto", tokenizer: str | None = None,
                 **engine_args):
        self.config = EngineConfig.from_kwargs(model, dtype=dtype, device=device, **engine_args)
        self.tokenizer = load_tokenizer(tokenizer or model)
        if self.config.parallel.world_size > 1:  # one engine-core process per dp rank (+ its tp workers)
            from moeserve.engine.mp_engine import MultiprocEngine
            self.engine = MultiprocEngine(self.config)
        else:
            self.engine = EngineCore(self.config)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    @property
    def stats(self):
        return self.engine.stats

    def shutdown(self) -> None:
        """Stop the engine's rank processes (data/tensor parallel); a no-op for one in-process engine."""
        if hasattr(self.engine, "shutdown") and self.config.parallel.world_size > 1:
            self.engine.shutdown()

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. Prompts are strings or lists of token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sampling_params)} sampling params")
        ids = []
        try:
            for prompt, params in zip(prompts, sampling_params):
                ids.append(self._add(prompt, params))
            return self._run(ids, use_tqdm)
        except BaseException:
            for rid in ids:  # leave the engine clean for the next call
                self.engine.abort_requests(self.output_processor.abort(rid))
            raise

    def _add(self, prompt: str | list[int], params: SamplingParams) -> str:
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            text, token_ids = None, list(prompt)
        self.engine.check_prompt(len(token_ids))
        rid = str(next(self._ids))
        for engine_id, child_params in self.output_processor.add(rid, text, token_ids, params):
            self.engine.add_request(engine_id, token_ids, child_params)
        return rid

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(ids), desc="requests")
        pending = set(ids)
        while pending:
            outputs = self.engine.step()
            _, to_abort = self.output_processor.process(outputs)
            self.engine.abort_requests(to_abort)
            for rid in list(pending):
                out = self.output_processor.pop_if_finished(rid)
                if out is not None:
                    done[rid] = out
                    pending.discard(rid)
                    if bar:
                        bar.update(1)
            if pending and not outputs and not self.engine.has_unfinished():
                raise RuntimeError("engine went idle with requests still pending")
        if bar:
            bar.close()
        return [done[rid] for rid in ids]


# ---- `moeserve generate` ----------------------------------------------------------------------
def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """Engine flags shared by `generate` and `serve`."""
    parser.add_argument("--model", required=True, help="checkpoint folder (Hugging Face format)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-size", type=int, default=None,
                        help="tokens a KV-cache page (default: 64 for MLA models, else 16)")
    parser.add_argument("--num-blocks", type=int, default=None, help="KV cache blocks (default: from memory)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    parser.add_argument("--cpu-kv-cache-mb", type=int, default=256)
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--dense-gemv", action="store_true",
                        help="decode-sized unquantized linears through the split-K Triton GEMM, not cuBLAS")
    parser.add_argument("--no-fuse-shared-experts", action="store_true",
                        help="run DeepSeek's shared experts as a separate MLP, not as extra slots of the "
                             "routed experts' fused MoE pass (ep == 1)")
    parser.add_argument("--no-warmup-prefill", action="store_true",
                        help="skip the start-up forwards at prefill sizes (their kernels then compile on first use)")
    parser.add_argument("--no-async-scheduling", action="store_true",
                        help="wait for each step before scheduling the next (default: overlap them)")
    par = parser.add_argument_group("parallelism (one process per rank; gloo on CPU, NCCL on GPU)")
    par.add_argument("--dp", type=int, default=1, help="data-parallel attention groups (each schedules its own)")
    par.add_argument("--ep", type=int, default=1,
                     help="expert-parallel ranks: 1 (experts split like the other layers) or dp * tp")
    par.add_argument("--tp", type=int, default=1,
                     help="tensor-parallel ranks per data-parallel group: attention and dense layers split over them")
    par.add_argument("--nnodes", type=int, default=1)
    par.add_argument("--node-rank", type=int, default=0, help="nodes > 0 run their ranks headless")
    par.add_argument("--dist-init-addr", default=None, help="host:port of node 0 (rendezvous; ZMQ on the next ports)")
    par.add_argument("--dist-timeout", type=float, default=300.0, help="seconds any collective may take")
    par.add_argument("--dist-backend", default="auto", choices=["auto", "nccl", "gloo"],
                     help="process groups: auto is NCCL on GPUs, gloo on CPU; gloo on GPUs lets ranks share a GPU "
                     "(collectives through host memory: for checks on fewer GPUs than ranks, not for speed)")
    par.add_argument("--dispatch-dtype", default="auto", choices=["auto", "none", "bf16", "fp8", "mxfp4"])
    par.add_argument("--combine-dtype", default="auto", choices=["auto", "none", "bf16", "fp8"])
    par.add_argument("--dispatch-backend", default="auto", choices=["auto", "ht", "ll"],
                     help="expert dispatch kernel: by load (auto), high-throughput or low-latency")
    par.add_argument("--ll-threshold", type=int, default=128, help="max tokens per rank for the low-latency kernel")
    par.add_argument("--ll-transport", default=None, choices=["collective", "peer"],
                     help="low-latency rows through an all_to_all, or stored straight into the other ranks' GPU "
                     "memory (one node; default: env MOESERVE_EP_LL_TRANSPORT, else collective)")
    par.add_argument("--num-redundant-experts", type=int, default=0)
    par.add_argument("--eplb-interval", type=int, default=0, help="steps between expert rebalances (0: off)")
    par.add_argument("--eplb-window", type=int, default=1000)


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(dtype=args.dtype, device=args.device, load_format=args.load_format, seed=args.seed,
                block_size=args.block_size, num_blocks=args.num_blocks,
                gpu_memory_utilization=args.gpu_memory_utilization, cpu_kv_cache_mb=args.cpu_kv_cache_mb,
                kv_cache_dtype=args.kv_cache_dtype, enable_prefix_caching=not args.no_prefix_caching,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                max_model_len=args.max_model_len, enforce_eager=args.enforce_eager, dense_gemv=args.dense_gemv,
                fuse_shared_experts=not args.no_fuse_shared_experts,
                warmup_prefill=False if args.no_warmup_prefill else None,  # None: on GPUs
                async_scheduling=not args.no_async_scheduling,
                dp=args.dp, ep=args.ep, tp=args.tp, nnodes=args.nnodes, node_rank=args.node_rank,
                dist_init_addr=args.dist_init_addr, dist_timeout_s=args.dist_timeout,
                dist_backend=args.dist_backend,
                dispatch_dtype=args.dispatch_dtype, combine_dtype=args.combine_dtype,
                dispatch_backend=args.dispatch_backend, ll_threshold=args.ll_threshold, ll_transport=args.ll_transport,
                num_redundant_experts=args.num_redundant_experts, eplb_interval=args.eplb_interval,
                eplb_window=args.eplb_window)


def add_args(parser: argparse.ArgumentParser) -> None:
    add_engine_args(parser)
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed-sampling", dest="sampling_seed", type=int, default=None,
                        help="seed of the sampler (--seed seeds the engine)")


def main(args: argparse.Namespace) -> int:
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.sampling_seed if args.sampling_seed is not None else
                                (args.seed if args.temperature > 0 else None))
        llm = LLM(model=args.model, **engine_kwargs(args))
        for out in llm.generate(args.prompt, params):
            print(f"prompt: {out.prompt!r}\noutput: {out.outputs[0].text!r}  "
                  f"({len(out.outputs[0].token_ids)} tokens, {out.outputs[0].finish_reason})")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
