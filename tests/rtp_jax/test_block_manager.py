"""Tests of the paged KV-cache block manager (rtp_jax/cache): unit properties and a stateful model check."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from rtp_jax.cache import (
    NULL_BLOCK_ID,
    BlockPool,
    KVCacheManager,
    hash_block_tokens,
    hash_request_blocks,
)

BS = 4


def _manager(num_blocks: int = 9, prefix: bool = True) -> KVCacheManager:
    return KVCacheManager(num_blocks=num_blocks, block_size=BS, enable_prefix_caching=prefix)


def _prefill(mgr: KVCacheManager, rid: str, tokens: list[int]) -> int:
    """Admit a request the way the scheduler does; returns the cached token count."""
    computed = mgr.get_computed_blocks(rid, tokens)
    assert mgr.allocate_slots(rid, tokens, computed, len(tokens) - computed)
    return computed


def _pool_snapshot(mgr: KVCacheManager) -> tuple:
    pool = mgr.block_pool
    return (
        pool.free_queue.block_ids(),
        sorted((h, b.block_id) for h, b in pool.cached.items()),
        [(b.ref_cnt, b.block_hash) for b in pool.blocks],
        sorted((rid, tuple(mgr.block_table(rid))) for rid in mgr._requests),
    )


# ---- hashing -------------------------------------------------------------------------------------------


def test_hash_is_deterministic_and_chained() -> None:
    """Same inputs give the same int; parent, tokens and extra each change it."""
    h = hash_block_tokens(None, (1, 2, 3))
    assert h == hash_block_tokens(None, (1, 2, 3))
    assert isinstance(h, int)
    assert h != hash_block_tokens(h, (1, 2, 3))
    assert h != hash_block_tokens(None, (1, 2, 4))
    assert h != hash_block_tokens(None, (1, 2, 3), ("lora-a",))
    # Stable across processes and runs: a pinned value (changing the encoding invalidates persisted caches).
    assert h == 190034068317628446254580201319735638180
    chain = hash_request_blocks([1, 2, 3, 4, 5, 6, 7, 8, 9], BS)
    assert chain == [hash_block_tokens(None, (1, 2, 3, 4)), hash_block_tokens(chain[0], (5, 6, 7, 8))]


# ---- construction and sizes ----------------------------------------------------------------------------


def test_too_few_blocks_raises_naming_num_blocks() -> None:
    """num_blocks < 2 leaves no usable block besides the null block."""
    with pytest.raises(ValueError, match="num_blocks"):
        KVCacheManager(num_blocks=1, block_size=BS)


def test_null_block_reserved_at_start() -> None:
    """Block 0 is never free: num_free_blocks starts at num_blocks - 1 and usage at 0."""
    mgr = _manager(num_blocks=5)
    assert mgr.num_free_blocks == 4
    assert mgr.usage == 0.0
    assert NULL_BLOCK_ID not in mgr.block_pool.free_queue.block_ids()


def test_allocation_sizes_grow_by_ceil() -> None:
    """A request holds ceil(tokens / block_size) blocks after each allocation, growing in place."""
    mgr = _manager()
    tokens = list(range(10))
    assert mgr.allocate_slots("a", tokens, 0, 5)
    assert len(mgr.block_table("a")) == 2
    first = mgr.block_table("a")
    assert mgr.allocate_slots("a", tokens, 5, 3)  # 8 tokens: still 2 blocks
    assert mgr.block_table("a") == first
    assert mgr.allocate_slots("a", tokens, 8, 1)  # 9 tokens: a third block
    assert mgr.block_table("a")[:2] == first and len(mgr.block_table("a")) == 3
    assert mgr.num_free_blocks == 8 - 3
    assert mgr.usage == pytest.approx(3 / 8)
    assert mgr.num_blocks_needed(0) == 0 and mgr.num_blocks_needed(4) == 1 and mgr.num_blocks_needed(5) == 2


def test_allocate_false_changes_nothing_when_full() -> None:
    """Without enough free blocks allocate_slots returns False and leaves pool and tables untouched."""
    mgr = _manager(num_blocks=5)  # 4 usable blocks
    tokens = list(range(40))
    assert mgr.allocate_slots("a", tokens, 0, 12)  # 3 blocks
    before = _pool_snapshot(mgr)
    assert not mgr.allocate_slots("a", tokens, 12, 8)  # needs 2 more, 1 free
    assert not mgr.allocate_slots("b", tokens, 0, 8)  # new request needing 2
    assert _pool_snapshot(mgr) == before
    assert not mgr.has_request("b")
    assert mgr.allocate_slots("a", tokens, 12, 4)  # exactly the last free block
    assert mgr.num_free_blocks == 0


def test_free_returns_blocks_and_unknown_free_is_noop() -> None:
    """free gives every block back; freeing an unknown or already freed request does nothing."""
    mgr = _manager()
    assert mgr.allocate_slots("a", list(range(9)), 0, 9)
    mgr.free("a")
    assert mgr.num_free_blocks == 8 and not mgr.has_request("a")
    mgr.free("a")
    mgr.free("never-seen")
    assert mgr.num_free_blocks == 8
    with pytest.raises(KeyError):
        mgr.block_table("a")


def test_null_block_never_handed_out() -> None:
    """Allocating every usable block never yields block 0."""
    mgr = _manager(num_blocks=6, prefix=False)
    assert mgr.allocate_slots("a", list(range(20)), 0, 20)
    assert sorted(mgr.block_table("a")) == [1, 2, 3, 4, 5]
    assert not mgr.allocate_slots("b", [0], 0, 1)


# ---- prefix caching ------------------------------------------------------------------------------------


def test_prefix_hit_shares_block_ids() -> None:
    """A second request with the same prompt reuses the first's full blocks (ref_cnt 2) and counts hits."""
    mgr = _manager()
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    assert _prefill(mgr, "a", prompt) == 0
    assert _prefill(mgr, "b", prompt) == 8
    a, b = mgr.block_table("a"), mgr.block_table("b")
    assert a[:2] == b[:2] and a[2] != b[2]
    assert [mgr.block_pool.blocks[i].ref_cnt for i in a[:2]] == [2, 2]
    assert mgr.prefix_cache_queries == 20 and mgr.prefix_cache_hits == 8


