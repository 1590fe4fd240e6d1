"""Pipeline parallelism helpers: cutting one ragged step into token microbatches.

A step's tokens [T] are cut into M contiguous chunks. Each stage runs chunk m, then chunk m + 1, ...
Because a stage writes chunk m's K/V into its cache before it runs chunk m + 1, a sequence that spans
two chunks still attends to all its earlier tokens: only the metadata changes per chunk.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def num_microbatches(num_tokens: int, pp: int) -> int:
    """pp chunks when they divide the (power-of-two padded) token count, else 1."""
    return pp if pp > 1 and num_tokens % pp == 0 and num_tokens >= pp else 1


def microbatch_metadata(md: Any, lo: Any, size: int) -> Any:
    """Attention metadata of tokens [lo, lo + size) of a ragged batch (an `AttentionMetadata`).

    `lo` may be traced (one compiled program serves every chunk); `size` is static. Each sequence
    keeps its row: its queries are the part of its span inside the chunk, and its context ends at its
    last token inside the chunk (tokens after it are not written yet).
    """
    hi = lo + size
    qsl = md.query_start_loc
    clipped = jnp.clip(qsl, lo, hi)
    after = qsl[1:] - clipped[1:]  # tokens of each sequence that come after this chunk
    kv_lens = jnp.maximum(md.kv_lens - after, 0)
    return md._replace(slot_mapping=token_slice(md.slot_mapping, lo, size), kv_lens=kv_lens,
                       query_start_loc=clipped - lo)


def token_slice(x: jax.Array, lo: Any, size: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, lo, size, axis=0)
