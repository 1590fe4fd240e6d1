"""Chained block hashes for prefix caching.

A full block's hash commits to every token before it: `hash(block i) = H(hash(block i-1), tokens of block i,
extra)`. Two blocks with the same hash therefore hold K/V for the same token prefix, which is what lets
requests share them. The hash must be stable across processes (for later disk/remote tiers and for
reproducible tests), so it is built from SHA-256 and never from Python's randomised `hash()`.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Sequence

BlockHash = int

# 128 bits: a birthday collision needs ~2^64 distinct blocks, far beyond any cache's lifetime.
_HASH_BYTES = 16
# A fixed protocol keeps the byte encoding (and so the hash) identical across Python versions we support.
_PICKLE_PROTOCOL = 5


def hash_block_tokens(
    parent_hash: BlockHash | None, token_ids: tuple[int, ...], extra: tuple = ()
) -> BlockHash:
    """Hash of one block given its parent's hash (None for the first block), its tokens and extra keys.

    `extra` carries whatever else changes the K/V of these tokens (LoRA id, cache salt, multimodal
    hashes); it must hold only picklable values with a deterministic encoding (ints, strs, tuples).
    """
    # map(int, ...) normalizes numpy ints as a generator would, ~3x faster (a 2k prompt hashes 128 blocks
    # on the way to its first token).
    payload = pickle.dumps((parent_hash, tuple(map(int, token_ids)), tuple(extra)), _PICKLE_PROTOCOL)
    return int.from_bytes(hashlib.sha256(payload).digest()[:_HASH_BYTES], "little")


def hash_request_blocks(
    token_ids: Sequence[int], block_size: int, extra: tuple = (), num_blocks: int | None = None
) -> list[BlockHash]:
    """Hash chain of the first `num_blocks` full blocks of `token_ids` (all full blocks when None)."""
    num_full = len(token_ids) // block_size
    if num_blocks is not None:
        num_full = min(num_full, num_blocks)
    hashes: list[BlockHash] = []
    parent: BlockHash | None = None
    for i in range(num_full):
        parent = hash_block_tokens(parent, tuple(token_ids[i * block_size : (i + 1) * block_size]), extra)
        hashes.append(parent)
    return hashes