def test_fully_cached_prompt_leaves_last_token_to_compute() -> None:
    """A prompt of whole cached blocks gets one block fewer, so its last token is recomputed."""
    mgr = _manager()
    prompt = list(range(8))
    _prefill(mgr, "a", prompt)
    assert mgr.get_computed_blocks("b", prompt) == 4
    assert mgr.get_computed_blocks("c", prompt[:1]) == 0
    assert mgr.get_computed_blocks("d", []) == 0


def test_prefix_caching_off_never_hits() -> None:
    """With prefix caching disabled lookups return 0 and blocks are never shared."""
    mgr = _manager(prefix=False)
    prompt = list(range(10))
    _prefill(mgr, "a", prompt)
    assert _prefill(mgr, "b", prompt) == 0
    assert not set(mgr.block_table("a")) & set(mgr.block_table("b"))
    assert not mgr.block_pool.cached


def test_freed_cached_block_still_hits_until_evicted() -> None:
    """A freed full block stays a hit; once its block is reallocated, the hit is gone."""
    mgr = _manager(num_blocks=4)  # 3 usable blocks
    prompt = [7, 7, 7, 7, 1]
    _prefill(mgr, "a", prompt)
    mgr.free("a")
    assert mgr.get_computed_blocks("b", prompt) == 4
    mgr.free("b")
    assert mgr.allocate_slots("filler", list(range(12)), 0, 12)  # takes all 3 blocks, evicting the hash
    mgr.free("filler")
    assert mgr.get_computed_blocks("c", prompt) == 0


