"""Ragged paged attention: one call for a batch of prefill chunks and decode tokens.

Contract (shared by the Pallas kernel and the pure-JAX reference below):

    q:               [T, num_q_heads, head_dim]; T may include padding tokens at the end
    k_cache/v_cache: [num_blocks, block_size, num_kv_heads, head_dim]; already hold this step's K/V
    kv_lens:         int32[S] context length of each sequence after this step (padded slots: 0)
    block_tables:    int32[S, max_blocks_per_seq]
    query_start_loc: int32[S+1] cumulative query offsets; sequence s owns q[qsl[s]:qsl[s+1]], which
                     are the last (qsl[s+1] - qsl[s]) positions of its context
    num_seqs:        int32 scalar, number of valid sequences (slots past it are padding)
    returns          [T, num_q_heads, head_dim]; causal within each sequence; rows of padding tokens are 0

`sliding_window` W lets a query at position p see positions p-W+1 .. p; `soft_cap` c turns each
logit x into c * tanh(x / c) before the softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_metadata(
    num_tokens: int, kv_lens: jax.Array, query_start_loc: jax.Array, num_seqs: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token sequence id, absolute position and validity.

    Returns (seq_ids: int32[T], positions: int32[T], valid: bool[T]).
    """
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    num_seqs = jnp.asarray(num_seqs, jnp.int32)
    # Sequence s owns tokens in [qsl[s], qsl[s+1]): the count of ends <= t is its index.
    ends = query_start_loc[1:]
    seq_ids = jnp.sum(ends[None, :] <= t[:, None], axis=1).astype(jnp.int32)
    seq_ids = jnp.minimum(seq_ids, jnp.maximum(num_seqs - 1, 0))
    valid = t < query_start_loc[num_seqs]
    positions = kv_lens[seq_ids] - (query_start_loc[seq_ids + 1] - t)
    return seq_ids, positions, valid


def ragged_paged_attention_reference(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    query_start_loc: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    tokens_per_chunk: int = 32,
) -> jax.Array:
    """Pure-JAX oracle: for each query token, gather its sequence's pages and attend densely.

    Memory is bounded by processing `tokens_per_chunk` tokens at a time
    (each gathers [max_blocks * block_size, kv_heads, head_dim] of K and V).
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    max_ctx = block_tables.shape[1] * block_size
    seq_ids, positions, valid = token_metadata(num_tokens, kv_lens, query_start_loc, num_seqs)
    kv_pos = jnp.arange(max_ctx, dtype=jnp.int32)

    def one_token(args: tuple[jax.Array, ...]) -> jax.Array:
        q_t, seq, pos, ok = args  # q_t: [num_q_heads, head_dim]
        pages = block_tables[seq]
        k = k_cache[pages].reshape(max_ctx, num_kv_heads, head_dim).astype(jnp.float32)
        v = v_cache[pages].reshape(max_ctx, num_kv_heads, head_dim).astype(jnp.float32)
        qg = q_t.reshape(num_kv_heads, group, head_dim).astype(jnp.float32)
        logits = jnp.einsum("hgd,khd->hgk", qg, k) * sm_scale
        if soft_cap is not None:
            logits = soft_cap * jnp.tanh(logits / soft_cap)
        mask = kv_pos <= pos
        if sliding_window is not None:
            mask &= kv_pos > pos - sliding_window
        logits = jnp.where(mask[None, None, :], logits, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("hgk,khd->hgd", probs, v).reshape(num_q_heads, head_dim)
        return jnp.where(ok, out, 0.0).astype(q.dtype)

    return jax.lax.map(
        one_token, (q, seq_ids, positions, valid), batch_size=min(tokens_per_chunk, num_tokens)
    )
