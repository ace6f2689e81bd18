"""KV block manager: reference counts, prefix hits by chain hash, LRU eviction, statistics."""

import pytest

from moeserve.engine.kv_cache import KVCacheManager
from moeserve.engine.request import Request
from moeserve.engine.sampling_params import SamplingParams


def req(rid, tokens):
    return Request(rid, list(tokens), SamplingParams())


def run_prefill(kv, r):
    hits = kv.find_cached_prefix(r)
    assert kv.allocate(r, r.num_tokens - len(hits) * kv.block_size, hits)
    r.num_computed_tokens = r.num_tokens
    kv.cache_full_blocks(r)
    return hits


def test_allocate_free_and_block_zero_reserved():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    assert kv.num_free_blocks == 5
    r = req("a", range(9))  # 3 blocks
    assert kv.allocate(r, 9)
    assert len(r.block_ids) == 3 and 0 not in r.block_ids
    assert kv.num_free_blocks == 2
    big = req("b", range(100, 113))  # 4 blocks: does not fit, nothing changes
    assert not kv.allocate(big, 13)
    assert big.block_ids == [] and kv.num_free_blocks == 2
    kv.free(r)
    assert kv.num_free_blocks == 5 and r.block_ids == []
    with pytest.raises(ValueError):
        KVCacheManager(num_blocks=1, block_size=4)


def test_prefix_hit_shares_blocks_and_counts():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = req("a", list(range(12)) + [50])
    assert run_prefill(kv, a) == []
    b = req("b", list(range(12)) + [60, 61])
    hits = run_prefill(kv, b)
    assert hits == a.block_ids[:3]  # the 3 full blocks are shared, not the partial one
    assert all(kv.blocks[i].ref_count == 2 for i in hits)
    # A different first block breaks the chain even if later blocks match.
    c = req("c", [99] + list(range(1, 12)) + [7])
    assert run_prefill(kv, c) == []
    # A prompt that is exactly full blocks still leaves its last token to compute.
    d = req("d", list(range(12)))
    assert len(kv.find_cached_prefix(d)) == 2


def test_freed_blocks_revive_until_evicted_lru():
    kv = KVCacheManager(num_blocks=7, block_size=2)  # 6 usable
    a = req("a", [1, 2, 3, 4, 5])  # blocks: [1,2] [3,4] [5]
    run_prefill(kv, a)
    kv.free(a)
    assert kv.num_free_blocks == 6
    b = req("b", [1, 2, 3, 4, 9])
    assert len(kv.find_cached_prefix(b)) == 2  # still cached after free
    # Fill the cache with other content: the cached blocks get evicted.
    c = req("c", list(range(100, 112)))
    assert kv.allocate(c, 12)
    assert kv.find_cached_prefix(b) == []
    kv.free(c)


def test_eviction_prefers_uncached_then_oldest():
    kv = KVCacheManager(num_blocks=5, block_size=2)  # 4 usable
    a = req("a", [1, 2, 3])  # one full cached block + one partial
    run_prefill(kv, a)
    kv.free(a)
    b = req("b", [7, 8])
    assert kv.allocate(b, 2)  # takes a free block without evicting the cached one
    assert len(kv.find_cached_prefix(req("x", [1, 2, 5]))) == 1


def test_hit_rate_statistics():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    kv.record_lookup(20, 8)
    kv.record_lookup(20, 0)
    assert kv.hit_rate == pytest.approx(0.2)


def test_prefix_caching_off():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    a = req("a", range(13))
    run_prefill(kv, a)
    assert kv.find_cached_prefix(req("b", range(13))) == []
