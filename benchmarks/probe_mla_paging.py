"""Probe (GPU only): what the paged-cache addressing costs the MLA decode kernel at V2-Lite's batch 64.

A copy of the split kernel's loop with four ways to find a tile's cache rows, then the kernel as it is
(the block-table entries of each tile loaded a tile ahead) at 2 and 3 stages; 64 sequences of 1,100
tokens, 16 heads, latent 512 + rope 64, bf16, pages of 16 and 64 tokens in a shuffled block table:
  mode 0  no block table: each sequence's rows contiguous (a bound, not a paged cache)
  mode 1  each tile's block-table entries loaded just before its rows (the kernel before 7cde149)
  mode 2  one scalar block-table load a tile (needs pages of >= BLOCK_N tokens)
  mode 3  that scalar loaded a tile ahead (the same)
Every paged variant is checked against mla_decode_ref.

    PYTHONUNBUFFERED=1 python benchmarks/probe_mla_paging.py

Result (H200, 2026-12-01, docs/perf/kernels_attention.md): loading the entries a tile ahead, with a third
stage, takes the split kernel from ~39 to ~33 us; the kernel now does so for any page size.
"""

from __future__ import annotations

import math
import os
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moeserve.kernels.attention import mla_decode_ref  # noqa: E402
from moeserve.kernels.attention_triton import _merge, _split_range, _store_partial, mla_decode_triton  # noqa: E402


@triton.jit
def _probe_kernel(ql_ptr, qr_ptr, kv_ptr, bt_ptr, seq_lens_ptr, part_ptr, lse_ptr, num_heads, num_splits,
                  qk_scale_log2, stride_ql_b, stride_ql_h, stride_qr_b, stride_qr_h, stride_kv_page, stride_kv_tok,
                  stride_bt, max_len, LATENT: tl.constexpr, ROPE: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, PAGE_MODE: tl.constexpr):
    b = tl.program_id(0)
    split = tl.program_id(1)
    offs_h = tl.arange(0, BLOCK_H)
    offs_l = tl.arange(0, LATENT)
    offs_r = tl.arange(0, ROPE)
    q_lat = tl.load(ql_ptr + b * stride_ql_b + offs_h[:, None] * stride_ql_h + offs_l[None, :])
    q_rope = tl.load(qr_ptr + b * stride_qr_b + offs_h[:, None] * stride_qr_h + offs_r[None, :])
    start, end = _split_range(tl.load(seq_lens_ptr + b), split, num_splits, BLOCK_N)
    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, LATENT], dtype=tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    page_ahead = tl.load(bt_row + start // PAGE_SIZE, mask=start < end, other=0).to(tl.int64)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = offs_n < end
        in_page = (offs_n % PAGE_SIZE).to(tl.int64) * stride_kv_tok
        if PAGE_MODE == 0:
            slots = (b.to(tl.int64) * max_len + offs_n) * stride_kv_tok
        elif PAGE_MODE == 1:
            slots = tl.load(bt_row + offs_n // PAGE_SIZE, mask=valid, other=0).to(tl.int64) * stride_kv_page + in_page
        elif PAGE_MODE == 2:
            slots = tl.load(bt_row + n0 // PAGE_SIZE).to(tl.int64) * stride_kv_page + in_page
        else:
            slots = page_ahead * stride_kv_page + in_page
            page_ahead = tl.load(bt_row + (n0 + BLOCK_N) // PAGE_SIZE, mask=n0 + BLOCK_N < end, other=0).to(tl.int64)
        kv_lat = tl.load(kv_ptr + slots[:, None] + offs_l[None, :], mask=valid[:, None], other=0.0)
        kv_rope = tl.load(kv_ptr + slots[:, None] + LATENT + offs_r[None, :], mask=valid[:, None], other=0.0)
        s = tl.dot(q_lat, tl.trans(kv_lat)) + tl.dot(q_rope, tl.trans(kv_rope))
        s = tl.where(valid[None, :], s * qk_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv_lat.dtype), kv_lat)
        m_i = m_new
    _store_partial(acc, m_i, l_i, part_ptr, lse_ptr, b * num_heads + offs_h, offs_h < num_heads, offs_l,
                   offs_l < LATENT, LATENT, split, num_splits)


def main() -> None:
    torch.manual_seed(0)
    batch, heads, latent, rope, seq, splits, scale = 64, 16, 512, 64, 1100, 4, 0.1
    q_lat = torch.randn(batch, heads, latent, device="cuda", dtype=torch.bfloat16)
    q_rope = torch.randn(batch, heads, rope, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.full((batch,), seq, device="cuda", dtype=torch.int32)
    print(f"cache bytes read {batch * seq * (latent + rope) * 2 / 1e6:.1f} MB", flush=True)
    for page in (16, 64):
        pages = -(-seq // page)
        cache = torch.randn(batch * pages, page, latent + rope, device="cuda", dtype=torch.bfloat16)
        shuffled = torch.randperm(batch * pages, device="cuda", dtype=torch.int32).view(batch, pages).contiguous()
        ordered = torch.arange(batch * pages, device="cuda", dtype=torch.int32).view(batch, pages).contiguous()
        ref = mla_decode_ref(q_lat, q_rope, cache, shuffled, seq_lens, scale)
        part = torch.empty(batch, heads, splits, latent, device="cuda", dtype=torch.float32)
        lse = torch.empty(batch, heads, splits, device="cuda", dtype=torch.float32)
        out = torch.empty(batch, heads, latent, device="cuda", dtype=torch.bfloat16)
        for mode in (0, 1, 2, 3):
            if mode >= 2 and page < 32:
                continue  # a 32-token tile spans two pages
            for stages in (2, 3):
                def run(mode=mode, stages=stages):
                    _probe_kernel[(batch, splits)](
                        q_lat, q_rope, cache, ordered if mode == 0 else shuffled, seq_lens, part, lse, heads, splits,
                        scale * math.log2(math.e), q_lat.stride(0), q_lat.stride(1), q_rope.stride(0),
                        q_rope.stride(1), cache.stride(0), cache.stride(1), shuffled.stride(0), pages * page,
                        LATENT=latent, ROPE=rope, BLOCK_H=heads, BLOCK_N=32, PAGE_SIZE=page, PAGE_MODE=mode,
                        num_warps=4, num_stages=stages)
                    return _merge(part, lse, out, latent)
                us = do_bench_cudagraph(run) * 1e3
                err = "" if mode == 0 else f", rel err {(run().float() - ref.float()).norm() / ref.float().norm():.1e}"
                print(f"page {page}: probe mode {mode}, {stages} stages, split + merge: {us:.1f} us{err}", flush=True)
        for stages in (2, 3):
            us = do_bench_cudagraph(lambda: mla_decode_triton(q_lat, q_rope, cache, shuffled, seq_lens, scale,
                                                              num_stages=stages)) * 1e3
            got = mla_decode_triton(q_lat, q_rope, cache, shuffled, seq_lens, scale, num_stages=stages)
            err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
            print(f"page {page}: mla_decode_triton, {stages} stages: {us:.1f} us, rel err {err:.1e}", flush=True)


if __name__ == "__main__":
    main()
