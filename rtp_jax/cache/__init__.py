"""Paged KV-cache bookkeeping (host side): block pool, block tables, prefix hashing and reuse."""

from rtp_jax.cache.block_pool import NULL_BLOCK_ID, BlockPool, FreeBlockQueue, KVCacheBlock
from rtp_jax.cache.hashing import BlockHash, hash_block_tokens, hash_request_blocks
from rtp_jax.cache.kv_cache_manager import KVCacheManager

__all__ = [
    "NULL_BLOCK_ID",
    "BlockHash",
    "BlockPool",
    "FreeBlockQueue",
    "KVCacheBlock",
    "KVCacheManager",
    "hash_block_tokens",
    "hash_request_blocks",
]
