"""The pool of KV-cache blocks: ref counts, an LRU free queue and the map of cached full blocks.

Invariants (checked by tests/rtp_jax/test_block_manager.py):
- Block 0 is the null block: never handed out, never in the free queue. Padding entries of block tables
  point at it, so the jitted step can write garbage there harmlessly.
- A block is in the free queue iff its `ref_cnt` is 0 (the null block excepted), so
  `num_free_blocks + #(blocks with ref_cnt > 0) == num_blocks - 1`.
- `cached[h] is b` iff `b.block_hash == h`: a block carries a hash only while it is the registered holder of
  that hash. Free blocks may keep their hash (they are evictable cache entries); the hash is dropped when
  the block is handed out again.
- Eviction order is LRU: blocks are freed onto the tail of the free queue and allocated from its head.
"""

from __future__ import annotations

from collections.abc import Iterable

from rtp_jax.cache.hashing import BlockHash

NULL_BLOCK_ID = 0


class KVCacheBlock:
    """One block of `block_size` token slots in every layer's K/V cache."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        # Links of the free queue; both None while the block is not in it.
        self.prev_free: KVCacheBlock | None = None
        self.next_free: KVCacheBlock | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock(id={self.block_id}, ref_cnt={self.ref_cnt}, hash={self.block_hash})"


class FreeBlockQueue:
    """Doubly linked list of free blocks in LRU order, with O(1) removal from the middle.

    A `collections.deque` cannot remove an arbitrary element in O(1), and prefix-cache hits take blocks
    out of the middle of the queue, hence the intrusive links on the blocks themselves.
    """

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        # Sentinels spare every operation the empty-list special cases.
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVCacheBlock:
        """Remove and return the least recently freed block."""
        block = self._head.next_free
        if block is self._tail or block is None:
            raise IndexError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        """Unlink `block`, which must be in the queue."""
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        """Put `block` at the tail (most recently freed, evicted last)."""
        if block.prev_free is not None or block.next_free is not None:
            raise ValueError(f"block {block.block_id} is already in the free queue")
        last = self._tail.prev_free
        assert last is not None
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        self.num_free_blocks += 1

    def block_ids(self) -> list[int]:
        """Ids from head (next to evict) to tail; O(n), for tests and debugging."""
        ids = []
        block = self._head.next_free
        while block is not None and block is not self._tail:
            ids.append(block.block_id)
            block = block.next_free
        return ids


class BlockPool:
    """Owns every block; hands them out, takes them back and keeps the hash -> cached block map."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2 (block 0 is the null block), got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[NULL_BLOCK_ID]
        self.free_queue = FreeBlockQueue(self.blocks[1:])
        self.cached: dict[BlockHash, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free, cached or not)."""
        return self.free_queue.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of usable (non-null) blocks held by some request."""
        return 1.0 - self.num_free_blocks / (self.num_blocks - 1)

    def get_new_blocks(self, num: int) -> list[KVCacheBlock]:
        """Hand out `num` blocks with ref_cnt 1, evicting the cached hashes they held.

        Raises ValueError when fewer than `num` blocks are free; callers check first.
        """
        if num > self.num_free_blocks:
            raise ValueError(f"requested {num} blocks but only {self.num_free_blocks} are free")
        blocks = []
        for _ in range(num):
            block = self.free_queue.popleft()
            self._evict_hash(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        """The registered block holding `block_hash`, in use or free; None if not cached."""
        return self.cached.get(block_hash)

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on cached blocks (a prefix hit), pulling free ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference on each block; those reaching 0 join the free queue tail in the given order.

        The first block given is evicted first, so callers pass a sequence tail-first.
        """
        for block in ordered_blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"block {block.block_id} freed more often than it was taken")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue.append(block)

    def cache_full_block(self, block: KVCacheBlock, block_hash: BlockHash) -> bool:
        """Register a block that just became full under `block_hash`; True if it is now the cached holder.

        When another block already holds the hash (two requests computed the same prefix independently)
        the first one stays registered and `block` stays unhashed: the map holds one block per hash, and
        a block's hash always names a map entry.
        """
        if not self.enable_prefix_caching or block_hash in self.cached:
            return False
        if block.block_hash is not None:
            raise ValueError(f"block {block.block_id} is already cached under another hash")
        block.block_hash = block_hash
        self.cached[block_hash] = block
        return True

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (e.g. after new weights): no later lookup hits an old block.

        Blocks in use stay with their requests; they just stop being shareable.
        """
        for block in self.cached.values():
            block.block_hash = None
        self.cached.clear()

    def _evict_hash(self, block: KVCacheBlock) -> None:
        if block.block_hash is None:
            return
        # The invariant cached[h] is b for every hashed b makes this deletion exact.
        del self.cached[block.block_hash]
        block.block_hash = None