def test_lru_eviction_order() -> None:
    """Free blocks are reused least recently freed first, and a sequence's tail before its head."""
    mgr = _manager(num_blocks=7, prefix=False)
    assert mgr.allocate_slots("a", list(range(12)), 0, 12)
    assert mgr.allocate_slots("b", list(range(12)), 0, 12)
    a, b = mgr.block_table("a"), mgr.block_table("b")
    mgr.free("b")
    mgr.free("a")
    assert mgr.block_pool.free_queue.block_ids() == b[::-1] + a[::-1]
    assert mgr.allocate_slots("c", list(range(16)), 0, 16)
    assert mgr.block_table("c") == b[::-1] + a[::-1][:1]


def test_touch_moves_cached_block_out_of_free_queue() -> None:
    """A hit on a free cached block takes it off the free queue; freeing again puts it at the tail."""
    mgr = _manager(num_blocks=5)
    _prefill(mgr, "a", [3, 3, 3, 3, 9])
    mgr.free("a")
    cached_id = mgr.block_pool.cached[hash_block_tokens(None, (3, 3, 3, 3))].block_id
    assert mgr.get_computed_blocks("b", [3, 3, 3, 3, 5]) == 4
    assert cached_id not in mgr.block_pool.free_queue.block_ids()
    assert mgr.num_free_blocks == 3
    mgr.free("b")
    assert mgr.block_pool.free_queue.block_ids()[-1] == cached_id


def test_duplicate_full_block_keeps_first_registration() -> None:
    """Two requests computing the same block independently: the first stays cached, the second unhashed."""
    mgr = _manager()
    prompt = [5, 5, 5, 5, 6]
    assert mgr.get_computed_blocks("a", prompt) == 0
    assert mgr.get_computed_blocks("b", prompt) == 0  # a has not allocated yet: no hit
    assert mgr.allocate_slots("a", prompt, 0, 5) and mgr.allocate_slots("b", prompt, 0, 5)
    first_a, first_b = (mgr.block_pool.blocks[mgr.block_table(r)[0]] for r in "ab")
    assert first_a.block_hash is not None and first_b.block_hash is None
    assert mgr.block_pool.cached[first_a.block_hash] is first_a


def test_reset_prefix_cache_drops_hits() -> None:
    """After reset_prefix_cache nothing hits, and held blocks stay allocated."""
    mgr = _manager()
    prompt = list(range(9))
    _prefill(mgr, "a", prompt)
    assert mgr.reset_prefix_cache()
    assert mgr.get_computed_blocks("b", prompt) == 0
    assert len(mgr.block_table("a")) == 3 and not mgr.block_pool.cached


def test_extra_keys_separate_caches() -> None:
    """Requests with different extra keys (e.g. LoRA ids) do not share blocks."""
    mgr = _manager()
    prompt = list(range(9))
    computed = mgr.get_computed_blocks("a", prompt, extra=("lora-1",))
    assert mgr.allocate_slots("a", prompt, computed, 9)
    assert mgr.get_computed_blocks("b", prompt, extra=("lora-2",)) == 0
    assert mgr.get_computed_blocks("c", prompt, extra=("lora-1",)) == 8


def test_deferred_hashing_registers_the_same_blocks_after_the_launch() -> None:
    """With defer_hashing, allocate_slots registers nothing; register_full_blocks (the engine calls it after
    launching the step) then leaves the pool exactly as registering at allocation does."""
    eager, deferred = _manager(), KVCacheManager(num_blocks=9, block_size=BS, defer_hashing=True)
    prompt = list(range(13))
    for mgr in (eager, deferred):
        _prefill(mgr, "a", prompt)
    assert len(eager.block_pool.cached) == 3 and not deferred.block_pool.cached
    deferred.register_full_blocks()
    assert _pool_snapshot(deferred) == _pool_snapshot(eager)
    # A decode step filling the fourth block: registered at the next call, chained on the first three.
    for mgr in (eager, deferred):
        assert mgr.allocate_slots("a", prompt + [7, 8, 9], 13, 3)
    deferred.register_full_blocks()
    assert _pool_snapshot(deferred) == _pool_snapshot(eager) and len(eager.block_pool.cached) == 4


