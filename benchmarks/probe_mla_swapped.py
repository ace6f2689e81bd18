"""Probe (GPU only): the MLA decode split kernel with its two dots swapped, tokens as the MMA's M side.

With V2-Lite's 16 heads the kernel's dots are 16-row MMAs (q [16 heads, 576] x tile^T, p [16, BLOCK_N] x
tile): Hopper's warpgroup MMA needs 64+ rows, so Triton runs them as the older mma.sync, from registers
loaded out of shared memory. Transposed, the same products are warpgroup MMAs: scores^T = tile [BLOCK_N,
576] x q^T [576, 16] (M = BLOCK_N tokens) and out^T += tile^T [512, BLOCK_N] x p^T [BLOCK_N, 16] (M = 512),
both reading the tile straight from shared memory, the softmax running over the tokens of each column.
This probe times that kernel (a copy of _mla_decode_split_kernel's bf16 path, transposed) against
mla_decode_triton on the same paged caches, each output against mla_decode_ref.

    PYTHONUNBUFFERED=1 python benchmarks/probe_mla_swapped.py [--out $OUT/probe_mla_swapped.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moeserve.kernels import attention_triton as at  # noqa: E402
from moeserve.kernels.attention import mla_decode_ref  # noqa: E402
from moeserve.kernels.attention_triton import _first_tile_pages, _merge, _split_range, _tile_slots_ahead  # noqa: E402

LATENT, ROPE, PAGE = 512, 64, 64


@triton.jit(do_not_specialize=["num_splits"])
def _mla_decode_swapped_kernel(
        ql_ptr, qr_ptr, kv_ptr, bt_ptr, seq_lens_ptr, part_ptr, lse_ptr,
        num_heads, num_splits, qk_scale_log2,
        stride_ql_b, stride_ql_h, stride_qr_b, stride_qr_h, stride_kv_page, stride_kv_tok, stride_bt,
        LATENT: tl.constexpr, ROPE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
        PAGE_SIZE: tl.constexpr):
    b = tl.program_id(0)
    head_block = tl.program_id(1)
    split = tl.program_id(2)
    offs_h = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < num_heads
    offs_l = tl.arange(0, LATENT)
    offs_r = tl.arange(0, ROPE)
    # q transposed: [LATENT, BLOCK_H] and [ROPE, BLOCK_H]
    q_lat_t = tl.load(ql_ptr + b * stride_ql_b + offs_h[None, :] * stride_ql_h + offs_l[:, None],
                      mask=h_mask[None, :], other=0.0)
    q_rope_t = tl.load(qr_ptr + b * stride_qr_b + offs_h[None, :] * stride_qr_h + offs_r[:, None],
                       mask=h_mask[None, :], other=0.0)
    seq_len = tl.load(seq_lens_ptr + b)
    start, end = _split_range(seq_len, split, num_splits, BLOCK_N)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc_t = tl.zeros([LATENT, BLOCK_H], dtype=tl.float32)
    pages = _first_tile_pages(bt_row, start, end, BLOCK_N, PAGE_SIZE)
    for n0 in range(start, end, BLOCK_N):
        offs_n, valid, slots, pages = _tile_slots_ahead(bt_row, pages, n0, end, BLOCK_N, PAGE_SIZE, stride_kv_page,
                                                        stride_kv_tok)
        kv_lat = tl.load(kv_ptr + slots[:, None] + offs_l[None, :], mask=valid[:, None], other=0.0)
        kv_rope = tl.load(kv_ptr + slots[:, None] + LATENT + offs_r[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(kv_lat, q_lat_t)  # [BLOCK_N, BLOCK_H]: tokens are the MMA's M side
        s += tl.dot(kv_rope, q_rope_t)
        s = tl.where(valid[:, None], s * qk_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        p = tl.exp2(s - m_new[None, :])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc_t = acc_t * alpha[None, :] + tl.dot(tl.trans(kv_lat), p.to(kv_lat.dtype))  # [LATENT, BLOCK_H]
        m_i = m_new
    has = l_i > 0.0
    out_t = acc_t / tl.where(has, l_i, 1.0)[None, :]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    rows = b * num_heads + offs_h
    tl.store(part_ptr + (rows[None, :] * num_splits + split) * LATENT + offs_l[:, None], out_t, mask=h_mask[None, :])
    tl.store(lse_ptr + rows * num_splits + split, lse, mask=h_mask)


def mla_decode_swapped(q_latent, q_rope, kv_cache, block_tables, seq_lens, scale, block_n=64, num_warps=4,
                       num_stages=2, num_splits=None, resident=1, block_h=16):
    batch, num_heads, latent = q_latent.shape
    head_blocks = triton.cdiv(num_heads, block_h)
    if num_splits is None:
        num_splits = at.choose_num_splits(batch, head_blocks, at._sm_count(q_latent.device), resident=resident)
    part = torch.empty(batch, num_heads, num_splits, latent, dtype=torch.float32, device=q_latent.device)
    lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q_latent.device)
    _mla_decode_swapped_kernel[(batch, head_blocks, num_splits)](
        q_latent, q_rope, kv_cache, block_tables, seq_lens, part, lse, num_heads, num_splits,
        scale * math.log2(math.e), q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), block_tables.stride(0),
        LATENT=latent, ROPE=q_rope.shape[-1], BLOCK_H=block_h, BLOCK_N=block_n, PAGE_SIZE=kv_cache.shape[1],
        num_warps=num_warps, num_stages=num_stages)
    out = torch.empty(batch, num_heads, latent, dtype=q_latent.dtype, device=q_latent.device)
    return _merge(part, lse, out, latent)


def make_inputs(batch, seq, heads, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    pages_per_seq = -(-seq // PAGE)
    pool = batch * pages_per_seq + 1
    kv = torch.randn(pool, PAGE, LATENT + ROPE, device=device, generator=g).to(torch.bfloat16)
    tables = (torch.randperm(pool - 1, device=device, generator=g)[:batch * pages_per_seq] + 1).view(
        batch, pages_per_seq).to(torch.int32)
    seq_lens = torch.full((batch,), seq, dtype=torch.int32, device=device)
    q_lat = torch.randn(batch, heads, LATENT, device=device, generator=g).to(torch.bfloat16)
    q_rope = torch.randn(batch, heads, ROPE, device=device, generator=g).to(torch.bfloat16)
    return q_lat, q_rope, kv, tables, seq_lens


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def main() -> int:
    from triton.testing import do_bench_cudagraph

    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="64x1100,32x2048,128x1024,8x4096,1x1024",
                        help="batch x tokens, 16 heads each")
    parser.add_argument("--variants", default="n64_w4_s2_r1,n64_w4_s2_r2,n64_w8_s2_r1,n64_w8_s2_r2",
                        help="swapped tiles: nBLOCK_N, wWARPS, sSTAGES, rRESIDENT (programs an SM for the split rule)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    device = torch.device("cuda")
    scale = 1 / math.sqrt(192)
    rows = []
    for case in args.cases.split(","):
        batch, seq = (int(v) for v in case.split("x"))
        inputs = make_inputs(batch, seq, 16, device)
        ref = mla_decode_ref(*inputs, scale)
        base = at.mla_decode_triton(*inputs, scale)
        row = dict(batch=batch, tokens=seq, bytes_us=batch * seq * (LATENT + ROPE) * 2 / 4.2e6,
                   default_us=do_bench_cudagraph(lambda: at.mla_decode_triton(*inputs, scale)) * 1e3,
                   default_err=rel_err(base, ref))
        for v in args.variants.split(","):
            kw = {k: int(x[1:]) for k, x in zip(("block_n", "num_warps", "num_stages", "resident"), v.split("_"))}
            try:
                out = mla_decode_swapped(*inputs, scale, **kw)
                row[v] = dict(us=do_bench_cudagraph(lambda: mla_decode_swapped(*inputs, scale, **kw)) * 1e3,
                              err=rel_err(out, ref))
            except Exception as exc:  # a tile that does not fit: recorded, the rest runs
                row[v] = dict(error=f"{type(exc).__name__}: {str(exc)[:200]}")
        rows.append(row)
        print(json.dumps(row), flush=True)
    variants = args.variants.split(",")
    print("\n| batch x tokens | bytes us (4.2 TB/s) | default us | " + " | ".join(variants) + " |")
    for r in rows:
        cells = [(f"{r[v]['us']:.1f} ({r[v]['err']:.1e})" if "us" in r[v] else r[v]["error"][:30]) for v in variants]
        print(f"| {r['batch']}x{r['tokens']} | {r['bytes_us']:.1f} | {r['default_us']:.1f} ({r['default_err']:.1e}) | "
              + " | ".join(cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                           command=" ".join(sys.argv), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
