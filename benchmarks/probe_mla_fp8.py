"""What the MLA decode kernel's FP8-cache switches are worth (GPU only): the same decode call with a bf16
cache, then with an e4m3 cache under attention_triton's switches: MLA_FP8_F16_DOTS (dots in fp16, not
bf16) and MLA_FP8_PTX_CVT (tiles converted by inline PTX, not a cast), and the default at 2 stages.
With V3's 128 heads (the many-heads tiles, where the engine uses neither) the probe lifts
MLA_FP8_FAST_MAX_N to try them there. Times are CUDA-graph
replays over rotating page sets (as in kernel_bench_attention.py); each row's error is against
mla_decode_ref on the same inputs. Last, with the module's defaults, q scaled by 1, 1e3 and 1e6 (bf16
holds values past fp16's 65,504, which the fp16 dots must scale away): finite outputs, error vs the
reference.

    PYTHONUNBUFFERED=1 python benchmarks/probe_mla_fp8.py [--out $OUT/probe_mla_fp8.json]
Results (H200, 2026-12-01): docs/perf/kernels_attention.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import moeserve.kernels.attention_triton as at  # noqa: E402
from kernel_bench_attention import PagedInputs, rel_err, time_us  # noqa: E402
from moeserve.kernels.attention import mla_decode_ref  # noqa: E402

LATENT, ROPE, PAGE = 512, 64, 64
# name: (F16 dots, PTX conversion, tile overrides)
VARIANTS = {
    "bf16 cache": None,
    "fp8, bf16 dots (before)": (False, False, {}),
    "fp8, fp16 dots, cast": (True, False, {}),
    "fp8, fp16 dots, PTX conversion (default)": (True, True, {}),
    "fp8 default, 2 stages": (True, True, dict(num_stages=2)),
}
DEFAULTS = (at.MLA_FP8_F16_DOTS, at.MLA_FP8_PTX_CVT, at.MLA_FP8_FAST_MAX_N)
CASES = [(16, 1, 1024), (16, 64, 1024), (16, 128, 4096), (128, 64, 1024)]  # (heads, batch, seq)


def run_case(heads, batch, seq, name, variant):
    dtype = torch.bfloat16 if variant is None else torch.float8_e4m3fn
    inp = PagedInputs(batch, seq, PAGE, (LATENT + ROPE,), dtype, "cuda")
    qs = [torch.randn(batch, heads, LATENT + ROPE, device="cuda").to(torch.bfloat16) for _ in range(inp.n_sets)]
    f16, ptx, tiles = variant if variant is not None else (True, True, {})
    at.MLA_FP8_F16_DOTS, at.MLA_FP8_PTX_CVT, at.MLA_FP8_FAST_MAX_N = f16, ptx, 10 ** 6

    def run(i):
        return at.mla_decode_triton(qs[i][..., :LATENT], qs[i][..., LATENT:], inp.caches[0], inp.tables[i],
                                    inp.seq_lens, (128 + ROPE) ** -0.5, **tiles)

    row = dict(heads=heads, batch=batch, seq=seq, variant=name)
    try:
        ref = mla_decode_ref(qs[0][..., :LATENT], qs[0][..., LATENT:], inp.caches[0], inp.tables[0], inp.seq_lens,
                             (128 + ROPE) ** -0.5)
        row["rel_err"] = rel_err(run(0), ref)
        row["us"] = time_us(run, inp.n_sets, False)
    except Exception as e:  # e.g. out of shared memory: the row says so
        row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
    return row


def large_q_rows() -> list[dict]:
    """The defaults (16 heads: fp16 dots; 128: the many-heads tiles' bf16 dots) with q scaled up, the
    softmax scale down by as much, so the reference's scores stay the same size."""
    at.MLA_FP8_F16_DOTS, at.MLA_FP8_PTX_CVT, at.MLA_FP8_FAST_MAX_N = DEFAULTS
    rows = []
    for q_scale in (1.0, 1e3, 1e6):
        for heads, batch in ((16, 64), (128, 32)):
            inp = PagedInputs(batch, 1100, PAGE, (LATENT + ROPE,), torch.float8_e4m3fn, "cuda", max_sets=1)
            q = (torch.randn(batch, heads, LATENT + ROPE, device="cuda") * q_scale).to(torch.bfloat16)
            args = (q[..., :LATENT].contiguous(), q[..., LATENT:].contiguous(), inp.caches[0], inp.tables[0],
                    inp.seq_lens, (128 + ROPE) ** -0.5 / q_scale)
            out = at.mla_decode_triton(*args)
            rows.append(dict(heads=heads, batch=batch, q_scale=q_scale, finite=bool(torch.isfinite(out).all()),
                             rel_err=rel_err(out, mla_decode_ref(*args))))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="a .json path")
    args = p.parse_args()
    rows = []
    for heads, batch, seq in CASES:
        for name, variant in VARIANTS.items():
            if heads > 16 and variant is not None and variant[2]:
                continue  # the many-heads tiles are tuned apart
            row = run_case(heads, batch, seq, name, variant)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("| heads | batch | seq | variant | us | rel err |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['heads']} | {r['batch']} | {r['seq']} | {r['variant']} | {r.get('us', float('nan')):.1f} | "
              f"{r.get('rel_err', float('nan')):.1e} {r.get('error', '')} |")
    large_q = large_q_rows()
    for r in large_q:
        print(f"large q x{r['q_scale']:g}, {r['heads']} heads: finite {r['finite']}, rel err {r['rel_err']:.1e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                       "command": " ".join(sys.argv), "rows": rows, "large_q": large_q}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