def test_deferred_hashing_lookup_sees_blocks_allocated_before_it() -> None:
    """A lookup registers what is pending first, so a request admitted later in the same schedule still hits
    the blocks an earlier one allocated (same-step sharing, as without deferral)."""
    mgr = KVCacheManager(num_blocks=9, block_size=BS, defer_hashing=True)
    prompt = list(range(13))
    _prefill(mgr, "a", prompt)
    assert mgr.get_computed_blocks("b", prompt) == 12
    assert mgr.block_table("b") == mgr.block_table("a")[:3]


def test_deferred_hashing_never_registers_a_freed_requests_blocks() -> None:
    """A request freed before its blocks were registered (preempted before its step ran) leaves nothing in
    the cache: their K/V were never written."""
    mgr = KVCacheManager(num_blocks=9, block_size=BS, defer_hashing=True)
    prompt = list(range(13))
    _prefill(mgr, "a", prompt)
    mgr.free("a")
    mgr.register_full_blocks()
    assert not mgr.block_pool.cached
    assert mgr.get_computed_blocks("b", prompt) == 0
    # Re-admitted under the same id before any registration (preempted, then back in the same schedule):
    # only the new allocation's blocks are registered, under the new tokens.
    _prefill(mgr, "c", prompt)
    mgr.free("c")
    other = [t + 100 for t in prompt]
    _prefill(mgr, "c", other)
    mgr.register_full_blocks()
    assert sorted(mgr.block_pool.cached) == sorted(hash_request_blocks(other, BS))


def test_lookup_for_request_holding_blocks_raises() -> None:
    """get_computed_blocks is for requests holding nothing; a second lookup must follow a free."""
    mgr = _manager()
    mgr.get_computed_blocks("a", [1, 2])
    with pytest.raises(ValueError, match="already holds"):
        mgr.get_computed_blocks("a", [1, 2])


def test_block_pool_rejects_double_free() -> None:
    """Freeing a block more often than it was taken is a bug the pool reports."""
    pool = BlockPool(num_blocks=3, block_size=BS)
    (block,) = pool.get_new_blocks(1)
    pool.free_blocks([block])
    with pytest.raises(ValueError, match="freed more often"):
        pool.free_blocks([block])


# ---- stateful model check ------------------------------------------------------------------------------

# Prompts are a shared stem plus a short tail from a 2-letter alphabet, so prefixes repeat across requests.
_STEMS = ([1, 1, 2, 1, 2, 2, 1, 1], [2, 1, 2, 1, 1, 1, 2, 2], [1, 1, 2, 1, 1, 2, 2, 1])
_prompts = st.builds(
    lambda stem, cut, tail: stem[:cut] + tail,
    st.sampled_from(_STEMS),
    st.integers(0, 8),
    st.lists(st.integers(1, 2), min_size=0, max_size=6),
).filter(bool)


