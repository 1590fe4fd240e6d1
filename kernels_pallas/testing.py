"""Random ragged batches for the attention tests and the GPU benchmark (numpy, host side)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RaggedBatch:
    """Host arrays for one `ragged_paged_attention` call (see the kernel module's contract)."""

    q: np.ndarray  # [T, num_q_heads, head_dim]
    k_cache: np.ndarray  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: np.ndarray
    kv_lens: np.ndarray  # int32[S]
    block_tables: np.ndarray  # int32[S, max_pages]
    query_start_loc: np.ndarray  # int32[S + 1]
    num_seqs: np.int32

    def args(self) -> tuple:
        """The call's positional arguments as device arrays."""
        import jax.numpy as jnp

        return tuple(jnp.asarray(x) for x in (self.q, self.k_cache, self.v_cache, self.kv_lens,
                                              self.block_tables, self.query_start_loc, self.num_seqs))


def make_ragged_batch(
    rng: np.random.Generator,
    q_lens: list[int],
    kv_lens: list[int],
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: type = np.float32,
    pad_tokens: int = 0,
    pad_seqs: int = 0,
    extra_pages: int = 0,
    garbage_tables: bool = True,
) -> RaggedBatch:
    """A batch whose sequences own shuffled, disjoint pages of one cache.

    q_lens[s] <= kv_lens[s]. `pad_tokens` padding tokens follow the real ones, `pad_seqs` empty
    slots follow the real sequences, `extra_pages` unused pages stay in each block table row;
    with `garbage_tables` the unused table entries hold out-of-range page ids (the kernel must
    not read them).
    """
    assert all(0 < ql <= kl for ql, kl in zip(q_lens, kv_lens, strict=True))
    pages_needed = [-(-kl // block_size) for kl in kv_lens]
    max_pages = max(pages_needed) + extra_pages
    num_blocks = sum(pages_needed) + 1
    perm = rng.permutation(num_blocks).astype(np.int32)
    num_slots = len(q_lens) + pad_seqs
    fill = 10**6 if garbage_tables else 0
    tables = np.full((num_slots, max_pages), fill, np.int32)
    offset = 0
    for s, n in enumerate(pages_needed):
        tables[s, :n] = perm[offset : offset + n]
        offset += n
    num_tokens = sum(q_lens) + pad_tokens
    qsl = np.zeros(num_slots + 1, np.int32)
    qsl[1 : len(q_lens) + 1] = np.cumsum(q_lens)
    qsl[len(q_lens) + 1 :] = qsl[len(q_lens)]
    lens = np.zeros(num_slots, np.int32)
    lens[: len(kv_lens)] = kv_lens
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    return RaggedBatch(
        q=rng.standard_normal((num_tokens, num_q_heads, head_dim)).astype(dtype),
        k_cache=rng.standard_normal(cache_shape).astype(dtype),
        v_cache=rng.standard_normal(cache_shape).astype(dtype),
        kv_lens=lens,
        block_tables=tables,
        query_start_loc=qsl,
        num_seqs=np.int32(len(q_lens)),
    )


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN stays NaN)."""
    out64, ref64 = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out64 - ref64) / max(np.linalg.norm(ref64), 1e-30))
