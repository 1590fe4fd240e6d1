"""Per-request block tables over a shared `BlockPool`, with prefix reuse (vLLM v1's KVCacheManager design).

Contract with the scheduler, for one request:
1. New (or re-added after preemption) request: `n = get_computed_blocks(rid, tokens)` looks up the cached
   prefix, takes references on the hits and assigns them to `rid`. `n` is a multiple of `block_size` and
   always < len(tokens), so at least the last token is computed and produces logits.
2. Every step: `allocate_slots(rid, tokens, num_computed, num_new)`. True: `rid` now holds
   `ceil((num_computed + num_new) / block_size)` blocks. False: nothing changed; the scheduler preempts
   someone (or, right after step 1, calls `free(rid)` to give the hits back) and retries later.
3. Finish, abort or preempt: `free(rid)`.

Blocks whose tokens all lie within `num_computed + num_new` are registered in the prefix cache at the
`allocate_slots` call that covers them, before the step writes their K/V. A later request in the same batch
may hit them; this is sound because the jitted step writes every sequence's new K/V for a layer before that
layer's attention reads the cache. With `defer_hashing` the hashing waits for the next lookup
(`get_computed_blocks`) or for `register_full_blocks()`, which the engine calls right after launching the
step: a 2k-token prompt's 128 block hashes then run while the device computes instead of before it, and a
lookup still sees every block allocated before it.

Invariants (see tests/rtp_jax/test_block_manager.py): a request never holds a block twice; a block is held
by several requests only when it is a cached full block of an identical token prefix; ref counts equal
holdings; the null block (id 0) is never held.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from rtp_jax.cache.block_pool import BlockPool, KVCacheBlock
from rtp_jax.cache.hashing import BlockHash, hash_block_tokens


@dataclass
class _RequestBlocks:
    """What one request holds. `block_hashes[i]` is the chain hash of `blocks[i]`'s full token block.

    `len(block_hashes)` counts the leading blocks already hashed (and offered to the cache); it never
    exceeds `len(blocks)`, and only full blocks are hashed.
    """

    extra: tuple = ()
    blocks: list[KVCacheBlock] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)


class KVCacheManager:
    """Allocates KV-cache blocks to requests and reuses cached prefixes across them."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 defer_hashing: bool = False) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.defer_hashing = defer_hashing
        self.block_pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self._requests: dict[str, _RequestBlocks] = {}
        # request id -> (its tokens, full blocks to hash): registrations `defer_hashing` left for later.
        self._unhashed: dict[str, tuple[Sequence[int], int]] = {}
        # Token counts for metrics: hit rate = prefix_cache_hits / prefix_cache_queries.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    # ---- queries -------------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        """All blocks, the null block included."""
        return self.block_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now (evictable cached blocks count as free)."""
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by requests, in [0, 1]."""
        return self.block_pool.usage

    def num_blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_size)

    def has_request(self, request_id: str) -> bool:
        """Whether `request_id` holds an entry (possibly with zero blocks)."""
        return request_id in self._requests

    def block_table(self, request_id: str) -> list[int]:
        """Block ids of `request_id` in token order. KeyError for an unknown request."""
        return [b.block_id for b in self._state(request_id).blocks]

    # ---- lifecycle -----------------------------------------------------------------------------------

    def get_computed_blocks(self, request_id: str, token_ids: Sequence[int], extra: tuple = ()) -> int:
        """Prefix-cache lookup for a request that holds no blocks; returns how many tokens are cached.

        Hits are referenced and become the request's first blocks. The result is a multiple of
        `block_size` and < len(token_ids). `extra` salts every block hash of the request (LoRA id, ...)
        and is kept for its later registrations. 0 when prefix caching is off.
        """
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} already holds blocks; free it before a new lookup")
        state = _RequestBlocks(extra=tuple(extra))
        self._requests[request_id] = state
        if not self.enable_prefix_caching:
            return 0
        self.register_full_blocks()  # the lookup sees every block allocated before it
        # (len - 1) // block_size full blocks at most: the last token must be computed for its logits.
        max_hit_blocks = max(len(token_ids) - 1, 0) // self.block_size
        hits, hashes = self._longest_cached_prefix(token_ids, max_hit_blocks, state.extra)
        self.block_pool.touch(hits)
        state.blocks.extend(hits)
        state.block_hashes.extend(hashes)
        num_computed = len(hits) * self.block_size
        self.prefix_cache_queries += len(token_ids)
        self.prefix_cache_hits += num_computed
        return num_computed

    def allocate_slots(
        self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int, num_new_tokens: int,
        num_lookahead_tokens: int = 0, num_pending_tokens: int = 0,
    ) -> bool:
        """Make `request_id` hold blocks for `num_computed_tokens + num_new_tokens` tokens, plus
        `num_lookahead_tokens` slots for tokens not sampled yet (multi-step decode writes them).
        The last `num_pending_tokens` of the first num_computed + num_new tokens are not known on the
        host yet (sampled by a step in flight): `token_ids` may lack them, and their blocks are hashed
        by a later call.

        Returns False, changing nothing, when the pool lacks free blocks. On success, blocks that are
        full within the known tokens get hashed and registered for reuse (lookahead slots never are:
        their tokens are unknown). `token_ids` must hold the known tokens (num_computed + num_new - pending);
        `num_computed_tokens` must cover any prefix hits the request received.
        """
        if min(num_computed_tokens, num_new_tokens, num_lookahead_tokens, num_pending_tokens) < 0:
            raise ValueError(
                f"token counts must be >= 0, got num_computed_tokens={num_computed_tokens}, "
                f"num_new_tokens={num_new_tokens}, num_lookahead_tokens={num_lookahead_tokens}, "
                f"num_pending_tokens={num_pending_tokens}"
            )
        total = num_computed_tokens + num_new_tokens
        known = total - num_pending_tokens
        if len(token_ids) < known:
            raise ValueError(f"token_ids has {len(token_ids)} tokens, fewer than the {known} known tokens "
                             f"to allocate for")
        state = self._requests.get(request_id)
        held = len(state.blocks) if state is not None else 0
        missing = max(self.num_blocks_needed(total + num_lookahead_tokens) - held, 0)
        if missing > self.block_pool.num_free_blocks:
            return False
        if state is None:
            state = self._requests[request_id] = _RequestBlocks()
        state.blocks.extend(self.block_pool.get_new_blocks(missing))
        if self.enable_prefix_caching:
            num_full = max(known, 0) // self.block_size
            if not self.defer_hashing:
                self._cache_full_blocks(state, token_ids, num_full)
            elif num_full > len(state.block_hashes):
                self._unhashed[request_id] = (token_ids, num_full)
        return True

    def register_full_blocks(self) -> None:
        """Hash and offer to the prefix cache the full blocks `allocate_slots` left unhashed
        (`defer_hashing`); a no-op otherwise. Their tokens must still be what they were at allocation."""
        if not self._unhashed:  # the common case, once per step
            return
        pending, self._unhashed = self._unhashed, {}
        for request_id, (token_ids, num_full) in pending.items():
            state = self._requests.get(request_id)
            if state is not None:
                self._cache_full_blocks(state, token_ids, num_full)

    def free(self, request_id: str) -> None:
        """Release every block of `request_id` (finish, abort, preempt). Unknown ids are a no-op.

        Blocks go back tail-first so that, of a freed sequence, the end is evicted before its prefix:
        a prefix is what other requests are most likely to share.
        """
        # A freed request's unhashed blocks are never registered: a preempted one never wrote their K/V,
        # and a request re-admitted under the same id must not inherit them.
        self._unhashed.pop(request_id, None)
        state = self._requests.pop(request_id, None)
        if state is not None:
            self.block_pool.free_blocks(reversed(state.blocks))

    def reset_prefix_cache(self) -> bool:
        """Drop all cached hashes (e.g. after a weight update). Held blocks stay allocated. Returns True."""
        self.register_full_blocks()  # then unhashed with the rest, as without `defer_hashing`
        self.block_pool.reset_prefix_cache()
        return True

    # ---- internals -----------------------------------------------------------------------------------

    def _state(self, request_id: str) -> _RequestBlocks:
        try:
            return self._requests[request_id]
        except KeyError:
            raise KeyError(f"unknown request {request_id!r}") from None

    def _longest_cached_prefix(
        self, token_ids: Sequence[int], max_blocks: int, extra: tuple
    ) -> tuple[list[KVCacheBlock], list[BlockHash]]:
        """Cached blocks for the leading full blocks of `token_ids`, stopping at the first miss."""
        hits: list[KVCacheBlock] = []
        hashes: list[BlockHash] = []
        parent: BlockHash | None = None
        bs = self.block_size
        for i in range(max_blocks):
            parent = hash_block_tokens(parent, tuple(token_ids[i * bs : (i + 1) * bs]), extra)
            block = self.block_pool.get_cached_block(parent)
            if block is None:
                break
            hits.append(block)
            hashes.append(parent)
        return hits, hashes

    def _cache_full_blocks(self, state: _RequestBlocks, token_ids: Sequence[int], num_full: int) -> None:
        """Hash blocks [len(block_hashes), num_full) of the request and offer them to the cache."""
        bs = self.block_size
        for i in range(len(state.block_hashes), num_full):
            parent = state.block_hashes[-1] if state.block_hashes else None
            block_hash = hash_block_tokens(parent, tuple(token_ids[i * bs : (i + 1) * bs]), state.extra)
            state.block_hashes.append(block_hash)
            self.block_pool.cache_full_block(state.blocks[i], block_hash)