class BlockManagerMachine(RuleBasedStateMachine):
    """Drives the manager like a scheduler (admit, chunked prefill/decode steps, abort, preempt, finish)."""

    NUM_BLOCKS = 14
    PREFIX_CACHING = True
    DEFER = False

    def __init__(self) -> None:
        super().__init__()
        self.mgr = KVCacheManager(self.NUM_BLOCKS, BS, enable_prefix_caching=self.PREFIX_CACHING,
                                  defer_hashing=self.DEFER)
        self.running: dict[str, dict] = {}  # rid -> {"tokens": list[int], "computed": int}
        self.preempted: dict[str, list[int]] = {}
        self.next_id = 0
        # Blocks unhashed by reset_prefix_cache while held; a block leaves the set once fully freed.
        self.unhashed_by_reset: set[int] = set()

    # -- helpers --

    def _admit(self, rid: str, tokens: list[int], chunk: int) -> None:
        computed = self.mgr.get_computed_blocks(rid, tokens)
        assert computed % BS == 0 and 0 <= computed < len(tokens)
        if not self.PREFIX_CACHING:
            assert computed == 0
        # The hits must be exactly the cached chain of this prompt.
        assert len(self.mgr.block_table(rid)) == computed // BS
        self.running[rid] = {"tokens": tokens, "computed": computed}
        if not self._allocate(rid, chunk):
            self.mgr.free(rid)
            del self.running[rid]
            self.preempted[rid] = tokens

    def _allocate(self, rid: str, max_new: int) -> bool:
        """One step for rid; False (with no side effect) when the pool is full."""
        req = self.running[rid]
        num_new = min(max_new, len(req["tokens"]) - req["computed"])
        before = _pool_snapshot(self.mgr)
        if not self.mgr.allocate_slots(rid, req["tokens"], req["computed"], num_new):
            assert _pool_snapshot(self.mgr) == before
            return False
        req["computed"] += num_new
        assert len(self.mgr.block_table(rid)) >= self.mgr.num_blocks_needed(req["computed"])
        return True

    # -- rules --

    @rule(prompt=_prompts, chunk=st.integers(1, 12))
    def add(self, prompt: list[int], chunk: int) -> None:
        rid = f"r{self.next_id}"
        self.next_id += 1
        self._admit(rid, prompt, chunk)

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        for rid in sorted(self.running):
            if rid not in self.running:
                continue
            k = data.draw(st.integers(1, 6), label=f"new tokens {rid}")
            if not self._allocate(rid, k):
                self._preempt(rid)
                continue
            req = self.running[rid]
            if req["computed"] == len(req["tokens"]):  # prefill done or decode token consumed: sample one
                req["tokens"].append(data.draw(st.integers(1, 2), label=f"sampled {rid}"))

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.running)))
        self.mgr.free(rid)
        del self.running[rid]

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def preempt(self, data: st.DataObject) -> None:
        self._preempt(data.draw(st.sampled_from(sorted(self.running))))

    @precondition(lambda self: self.preempted)
    @rule(data=st.data(), chunk=st.integers(1, 40))
    def readd(self, data: st.DataObject, chunk: int) -> None:
        rid = data.draw(st.sampled_from(sorted(self.preempted)))
        self._admit(rid, self.preempted.pop(rid), chunk)

    @precondition(lambda self: any(r["computed"] + 1 == len(r["tokens"]) for r in self.running.values()))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        decoding = sorted(rid for rid, r in self.running.items() if r["computed"] + 1 == len(r["tokens"]))
        rid = data.draw(st.sampled_from(decoding))
        self.mgr.free(rid)
        del self.running[rid]

    @rule()
    def reset_prefix_cache(self) -> None:
        pool = self.mgr.block_pool
        self.unhashed_by_reset |= {b.block_id for b in pool.cached.values() if b.ref_cnt > 0}
        self.mgr.reset_prefix_cache()
        assert not pool.cached and all(b.block_hash is None for b in pool.blocks)

    def _preempt(self, rid: str) -> None:
        self.mgr.free(rid)
        self.preempted[rid] = self.running.pop(rid)["tokens"]

    # -- invariants --

    def _holdings(self) -> dict[int, list[tuple[str, int]]]:
        """block id -> [(request id, position in its table)]."""
        holders: dict[int, list[tuple[str, int]]] = {}
        for rid in self.running:
            for pos, bid in enumerate(self.mgr.block_table(rid)):
                holders.setdefault(bid, []).append((rid, pos))
        return holders

    @invariant()
    def tables_are_valid(self) -> None:
        assert set(self.mgr._requests) == set(self.running)
        for rid, req in self.running.items():
            table = self.mgr.block_table(rid)
            assert len(table) == len(set(table)), "a request holds a block twice"
            assert NULL_BLOCK_ID not in table, "null block held"
            assert len(table) >= self.mgr.num_blocks_needed(req["computed"])

    @invariant()
    def ref_counts_match_holdings_and_nothing_leaks(self) -> None:
        pool = self.mgr.block_pool
        holders = self._holdings()
        for block in pool.blocks[1:]:
            assert block.ref_cnt == len(holders.get(block.block_id, []))
        assert sum(b.ref_cnt for b in pool.blocks) == sum(len(h) for h in holders.values())
        free_ids = pool.free_queue.block_ids()
        assert len(free_ids) == len(set(free_ids)) == self.mgr.num_free_blocks
        assert set(free_ids) == {b.block_id for b in pool.blocks[1:] if b.ref_cnt == 0}
        in_use = sum(1 for b in pool.blocks if b.ref_cnt > 0)
        assert self.mgr.num_free_blocks + in_use == self.NUM_BLOCKS - 1
        assert pool.null_block.ref_cnt == 0

    @invariant()
    def shared_blocks_hold_identical_prefixes(self) -> None:
        self.unhashed_by_reset = {b for b in self.unhashed_by_reset if self.mgr.block_pool.blocks[b].ref_cnt}
        for bid, holders in self._holdings().items():
            if len(holders) < 2:
                continue
            # Sharing starts only through a hit on a hashed block; reset_prefix_cache may unhash it since.
            hashed = self.mgr.block_pool.blocks[bid].block_hash is not None
            assert hashed or bid in self.unhashed_by_reset, "shared block that was never cached"
            positions = {pos for _, pos in holders}
            assert len(positions) == 1, "shared block at different positions"
            (pos,) = positions
            prefixes = {tuple(self.running[rid]["tokens"][: (pos + 1) * BS]) for rid, _ in holders}
            assert len(prefixes) == 1, "shared block under different token prefixes"
            assert all(len(p) == (pos + 1) * BS for p in prefixes), "shared block is not full"

    @invariant()
    def hashes_match_tokens(self) -> None:
        pool = self.mgr.block_pool
        for h, block in pool.cached.items():
            assert block.block_hash == h
        for rid, req in self.running.items():
            chain = hash_request_blocks(req["tokens"], BS)
            for pos, bid in enumerate(self.mgr.block_table(rid)):
                block_hash = pool.blocks[bid].block_hash
                if block_hash is not None:
                    assert pos < len(chain) and block_hash == chain[pos]

    def teardown(self) -> None:
        for rid in list(self.running):
            self.mgr.free(rid)
        assert self.mgr.num_free_blocks == self.NUM_BLOCKS - 1
        assert all(b.ref_cnt == 0 for b in self.mgr.block_pool.blocks)


class BlockManagerDeferredMachine(BlockManagerMachine):
    """The same model with hashing deferred (`defer_hashing`, as the engine runs it): registrations happen
    at lookups and whenever the engine would have launched a step; every invariant still holds."""

    DEFER = True

    @rule()
    def launched(self) -> None:
        self.mgr.register_full_blocks()


class BlockManagerNoPrefixMachine(BlockManagerMachine):
    """The same model with prefix caching off: nothing is ever shared or hashed."""

    PREFIX_CACHING = False

    @invariant()
    def nothing_cached(self) -> None:
        assert not self.mgr.block_pool.cached
        assert all(len(h) == 1 for h in self._holdings().values())


_SETTINGS = settings(derandomize=True, max_examples=200, deadline=None, stateful_step_count=40)
TestBlockManagerStateful = BlockManagerMachine.TestCase
TestBlockManagerStateful.settings = _SETTINGS
TestBlockManagerNoPrefixStateful = BlockManagerNoPrefixMachine.TestCase
TestBlockManagerNoPrefixStateful.settings = _SETTINGS
TestBlockManagerDeferredStateful = BlockManagerDeferredMachine.TestCase
TestBlockManagerDeferredStateful.settings = _SETTINGS
