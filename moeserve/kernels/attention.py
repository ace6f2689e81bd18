"""Attention over a paged KV cache.

The cache is split into fixed-size blocks; a sequence's tokens live in the blocks its row of
`block_tables` lists, token t at block_tables[b, t // block_size], offset t % block_size.

- `mla_decode`: one query token per sequence, MLA in the weight-absorbed form: queries are
  already projected into the latent space, the cache holds [latent (L) | rope key (R)] per
  token, and the output is the attention-weighted latent (projected to values by the caller).
- `paged_decode`: one query token per sequence, grouped-query attention over K/V caches.
- `varlen_attention`: prefill over sequences packed back to back (no padding); each sequence's
  queries are the last q_len of its k_len keys (prefix context already in the cache), causal.
  K/V are given packed by sequence (MLA's expanded form).
- `paged_prefill`: the same, with K/V read from paged GQA caches through the block tables.

The prefill entry points take an optional `memo`, a dict that lives as long as one step's batch:
the Triton path keeps its launch table there, so only a step's first layer copies it to the GPU.
"""

from __future__ import annotations

import numpy as np
import torch


def gather_paged(cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """cache [num_blocks, block_size, ...] -> [B, max_len, ...] (positions past seq_len hold junk)."""
    block_size = cache.shape[1]
    max_len = int(seq_lens.max()) if seq_lens.numel() else 0
    nblk = (max_len + block_size - 1) // block_size
    blocks = cache[block_tables[:, :nblk].long()]  # [B, nblk, block_size, ...]
    return blocks.reshape(blocks.shape[0], nblk * block_size, *cache.shape[2:])[:, :max_len]


def memoized(memo: dict | None, key: tuple, build):
    """build(), kept in `memo` (one step's batch) under key so that the step's other layers reuse it."""
    if memo is None:
        return build()
    if key not in memo:
        memo[key] = build()
    return memo[key]


def to_device_async(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A small host array on device without waiting: a pageable copy would stall the host until the
    GPU has drained its queue, once per layer."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def gather_sequences(cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: list[int],
                     memo: dict | None = None) -> torch.Tensor:
    """The first seq_lens[b] entries of every sequence b, back to back: [sum(seq_lens), *entry], one
    indexing op for the whole batch."""
    block_size = cache.shape[1]

    def slots():
        lens = np.asarray(seq_lens, dtype=np.int64)
        rows = np.repeat(np.arange(lens.size), lens)
        pos = np.arange(rows.size) - np.repeat(np.cumsum(lens) - lens, lens)
        idx = to_device_async(np.stack([rows, pos // block_size, pos % block_size]), block_tables.device)
        return block_tables[idx[0], idx[1]].long() * block_size + idx[2]

    return _index_rows(cache.view(-1, *cache.shape[2:]), memoized(memo, ("gather_slots", block_size), slots))


def _index_rows(flat: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    if flat.dtype == torch.float8_e4m3fn:  # move the bytes: indexing kernels are not all built for float8
        return flat.view(torch.uint8)[rows].view(flat.dtype)
    return flat[rows]


def _length_mask(seq_lens: torch.Tensor, max_len: int) -> torch.Tensor:
    return torch.arange(max_len, device=seq_lens.device)[None, :] < seq_lens[:, None]


def mla_decode_ref(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_cache: torch.Tensor,
                   block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q_latent [B, H, L], q_rope [B, H, R], kv_cache [NB, BS, L + R] -> [B, H, L] (q dtype)."""
    latent_dim = q_latent.shape[-1]
    kv = gather_paged(kv_cache, block_tables, seq_lens).to(torch.float32)  # [B, S, L+R]
    valid = _length_mask(seq_lens, kv.shape[1])
    kv = kv.masked_fill(~valid[..., None], 0.0)  # slots past seq_len may hold anything, NaN included
    q = torch.cat((q_latent, q_rope), dim=-1).to(torch.float32)  # [B, H, L+R]
    scores = torch.einsum("bhd,bsd->bhs", q, kv) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhs,bsl->bhl", probs, kv[..., :latent_dim]).to(q_latent.dtype)


def paged_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, D], k_cache/v_cache [NB, BS, Hkv, D] -> [B, H, D] (q dtype)."""
    num_heads, num_kv = q.shape[1], k_cache.shape[2]
    valid = _length_mask(seq_lens, int(seq_lens.max()) if seq_lens.numel() else 0)
    # slots past seq_len may hold anything, NaN included
    k = gather_paged(k_cache, block_tables, seq_lens).to(torch.float32).masked_fill(~valid[..., None, None], 0.0)
    v = gather_paged(v_cache, block_tables, seq_lens).to(torch.float32).masked_fill(~valid[..., None, None], 0.0)
    k = k.repeat_interleave(num_heads // num_kv, dim=2)
    v = v.repeat_interleave(num_heads // num_kv, dim=2)
    scores = torch.einsum("bhd,bshd->bhs", q.to(torch.float32), k) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    return torch.einsum("bhs,bshd->bhd", scores.softmax(dim=-1), v).to(q.dtype)


def varlen_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: list[int],
                         cu_seqlens_k: list[int], scale: float) -> torch.Tensor:
    """q [Tq, H, D], k [Tk, Hkv, D], v [Tk, Hkv, Dv], cumulative lengths as host lists -> [Tq, H, Dv]."""
    num_heads, num_kv = q.shape[1], k.shape[1]
    out = q.new_empty(q.shape[0], num_heads, v.shape[-1])
    for b in range(len(cu_seqlens_q) - 1):
        qs, qe = cu_seqlens_q[b], cu_seqlens_q[b + 1]
        ks, ke = cu_seqlens_k[b], cu_seqlens_k[b + 1]
        if qe == qs:
            continue
        qb = q[qs:qe].to(torch.float32).transpose(0, 1)  # [H, q, D]
        kb = k[ks:ke].to(torch.float32).repeat_interleave(num_heads // num_kv, dim=1).transpose(0, 1)
        vb = v[ks:ke].to(torch.float32).repeat_interleave(num_heads // num_kv, dim=1).transpose(0, 1)
        scores = qb @ kb.transpose(1, 2) * scale  # [H, q, k]
        q_pos = torch.arange(ke - ks - (qe - qs), ke - ks, device=q.device)
        causal = torch.arange(ke - ks, device=q.device)[None, :] <= q_pos[:, None]
        scores = scores.masked_fill(~causal, float("-inf"))
        out[qs:qe] = (scores.softmax(dim=-1) @ vb).transpose(0, 1).to(out.dtype)
    return out


def paged_prefill_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      query_lens: list[int], seq_lens: list[int], scale: float,
                      memo: dict | None = None) -> torch.Tensor:
    """q [sum(query_lens), H, D], k_cache/v_cache [NB, BS, Hkv, D] -> [Tq, H, D]: the sequences' keys
    gathered from the cache, then varlen_attention_ref."""
    keys = gather_sequences(k_cache, block_tables, seq_lens, memo)
    vals = gather_sequences(v_cache, block_tables, seq_lens, memo)
    cu_q, cu_k = np.cumsum([0, *query_lens]).tolist(), np.cumsum([0, *seq_lens]).tolist()
    return varlen_attention_ref(q, keys, vals, cu_q, cu_k, scale)


def _use_triton(q: torch.Tensor, *caches: torch.Tensor) -> bool:
    from moeserve.kernels.fp8 import triton_runs_on

    if not triton_runs_on(q, *caches):
        return False
    return q.is_cuda or q.dtype in (torch.float32, torch.float16)  # bf16 is wrong under the interpreter


def mla_decode(q_latent, q_rope, kv_cache, block_tables, seq_lens, scale):
    if _use_triton(q_latent, kv_cache):
        from moeserve.kernels.attention_triton import mla_decode_triton
        return mla_decode_triton(q_latent, q_rope, kv_cache, block_tables, seq_lens, scale)
    return mla_decode_ref(q_latent, q_rope, kv_cache, block_tables, seq_lens, scale)


def paged_decode(q, k_cache, v_cache, block_tables, seq_lens, scale, out=None):
    """GQA decode; into `out` when given (the Triton kernel writes there directly)."""
    if _use_triton(q, k_cache, v_cache):
        from moeserve.kernels.attention_triton import paged_decode_triton
        return paged_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, scale, out=out)
    ref = paged_decode_ref(q, k_cache, v_cache, block_tables, seq_lens, scale)
    return ref if out is None else out.copy_(ref)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, memo=None):
    """Prefill over packed K/V: one Triton launch for all sequences where Triton runs, else the reference."""
    if _use_triton(q, k, v):
        from moeserve.kernels.attention_triton import varlen_attention_triton
        return varlen_attention_triton(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, memo)
    return varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, scale)


def paged_prefill(q, k_cache, v_cache, block_tables, query_lens, seq_lens, scale, memo=None):
    """Prefill over the paged GQA caches: one Triton launch, K/V read in place through the block
    tables, where Triton runs; else gathered and the reference."""
    if _use_triton(q, k_cache, v_cache):
        from moeserve.kernels.attention_triton import paged_prefill_triton
        return paged_prefill_triton(q, k_cache, v_cache, block_tables, query_lens, seq_lens, scale, memo)
    return paged_prefill_ref(q, k_cache, v_cache, block_tables, query_lens, seq_lens, scale, memo)


def varlen_attention_sdpa(q, k, v, cu_seqlens_q, cu_seqlens_k, scale):
    """The former GPU prefill path, one SDPA call per sequence; kept as the benchmark's baseline."""
    import torch.nn.functional as F

    num_heads, num_kv = q.shape[1], k.shape[1]
    out = q.new_empty(q.shape[0], num_heads, v.shape[-1])
    for b in range(len(cu_seqlens_q) - 1):
        qs, qe, ks, ke = cu_seqlens_q[b], cu_seqlens_q[b + 1], cu_seqlens_k[b], cu_seqlens_k[b + 1]
        if qe == qs:
            continue
        qb, kb, vb = q[qs:qe].transpose(0, 1), k[ks:ke].transpose(0, 1), v[ks:ke].transpose(0, 1)
        q_len, k_len = qe - qs, ke - ks
        if q_len == k_len:
            mask, causal = None, True
        else:  # queries are the last q_len of k_len positions (prefix already cached)
            q_pos = torch.arange(k_len - q_len, k_len, device=q.device)
            mask, causal = torch.arange(k_len, device=q.device)[None, :] <= q_pos[:, None], False
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, is_causal=causal, scale=scale,
                                           enable_gqa=num_heads != num_kv)
        out[qs:qe] = o.transpose(0, 1)
    return out
