"""Small kernels of an MLA decode step, fused, against the launches they replace, on one GPU.

    PYTHONUNBUFFERED=1 python benchmarks/kernel_bench_mla_layer.py --out $OUT

Per model (V2-Lite: 16 heads; V3: 128) and decode batch, at a 1,024-token context, each row times
both ways of one piece of an MLA layer's decode step and checks that they agree:
- rope: the query's rope part rotated by its own kernel + the fused cache write (norm, k rotation,
  store), against the cache write that rotates the query too;
- absorb, value: the query into the latent space (W_UK per head) and the attention output out of it
  (W_UV per head), cuBLAS (torch.bmm) against the Triton per-head matrix-vector kernel (batches up
  to HEAD_MATVEC_MAX_BATCH); --sweep-matvec adds rows for other tiles of it ("absorb 1x64x128":
  block_b x block_k x block_n);
- argmax: greedy sampling over the vocabulary, torch.argmax against the two-launch chunked argmax.
Times are medians of CUDA-graph replays (decode runs in graphs). At these sizes every piece is
latency-bound (a few us for at most a few MB), so the ratio new / old is the result, not a roofline.
--smoke runs tiny shapes on CPU under TRITON_INTERPRET=1 in fp32 to check the script itself.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
if "--smoke" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

from kernel_bench_attention import git_commit, rel_err, time_us  # noqa: E402

from moeserve.kernels.argmax import greedy_argmax_ref, greedy_argmax_triton  # noqa: E402
from moeserve.kernels.head_matvec import HEAD_MATVEC_MAX_BATCH, head_matvec_ref, head_matvec_triton  # noqa: E402
from moeserve.kernels.mla_cache import mla_kv_write_triton  # noqa: E402
from moeserve.kernels.rotary import apply_rotary_triton  # noqa: E402

MODELS = {  # heads, nope, rope, latent, vocab
    "V2-Lite": (16, 128, 64, 512, 102400),
    "V3": (128, 128, 64, 512, 129280),
}
BATCHES = [1, 8, 16, 64]
MATVEC_TILES = [(1, 64, 128), (1, 256, 32), (16, 32, 128), (16, 64, 64), (16, 128, 64), (16, 64, 128),
                (16, 128, 32), (16, 256, 32), (16, 512, 16)]
CONTEXT, PAGE = 1024, 64  # the cache write touches one slot a token: the context only sets positions
MAX_ERR = 1e-2


def cases(model, batch, dtype, device, context, sweep=False):
    heads, nope, rope, latent, vocab = MODELS[model]
    cache = torch.randn(batch + 1, PAGE, latent + rope, device=device).to(dtype)
    q = torch.randn(batch, heads, nope + rope, device=device).to(dtype)  # the q projection's output
    kv_a = torch.randn(batch, latent + rope, device=device).to(dtype)
    norm_w = torch.ones(latent, device=device, dtype=dtype)
    cos_sin = torch.randn(context + 1, rope, device=device)
    pos = torch.full((batch,), context - 1, device=device)
    slots = torch.randperm(cache.shape[0] * PAGE, device=device)[:batch]
    q_pe = q[..., nope:]  # a view, as the layer has it
    logits = torch.randn(batch, vocab, device=device)
    w_uk = (torch.randn(heads, nope, latent, device=device) * nope ** -0.5).to(dtype)
    w_uv = (torch.randn(heads, nope, latent, device=device) * latent ** -0.5).to(dtype)  # [H, v, L]; v = nope
    o_latent = torch.randn(batch, heads, latent, device=device).to(dtype)

    def rope_old():
        r = apply_rotary_triton(q_pe, pos, cos_sin, True)
        mla_kv_write_triton(kv_a, norm_w, 1e-6, pos, cos_sin, True, cache, slots)
        return r

    def rope_new():
        return mla_kv_write_triton(kv_a, norm_w, 1e-6, pos, cos_sin, True, cache, slots, q_pe)

    pieces = {"rope": (rope_old, rope_new)}
    if batch <= HEAD_MATVEC_MAX_BATCH:
        q_nope = q[..., :nope]
        pieces["absorb"] = (lambda: head_matvec_ref(q_nope, w_uk), lambda: head_matvec_triton(q_nope, w_uk))
        pieces["value"] = (lambda: head_matvec_ref(o_latent, w_uv, True),
                           lambda: head_matvec_triton(o_latent, w_uv, True))
        for tiles in MATVEC_TILES if sweep else []:
            name = "x".join(map(str, tiles))
            pieces[f"absorb {name}"] = (pieces["absorb"][0], lambda t=tiles: head_matvec_triton(q_nope, w_uk, tiles=t))
            pieces[f"value {name}"] = (pieces["value"][0],
                                       lambda t=tiles: head_matvec_triton(o_latent, w_uv, True, tiles=t))
    return {
        **pieces,
        "argmax": (lambda: greedy_argmax_ref(logits), lambda: greedy_argmax_triton(logits)),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under the interpreter")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--sweep-matvec", action="store_true", help="also time other tiles of the matvec kernel")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    context = 70 if args.smoke else CONTEXT
    if args.smoke:
        MODELS.update({"V2-Lite": (16, 16, 16, 32, 5000), "V3": (32, 16, 16, 32, 5000)})
    meta = {"device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(), "command": " ".join(sys.argv), "torch": torch.__version__,
            "context": context}
    rows = []
    for model in args.models.split(","):
        for batch in [int(b) for b in args.batches.split(",")]:
            for piece, (old, new) in cases(model, batch, dtype, device, context, args.sweep_matvec).items():
                ref, got = old(), new()
                err = (float((ref != got).sum()) if piece == "argmax" else rel_err(got, ref))
                t_old = time_us(lambda i: old(), 1, args.smoke)
                t_new = time_us(lambda i: new(), 1, args.smoke)
                rows.append(dict(model=model, batch=batch, piece=piece, old_us=t_old, new_us=t_new,
                                 new_over_old=t_new / t_old, err=err, ok=err <= (0 if piece == "argmax" else MAX_ERR)))
                r = rows[-1]
                print(f"{model:8s} b{batch:<4d} {piece:9s} old {t_old:8.2f} us  new {t_new:8.2f} us  "
                      f"new/old {r['new_over_old']:.2f}  err {err:.2e}{'' if r['ok'] else '  MISMATCH'}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernels_mla_layer.json"), "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    if not all(r["ok"] for r in rows):
        sys.exit("some fused kernel disagrees with the launches it replaces")


if __name__ == "__main__":
    main()
