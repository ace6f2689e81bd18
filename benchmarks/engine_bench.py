"""Offline engine throughput on one GPU with dummy weights, against the memory roofline and
against transformers' `generate` on the same model and GPU.

    PYTHONUNBUFFERED=1 python benchmarks/engine_bench.py --model v2-lite --out $OUT/engine_v2lite

For each batch size B: B requests of ISL random tokens, each generating exactly OSL tokens
(greedy, ignore_eos), all submitted at once. Reported per B: output tok/s over the whole run,
the median decode step time (steps where all B requests decode), and the roofline step time:
bytes that step must read (weights, experts hit, KV at the mean context) over the copy
bandwidth measured in this run. Also: batch-1 step with CUDA graphs vs eager, FP8 weights vs
bf16 at batch 64 (--fp8), and transformers' generate at --hf-batches (128 in / 32 out) next to
the engine on the same workload.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from roofline import decode_step_bytes, kv_bytes_per_token_per_layer, measure_copy_bandwidth  # noqa: E402

from moeserve.config import EngineConfig  # noqa: E402
from moeserve.engine.core import EngineCore  # noqa: E402
from moeserve.engine.sampling_params import SamplingParams  # noqa: E402

SHAPES = {
    # DeepSeek-V2-Lite: hidden 2048, 27 layers, first dense, 64 routed experts top-6, 2 shared, kv_lora 512.
    "v2-lite": {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
        "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
        "num_attention_heads": 16, "num_key_value_heads": 16, "kv_lora_rank": 512, "q_lora_rank": None,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 64,
        "num_experts_per_tok": 6, "n_shared_experts": 2, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "routed_scaling_factor": 1.0, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
        "scoring_func": "softmax", "norm_topk_prob": False, "max_position_embeddings": 163840,
        "rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                              "beta_fast": 32, "beta_slow": 1, "mscale": 0.707,
                                              "mscale_all_dim": 0.707},
        "rms_norm_eps": 1e-6, "bos_token_id": 100000, "eos_token_id": 100001, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "hidden_act": "silu", "attention_bias": False,
    },
    # Qwen3-30B-A3B: hidden 2048, 48 layers, 128 experts top-8, GQA 32/4 heads of 128.
    "qwen3-30b-a3b": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
        "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "bos_token_id": 151643,
        "eos_token_id": 151645, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu",
        "attention_bias": False,
    },
}
FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def write_config(name: str, fp8: bool) -> str:
    d = tempfile.mkdtemp(prefix=f"{name}-")
    cfg = dict(SHAPES[name])
    if fp8:
        cfg["quantization_config"] = FP8
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    return d


def make_engine(path: str, max_batch: int, isl: int, osl: int, eager: bool, dense_gemv: bool,
                fuse_shared_experts: bool = True, kv_cache_dtype: str = "auto") -> EngineCore:
    config = EngineConfig.from_kwargs(path, dtype="bfloat16", device="cuda", load_format="dummy",
                                      max_num_seqs=max_batch, max_num_batched_tokens=16384,
                                      max_model_len=isl + osl + 64, enforce_eager=eager, dense_gemv=dense_gemv,
                                      fuse_shared_experts=fuse_shared_experts, kv_cache_dtype=kv_cache_dtype,
                                      enable_prefix_caching=False, gpu_memory_utilization=0.88)
    return EngineCore(config)


def run_batch(engine: EngineCore, batch: int, isl: int, osl: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=osl, ignore_eos=True)
    for i in range(batch):
        ids = torch.randint(10, vocab - 10, (isl,), generator=g).tolist()
        engine.add_request(f"b{batch}-{seed}-{i}", ids, params)
    torch.cuda.synchronize()
    start = time.perf_counter()
    decode_steps, tokens, per_request = [], 0, {}
    while engine.has_unfinished():
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        tokens += sum(len(o.new_token_ids) for o in outs)
        for o in outs:
            per_request.setdefault(o.request_id, []).extend(o.new_token_ids)
        s = engine.stats
        if s.num_scheduled_tokens == batch and s.num_running == batch:
            decode_steps.append(dt)
    total = time.perf_counter() - start
    return {"batch": batch, "output_tokens": tokens, "seconds": total, "output_tok_s": tokens / total,
            "decode_step_ms": 1e3 * statistics.median(decode_steps) if decode_steps else None,
            "num_decode_steps": len(decode_steps), "preemptions": engine.stats.num_preemptions,
            "tokens": [per_request[k] for k in sorted(per_request)]}


def sync_vs_async(engine: EngineCore, batch: int, isl: int, osl: int) -> dict:
    """The same batch with the next step scheduled only after this one finished, then overlapped
    (asynchronous scheduling): decode step times and whether the greedy tokens are the same."""
    out = {"batch": batch}
    for mode in ("sync", "async"):
        engine.async_scheduling = mode == "async"
        r = run_batch(engine, batch, isl, osl, seed=21)
        out[mode + "_ms"], out[mode + "_tokens"] = r["decode_step_ms"], r.pop("tokens")
    engine.async_scheduling = True
    out["ratio"] = out["async_ms"] / out["sync_ms"]
    out["tokens_equal"] = out.pop("async_tokens") == out.pop("sync_tokens")
    print(f"batch {batch}: sync step {out['sync_ms']:.2f} ms, async {out['async_ms']:.2f} ms "
          f"(ratio {out['ratio']:.2f}), tokens equal: {out['tokens_equal']}", flush=True)
    return out


def roofline_ms(engine: EngineCore, batch: int, context: int, bw: float) -> dict:
    cfg = engine.model_config
    kvb = kv_bytes_per_token_per_layer(cfg, engine.runner.kv_dtype.itemsize)
    b = decode_step_bytes(engine.runner.model, cfg, batch, context, kvb)
    return {"bytes": b, "ms": 1e3 * b["total"] / bw}


def eager_vs_graph(engine: EngineCore, isl: int, steps: int = 64) -> dict:
    """Batch-1 decode step with the captured graphs, then with them switched off."""
    out = {}
    graphs = engine.runner.graphs
    for mode in ("graph", "eager"):
        engine.runner.graphs = graphs if mode == "graph" else None
        r = run_batch(engine, 1, isl, steps, seed=7)
        out[mode + "_ms"] = r["decode_step_ms"]
    engine.runner.graphs = graphs
    out["ratio"] = out["graph_ms"] / out["eager_ms"]
    return out


def graph_matches_eager(engine: EngineCore, isl: int) -> dict:
    """Same prompts, greedy, with and without graphs: fraction of identical tokens (bf16, so a
    near-tie may flip late tokens; the first tokens must agree)."""
    toks = {}
    graphs = engine.runner.graphs
    for mode in ("graph", "eager"):
        engine.runner.graphs = graphs if mode == "graph" else None
        g = torch.Generator().manual_seed(3)
        got = {}
        for i in range(6):
            ids = torch.randint(10, engine.model_config.vocab_size - 10, (isl // 4 + 17 * i,), generator=g).tolist()
            engine.add_request(f"{mode}-{i}", ids, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
        while engine.has_unfinished():
            for o in engine.step():
                got.setdefault(o.request_id.split("-")[1], []).extend(o.new_token_ids)
        toks[mode] = [got[str(i)] for i in range(6)]
    engine.runner.graphs = graphs
    same = sum(a == b for x, y in zip(toks["graph"], toks["eager"]) for a, b in zip(x, y))
    first = all(x[0] == y[0] for x, y in zip(toks["graph"], toks["eager"]))
    return {"token_match": same / (6 * 16), "first_tokens_equal": first}


def hf_generate(path: str, batches: list[int], in_len: int, out_len: int) -> list[dict]:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    res = []
    for b in batches:
        ids = torch.randint(10, cfg.vocab_size - 10, (b, in_len), device="cuda")
        kw = dict(max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False,
                  attention_mask=torch.ones_like(ids), pad_token_id=0)
        with torch.no_grad():
            model.generate(ids[:, :16], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, **kw)
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        res.append({"batch": b, "output_tok_s": b * out_len / dt, "seconds": dt})
        print(f"  hf generate batch {b}: {b * out_len / dt:.1f} tok/s", flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return res


def profile_prefill(engine: EngineCore, batch: int, isl: int) -> dict:
    """Time the one step that prefills `batch` prompts of `isl` tokens, and list its top kernels."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(6)
    times = []
    for rep in range(3):
        for i in range(batch):
            ids = torch.randint(10, engine.model_config.vocab_size - 10, (isl,), generator=g).tolist()
            engine.add_request(f"pf-{rep}-{i}", ids, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
        torch.cuda.synchronize()
        if rep == 2:
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                engine.step()
                torch.cuda.synchronize()
        else:
            t0 = time.perf_counter()
            engine.step()
            torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - t0))
        while engine.has_unfinished():
            engine.step()
    print(f"prefill step, {batch} x {isl} tokens: {times} ms", flush=True)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25), flush=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
    return {"batch": batch, "isl": isl, "step_ms": times}


