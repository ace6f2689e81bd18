"""Expert parallelism against tensor parallelism through the whole engine on N GPUs of one host (NCCL).

1. Correctness: greedy tokens of LLM(dp=N, ep=N) (both dispatch kernels) and of LLM(tp=N)
   against one GPU, on a tiny random DeepSeek-V3 checkpoint in fp32, eager and with CUDA graphs.
2. Throughput: a layer-reduced DeepSeek-V3-shaped dummy model (hidden 7168, MLA, 256 experts
   top-8, 1 dense + --moe-layers MoE layers) decoding B requests per GPU (B * N requests in all,
   the same workload for every mode): one GPU holding every expert; dp=N/ep=N with each rank
   holding 256/N experts and its own requests, per wire format; tp=N with every layer split
   over the N GPUs (one scheduler for all B * N requests). Eager and with CUDA graphs (under EP
   the decode graphs run the low-latency dispatch; under TP they capture the all_reduces).

    python benchmarks/ep_engine_bench.py --nproc 2 --out $OUT/ep_engine            # ep and tp
    python benchmarks/ep_engine_bench.py --nproc 2 --modes tp --out $OUT/tp_engine  # tp only

`--device cpu` is a smoke run of the same code paths on the tiny model (gloo, fp32, dummy
weights for the throughput rows, tiny workload). Prints a Markdown table last and writes
PREFIX.json / PREFIX.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moeserve import LLM, SamplingParams  # noqa: E402
from moeserve.models.tiny import make_tiny  # noqa: E402

V3_LAYER_REDUCED = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 3,
    "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256,
    "num_experts_per_tok": 8, "n_shared_experts": 1, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "routed_scaling_factor": 2.5, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
    "scoring_func": "sigmoid", "norm_topk_prob": True, "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "rms_norm_eps": 1e-6, "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "hidden_act": "silu", "attention_bias": False,
}


def greedy_tokens(llm, prompts, n=16):
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def check_correctness(nproc: int, path: str, modes: list[str], device: str = "cuda", tp: int = 0) -> list[dict]:
    prompts = [[5 + i, 7, 9, 11 + i, 3] * (1 + i % 4) for i in range(12 if device == "cuda" else 3)]
    kw = dict(dtype="float32", device=device, gpu_memory_utilization=0.3)
    single = LLM(path, enforce_eager=True, **kw)
    ref = greedy_tokens(single, prompts)
    del single
    gc.collect()
    torch.cuda.empty_cache()
    graphs = (True, False) if device == "cuda" else (True,)
    cases = []
    if "ep" in modes:
        cases += [(f"dp{nproc}/ep{nproc}", dict(dp=nproc, ep=nproc, dispatch_backend=b), b, eager)
                  for b, eager in (("ht", True), ("ll", True), ("auto", False)) if eager or device == "cuda"]
    if "tpep" in modes:  # TP attention inside each DP group, experts spread over all ranks
        t = min(tp or nproc, 4)
        dp = nproc // t
        cases += [(f"dp{dp}/tp{t}/ep{nproc}", dict(dp=dp, tp=t, ep=nproc), "token shares", eager) for eager in graphs]
    if "tp" in modes:
        # the tiny model has 4 attention heads: tp 8 does not split it
        t = min(tp or nproc, 4)
        cases += [(f"tp{t}", dict(tp=t), "all_reduce", eager) for eager in graphs]
    rows = []
    for run, parallel, backend, eager in cases:
        llm = LLM(path, enforce_eager=eager, **parallel, **kw)
        got = greedy_tokens(llm, prompts)
        llm.shutdown()
        same = sum(a == b for a, b in zip(got, ref))
        name = backend + (", eager" if eager else ", CUDA graphs")
        rows.append({"run": run, "backend": name, "sequences_equal": same, "sequences": len(ref)})
        print(f"correctness {run} {name}: {same}/{len(ref)} greedy sequences equal", flush=True)
    return rows


def compiled_kernels() -> int:
    """Triton kernel variants in the compile cache (every rank process shares it): a timed run
    that adds any paid compile stalls inside its time."""
    root = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return sum(f.endswith(".json") and not f.startswith("__grp__") for _, _, files in os.walk(root) for f in files)


def throughput(path: str, parallel: dict, batch_per_gpu: int, isl: int, osl: int, gpus: int, eager: bool,
               device: str = "cuda") -> dict:
    # One scheduler per engine core: under dp each rank takes batch_per_gpu requests; a single
    # GPU or a TP group (one scheduler for all its GPUs) takes every request of the workload.
    engines = parallel.get("dp", 1)
    max_seqs = batch_per_gpu * gpus // engines
    dtype = "bfloat16" if device == "cuda" else "float32"
    llm = LLM(path, dtype=dtype, device=device, load_format="dummy", enforce_eager=eager,
              enable_prefix_caching=False, max_num_seqs=max_seqs, max_model_len=isl + osl + 16,
              gpu_memory_utilization=0.85, **parallel)
    vocab = llm.engine.vocab_size if hasattr(llm.engine, "vocab_size") else llm.engine.model_config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, min(120000, vocab), (isl,), generator=g).tolist()
               for _ in range(batch_per_gpu * gpus)]
    # Warm-up: the whole workload twice, so every step shape the timed run meets (mixed prefill and
    # decode batches included) has its Triton specializations compiled, and NCCL is connected.
    # A shorter warm-up left the first row of a fresh machine paying compiles inside its ~2 s
    # timed run (one GPU: 946 tok/s first vs 2,203 second, at c46a61b); one pass was not enough
    # either under asynchronous data-parallel ranks, whose step mix varies from run to run
    # (dp2/ep2 mxfp4+fp8: 721 tok/s per GPU with compiles in the timed run, ~3,100 without, 441dfa0).
    for _ in range(2):
        greedy_tokens(llm, prompts, n=osl)
    compiled = compiled_kernels()
    start = time.perf_counter()
    outs = greedy_tokens(llm, prompts, n=osl)
    seconds = time.perf_counter() - start
    compiled = compiled_kernels() - compiled
    if hasattr(llm.engine, "procs"):
        llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    tokens = sum(map(len, outs))
    return {"gpus": gpus, "eager": eager, "batch_per_gpu": batch_per_gpu, "max_num_seqs": max_seqs,
            "output_tokens": tokens, "seconds": seconds, "output_tok_s_per_gpu": tokens / seconds / gpus,
            "kernels_compiled_in_timed_run": compiled, **parallel}


def run_name(r: dict) -> str:
    if r["gpus"] == 1:
        return "one GPU, all experts" + (", synchronous scheduling" if r.get("async_scheduling") is False else "")
    if r.get("tp", 1) > 1 and r.get("ep", 1) > 1:
        return f"dp{r['dp']}/tp{r['tp']}/ep{r['ep']} (attention TP, experts EP)"
    if r.get("tp", 1) > 1:
        return f"tp{r['tp']} (layers split, all_reduce)"
    peer = ", peer memory" if r.get("ll_transport") == "peer" else ""
    return f"dp{r['dp']}/ep{r['ep']} {r['dispatch_dtype']}+{r['combine_dtype']}{peer}"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--nproc", type=int, default=None, help="GPUs (ranks) of the EP runs (default: all visible)")
    p.add_argument("--tp", type=int, default=None, help="TP size of the tensor-parallel runs (default: --nproc)")
    p.add_argument("--modes", default="ep,tp", help="comma list of ep, tp, tpep (dp x tp attention, ep over all "
                                                   "ranks): which parallel runs to compare")
    p.add_argument("--moe-layers", type=int, default=2)
    p.add_argument("--ll-transports", default="collective",
                   help="comma list of the low-latency transports the ep runs use: collective, peer")
    p.add_argument("--batch", type=int, default=64, help="requests per GPU")
    p.add_argument("--isl", type=int, default=512)
    p.add_argument("--osl", type=int, default=64)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: smoke run on the tiny model (gloo), not a measurement")
    p.add_argument("--no-eager", action="store_true", help="throughput with CUDA graphs only")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if set(modes) - {"ep", "tp", "tpep"}:
        p.error(f"--modes takes ep, tp and/or tpep, got {args.modes!r}")
    cpu = args.device == "cpu"
    if args.nproc is None:
        args.nproc = 2 if cpu else torch.cuda.device_count()
    tp = args.tp or args.nproc
    device_name = "CPU (smoke run)" if cpu else torch.cuda.get_device_name()
    report = {"device": f"{args.nproc}x {device_name}", "date": datetime.date.today().isoformat(),
              "commit": args.commit, "command": " ".join(sys.argv), "modes": modes}
    tiny = make_tiny("deepseek_v3", tempfile.mkdtemp(prefix="tiny-v3-"))
    report["correctness"] = check_correctness(args.nproc, tiny, modes, args.device, tp)

    if cpu:  # the tiny model's shapes; a V3-width model is far too slow for a smoke run on CPU
        path = tiny
    else:
        cfg = dict(V3_LAYER_REDUCED, num_hidden_layers=1 + args.moe_layers)
        path = tempfile.mkdtemp(prefix="v3-reduced-")
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(cfg, f)
        for name in ("tokenizer.json", "tokenizer_config.json"):  # prompts are token ids; LLM wants a tokenizer
            shutil.copy(os.path.join(tiny, name), path)
    runs = []
    report["throughput"] = runs

    def save():  # after every row, so a run cut short by its time limit still leaves its numbers
        with open(args.out + ".json", "w") as f:
            json.dump(report, f, indent=2)

    save()
    for eager in ((True,) if cpu else (False,) if args.no_eager else (True, False)):
        runs.append(throughput(path, {}, args.batch, args.isl, args.osl, 1, eager, args.device))
        print("single GPU:", runs[-1], flush=True)
        # dp and tp ranks step synchronously; one GPU so too, to see what asynchronous scheduling gives
        runs.append(throughput(path, {"async_scheduling": False}, args.batch, args.isl, args.osl, 1, eager,
                               args.device))
        print("single GPU, synchronous scheduling:", runs[-1], flush=True)
        save()
        if "ep" in modes:
            for transport in args.ll_transports.split(","):
                for dispatch, combine in (("none", "none"), ("mxfp4", "fp8")):
                    par = dict(dp=args.nproc, ep=args.nproc, dispatch_dtype=dispatch, combine_dtype=combine,
                               ll_transport=transport)
                    runs.append(throughput(path, par, args.batch, args.isl, args.osl, args.nproc, eager, args.device))
                    print(f"{run_name(runs[-1])}:", runs[-1], flush=True)
                    save()
        if "tpep" in modes:
            par = dict(dp=args.nproc // tp, tp=tp, ep=args.nproc)
            runs.append(throughput(path, par, args.batch, args.isl, args.osl, args.nproc, eager, args.device))
            print(f"dp{par['dp']}/tp{tp}/ep{args.nproc}:", runs[-1], flush=True)
            save()
        if "tp" in modes:
            runs.append(throughput(path, dict(tp=tp), args.batch, args.isl, args.osl, tp, eager, args.device))
            print(f"tp{tp}:", runs[-1], flush=True)
            save()
    base = {r["eager"]: r["output_tok_s_per_gpu"] for r in runs if r["gpus"] == 1 and "async_scheduling" not in r}
    lines = [f"# EP and TP in the engine: {report['device']}", "",
             f"date {report['date']}, commit {args.commit}, command `{report['command']}`", "",
             "| correctness (tiny V3, fp32) | backend | greedy sequences equal to one GPU |", "|---|---|---|"]
    lines += [f"| {r['run']} | {r['backend']} | {r['sequences_equal']}/{r['sequences']} |"
              for r in report["correctness"]]
    model = ("tiny V3 (fp32, dummy weights; smoke run, not a measurement)" if cpu else
             f"Layer-reduced V3 shape (1 dense + {args.moe_layers} MoE layers, bf16, dummy weights)")
    lines += ["", f"{model}, ISL {args.isl} / OSL {args.osl}, {args.batch} requests per GPU "
              f"({args.batch} x GPUs requests per run):", "",
              "| run | mode | GPUs | output tok/s per GPU | vs one GPU, same mode | Triton compiles in the timed run |",
              "|---|---|---|---|---|---|"]
    for r in runs:
        mode = "eager" if r["eager"] else "CUDA graphs"
        lines.append(f"| {run_name(r)} | {mode} | {r['gpus']} | {r['output_tok_s_per_gpu']:.0f} | "
                     f"{r['output_tok_s_per_gpu'] / base[r['eager']]:.2f} | {r['kernels_compiled_in_timed_run']} |")
    md = "\n".join(lines) + "\n"
    save()
    with open(args.out + ".md", "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
