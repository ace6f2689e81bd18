"""Paged KV block manager with prefix caching.

Blocks are fixed-size pages of the KV cache tensors the runner owns. Each block has a
reference count; a full block of computed tokens gets a hash that chains its parent's hash
with its own token ids, so two sequences with the same prefix share the same blocks.
A block whose count drops to zero goes to the free queue but keeps its hash: it can be
revived by a later hit until it is evicted (least recently freed first) for a new use.

Block 0 is never handed out: it is the scratch block that padded tokens (CUDA graphs) write to.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from moeserve.engine.request import Request

BlockKey = tuple[int | None, tuple[int, ...]]  # (parent block hash, this block's token ids)


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    key: BlockKey | None = None  # set once the block is full and registered in the prefix cache


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # ref_count == 0 blocks, oldest first; popitem(last=False) evicts the least recently freed.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self.cached: dict[BlockKey, int] = {}  # key -> block id
        self.query_tokens = 0  # prompt tokens looked up in the prefix cache
        self.hit_tokens = 0

    # ---- accounting -------------------------------------------------------------------------
    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

    # ---- prefix cache -----------------------------------------------------------------------
    def _keys(self, request: Request, num_full_blocks: int) -> list[BlockKey]:
        """Keys of the request's first num_full_blocks blocks; computed once per block, since a
        request's tokens only ever grow."""
        keys, bs = request.block_keys, self.block_size
        while len(keys) < num_full_blocks:
            i = len(keys)
            parent = hash(keys[-1]) if keys else None
            keys.append((parent, tuple(request.token_slice(i * bs, (i + 1) * bs))))
        return keys[:num_full_blocks]

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Block ids holding the longest cached prefix of the request's tokens. At least one
        token is always left to compute, since the step needs its logits."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for key in self._keys(request, (request.num_tokens - 1) // self.block_size):
            block_id = self.cached.get(key)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def record_lookup(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.query_tokens += num_prompt_tokens
        self.hit_tokens += num_hit_tokens

    # ---- allocation -------------------------------------------------------------------------
    def allocate(self, request: Request, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Give the request blocks for its computed tokens plus num_new_tokens more, reusing
        cached_blocks (a prefix hit, only when it has no blocks yet). False (nothing changed) if
        the free queue is too short."""
        num_needed = -(-(request.num_computed_tokens + len(cached_blocks) * self.block_size + num_new_tokens)
                       // self.block_size) - len(request.block_ids) - len(cached_blocks)
        revived = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        if num_needed + revived > self.num_free_blocks:
            return False
        for block_id in cached_blocks:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1
            request.block_ids.append(block_id)
        for _ in range(max(num_needed, 0)):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.key is not None:  # evict its cached content
                if self.cached.get(block.key) == block_id:
                    del self.cached[block.key]
                block.key = None
            block.ref_count = 1
            request.block_ids.append(block_id)
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's blocks that are now full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        # A block holding a pending token (its id still on the GPU) has no key yet.
        num_full = min(request.num_computed_tokens, request.num_known_tokens) // self.block_size
        start = request.num_cached_blocks_registered
        keys = self._keys(request, num_full)
        for key, block_id in zip(keys[start:], request.block_ids[start:num_full]):
            block = self.blocks[block_id]
            if block.key is None and key not in self.cached:
                block.key = key
                self.cached[key] = block_id
        request.num_cached_blocks_registered = num_full

    def free(self, request: Request) -> None:
        """Drop the request's references; the tail is queued first so it is evicted first."""
        for block_id in reversed(request.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.key is None:
                    self.free_queue[block_id] = None
                    self.free_queue.move_to_end(block_id, last=False)  # nothing to keep: reuse first
                else:
                    self.free_queue[block_id] = None
        request.block_ids = []

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            if block.ref_count == 0 and block.key is not None:
                block.key = None
        self.cached = {k: v for k, v in self.cached.items() if self.blocks[v].key is not None}