def start_decoding(engine: EngineCore, batch: int, isl: int, max_tokens: int) -> list[str]:
    """`batch` requests of `isl` random prompt tokens, stepped until every one of them decodes in each
    step; returns their ids (for abort_requests)."""
    g = torch.Generator().manual_seed(5)
    names = [f"prof-{i}" for i in range(batch)]
    for name in names:
        ids = torch.randint(10, engine.model_config.vocab_size - 10, (isl,), generator=g).tolist()
        engine.add_request(name, ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    while engine.stats.num_scheduled_tokens != batch or engine.stats.num_running != batch:
        engine.step()
    return names


def profile_decode(engine: EngineCore, batch: int, isl: int) -> dict:
    """Split a decode step's wall time into schedule / execute / update, and list the top GPU
    kernels of eager decode steps."""
    from torch.profiler import ProfilerActivity, profile

    names = start_decoding(engine, batch, isl, max_tokens=60)
    engine.finish_in_flight()  # the phases below are timed one step at a time (synchronous)
    overlapped, engine.async_scheduling = engine.async_scheduling, False
    phases = {"schedule": [], "execute": [], "update": []}
    for _ in range(10):
        t0 = time.perf_counter()
        sched = engine.scheduler.schedule()
        t1 = time.perf_counter()
        sampled = engine.runner.execute(sched)
        t2 = time.perf_counter()
        engine.scheduler.update(sched, sampled)
        t3 = time.perf_counter()
        for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
            phases[name].append(1e3 * dt)
    out = {k: statistics.median(v) for k, v in phases.items()}
    out["batch"] = batch
    if engine.runner.graphs is not None:  # the GPU time of the step alone: its graph replayed back to back
        graph = engine.runner.graphs.graphs[engine.runner.graphs.size_for(batch)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            graph.replay()
        torch.cuda.synchronize()
        out["graph_replay"] = 1e3 * (time.perf_counter() - t0) / 20
        out["host_outside_graph"] = out["schedule"] + out["execute"] + out["update"] - out["graph_replay"]
    print(f"decode step phases at batch {batch} (ms, graphs): {out}", flush=True)
    graphs = engine.runner.graphs
    engine.runner.graphs = None
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            engine.step()
        torch.cuda.synchronize()
    engine.runner.graphs = graphs
    engine.async_scheduling = overlapped
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
    print(table, flush=True)
    engine.abort_requests(names)
    out["kernels"] = table
    return out


def free(engine) -> None:
    engine.runner.graphs = None
    del engine
    gc.collect()
    torch.cuda.empty_cache()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="v2-lite", choices=sorted(SHAPES))
    p.add_argument("--batches", default="1,8,32,64,128")
    p.add_argument("--isl", type=int, default=1024)
    p.add_argument("--osl", type=int, default=1024)
    p.add_argument("--hf-batches", default="1,32", help="empty: skip transformers' generate")
    p.add_argument("--fp8", action="store_true", help="also FP8 weights at --fp8-batches")
    p.add_argument("--fp8-batches", default="1,64")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--profile-batch", default="", help="batch sizes (comma-separated): print where a decode step's time goes")
    p.add_argument("--sync-batches", default="1,64", help="compare synchronous with asynchronous scheduling")
    p.add_argument("--profile-prefill", type=int, default=0, help="profile one prefill step of N x 128 tokens")
    p.add_argument("--dense-gemv", action="store_true", help="the engine option: small-M Triton GEMM, not cuBLAS")
    p.add_argument("--no-fuse-shared-experts", action="store_true",
                   help="the engine option: DeepSeek's shared experts as a separate MLP")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="the engine option")
    p.add_argument("--out", required=True, help="path prefix: writes PREFIX.json and PREFIX.md")
    args = p.parse_args()
    batches = [int(x) for x in args.batches.split(",")]
    report = {"model": args.model, "device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
              "commit": args.commit, "command": " ".join(sys.argv), "isl": args.isl, "osl": args.osl,
              "dense_gemv": args.dense_gemv, "fuse_shared_experts": not args.no_fuse_shared_experts,
              "kv_cache_dtype": args.kv_cache_dtype}
    bw = measure_copy_bandwidth()
    report["copy_bandwidth_GBps"] = bw / 1e9
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)

    path = write_config(args.model, fp8=False)
    hf_b = [int(x) for x in args.hf_batches.split(",") if x]
    if hf_b:
        report["hf_generate"] = hf_generate(path, hf_b, 128, 32)

    engine = make_engine(path, max(batches + hf_b), args.isl, args.osl, eager=False, dense_gemv=args.dense_gemv,
                         fuse_shared_experts=not args.no_fuse_shared_experts, kv_cache_dtype=args.kv_cache_dtype)
    report["kv_blocks"] = engine.kv.num_usable_blocks
    report["graphs_vs_eager_tokens"] = graph_matches_eager(engine, args.isl)
    print("graph vs eager tokens:", report["graphs_vs_eager_tokens"], flush=True)
    report["graph_vs_eager_batch1"] = eager_vs_graph(engine, args.isl)
    print("batch-1 step graph vs eager:", report["graph_vs_eager_batch1"], flush=True)
    if hf_b:
        for b in hf_b:  # warm-up, as transformers got one: Triton compiles for new shapes on first use
            run_batch(engine, b, 128, 32, seed=10)
        report["engine_same_workload_as_hf"] = [run_batch(engine, b, 128, 32, seed=11) for b in hf_b]
        for r in report["engine_same_workload_as_hf"]:
            r.pop("tokens")
        for ours, hf in zip(report["engine_same_workload_as_hf"], report["hf_generate"]):
            ours["speedup_vs_hf"] = ours["output_tok_s"] / hf["output_tok_s"]
            print(f"  engine batch {ours['batch']} (128/32): {ours['output_tok_s']:.1f} tok/s, "
                  f"{ours['speedup_vs_hf']:.1f}x transformers", flush=True)
    cases = []
    for b in batches:
        r = run_batch(engine, b, args.isl, args.osl, seed=b)
        r.pop("tokens")
        roof = roofline_ms(engine, b, args.isl + args.osl // 2, bw)
        r["roofline_ms"] = roof["ms"]
        r["roofline_bytes"] = roof["bytes"]
        r["ratio"] = r["decode_step_ms"] / roof["ms"] if r["decode_step_ms"] else None
        cases.append(r)
        print(f"  batch {b}: {r['output_tok_s']:.0f} tok/s, step {r['decode_step_ms']:.2f} ms, "
              f"roofline {roof['ms']:.2f} ms, ratio {r['ratio']:.2f}", flush=True)
    report["bf16"] = cases
    report["sync_vs_async"] = [sync_vs_async(engine, b, args.isl, 128) for b in
                               (int(x) for x in args.sync_batches.split(",") if x)]
    profile_batches = [int(x) for x in args.profile_batch.split(",") if x]
    if profile_batches:
        report["profiles"] = [profile_decode(engine, b, args.isl) for b in profile_batches]
    if args.profile_prefill:
        report["profile_prefill"] = profile_prefill(engine, args.profile_prefill, 128)
    free(engine)
    engine = None

    if args.fp8:
        fp8_batches = [int(x) for x in args.fp8_batches.split(",")]
        engine = make_engine(write_config(args.model, fp8=True), max(fp8_batches), args.isl, args.osl, eager=False,
                             dense_gemv=args.dense_gemv, fuse_shared_experts=not args.no_fuse_shared_experts,
                             kv_cache_dtype=args.kv_cache_dtype)
        fp8_cases = []
        for b in fp8_batches:
            r = run_batch(engine, b, args.isl, min(args.osl, 256), seed=b)
            r.pop("tokens")
            roof = roofline_ms(engine, b, args.isl + min(args.osl, 256) // 2, bw)
            r["roofline_ms"], r["ratio"] = roof["ms"], r["decode_step_ms"] / roof["ms"]
            bf16 = next((c for c in cases if c["batch"] == b), None)
            r["vs_bf16_step"] = r["decode_step_ms"] / bf16["decode_step_ms"] if bf16 else None
            fp8_cases.append(r)
            print(f"  fp8 batch {b}: step {r['decode_step_ms']:.2f} ms, roofline {roof['ms']:.2f} ms, "
                  f"vs bf16 {r['vs_bf16_step']}", flush=True)
        report["fp8"] = fp8_cases
        report["fp8_profiles"] = [profile_decode(engine, b, args.isl) for b in profile_batches if b <= max(fp8_batches)]
        free(engine)
        engine = None

    with open(args.out + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    return 0


def markdown(r: dict) -> str:
    lines = [f"# Engine bench: {r['model']} on {r['device']}", "",
             f"date {r['date']}, commit {r['commit']}, copy bandwidth {r['copy_bandwidth_GBps']:.0f} GB/s, "
             f"ISL {r['isl']} / OSL {r['osl']}", "", f"command: `{r['command']}`", "",
             "| batch | output tok/s | decode step ms | roofline step ms | step / roofline | preemptions |",
             "|---|---|---|---|---|---|"]
    for c in r["bf16"]:
        lines.append(f"| {c['batch']} | {c['output_tok_s']:.0f} | {c['decode_step_ms']:.2f} | {c['roofline_ms']:.2f} | "
                     f"{c['ratio']:.2f} | {c['preemptions']} |")
    g = r["graph_vs_eager_batch1"]
    lines += ["", f"CUDA graphs, batch-1 decode step: {g['graph_ms']:.2f} ms vs eager {g['eager_ms']:.2f} ms "
                  f"(ratio {g['ratio']:.2f}); graph vs eager greedy tokens: {r['graphs_vs_eager_tokens']}"]
    if r.get("hf_generate"):
        lines += ["", "| batch (128 in / 32 out) | transformers generate tok/s | moeserve tok/s | speedup |",
                  "|---|---|---|---|"]
        for hf, ours in zip(r["hf_generate"], r["engine_same_workload_as_hf"]):
            lines.append(f"| {hf['batch']} | {hf['output_tok_s']:.1f} | {ours['output_tok_s']:.1f} | "
                         f"{ours['speedup_vs_hf']:.1f}x |")
    if r.get("fp8"):
        lines += ["", "| FP8 weights, batch | decode step ms | roofline ms | step / roofline | FP8 step / bf16 step |",
                  "|---|---|---|---|---|"]
        for c in r["fp8"]:
            vs = f"{c['vs_bf16_step']:.2f}" if c["vs_bf16_step"] else "-"
            lines.append(f"| {c['batch']} | {c['decode_step_ms']:.2f} | {c['roofline_ms']:.2f} | {c['ratio']:.2f} | {vs} |")
    if r.get("sync_vs_async"):
        lines += ["", "| batch (1024 in / 128 out) | synchronous step ms | asynchronous step ms | ratio | same tokens |",
                  "|---|---|---|---|---|"]
        for c in r["sync_vs_async"]:
            lines.append(f"| {c['batch']} | {c['sync_ms']:.2f} | {c['async_ms']:.2f} | {c['ratio']:.2f} | "
                         f"{c['tokens_equal']} |")
    for name, profs in (("bf16", r.get("profiles", [])), ("FP8", r.get("fp8_profiles", []))):
        for p in profs:
            if "graph_replay" in p:
                lines.append(f"\n{name} batch {p['batch']}: step {p['schedule'] + p['execute'] + p['update']:.2f} ms "
                             f"(schedule {p['schedule']:.2f}, execute {p['execute']:.2f}, update {p['update']:.2f}); "
                             f"its graph replayed alone {p['graph_replay']:.2f} ms; host time outside the graph "
                             f"{p['host_outside_graph']:.2f} ms")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
