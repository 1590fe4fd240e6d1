"""Helpers shared by the ragged paged attention kernels (per-head tiles and fused-heads decode).

Host-side (jitted wrapper) metadata: tile table, sanitized block tables, split-K merge; and the
constants of the base-2 online softmax.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas._lowering import tl_dot

# Finite "minus infinity": a fully masked row then yields finite garbage (dropped later) instead of
# NaN, and exp2(MASK - m) underflows to exactly 0 once a real logit has been seen.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2E = math.log2(math.e)


def tile_metadata(
    num_tokens: int,
    block_q: int,
    kv_lens: jax.Array,
    query_start_loc: jax.Array,
    num_seqs: jax.Array,
    cover_padding: bool = False,
) -> jax.Array:
    """Split every sequence's queries into tiles of `block_q` tokens.

    Returns int32[num_tiles_max, 4] rows (seq, q0, q_end, kv_len); tiles past the last real one
    are (0, 0, 0, 0), which the kernel treats as empty. num_tiles_max bounds sum_s cdiv(len_s, block_q).
    With `cover_padding` the padding tokens [qsl[num_seqs], T) get tiles too, as a sequence with an
    empty context (kv_len 0, seq 0): the kernel writes their rows as zeros, so no pass over the
    output has to zero them.
    """
    num_slots = kv_lens.shape[0]
    q_start, q_end = query_start_loc[:-1], query_start_loc[1:]
    q_len = jnp.where(jnp.arange(num_slots) < num_seqs, q_end - q_start, 0)
    if cover_padding:  # one more "sequence": the padding tokens, seeing nothing
        real_end = query_start_loc[num_seqs]
        q_start = jnp.append(q_start, real_end)
        q_end = jnp.append(q_end, num_tokens)
        q_len = jnp.append(q_len, num_tokens - real_end)
        kv_lens = jnp.append(kv_lens, 0)
        num_slots += 1
    num_tiles = min(num_tokens, (num_tokens + num_slots * (block_q - 1)) // block_q)
    tiles_per_seq = (q_len + block_q - 1) // block_q
    cum = jnp.cumsum(tiles_per_seq)
    tile = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(cum, tile, side="right"), num_slots - 1).astype(jnp.int32)
    first = cum[seq] - tiles_per_seq[seq]
    real = tile < cum[-1]
    q0 = q_start[seq] + (tile - first) * block_q
    zero = jnp.zeros_like(tile)
    real_seq = real & (seq < num_slots - 1) if cover_padding else real  # padding tiles: seq 0, kv_len 0
    return jnp.stack(
        [
            jnp.where(real_seq, seq, zero),
            jnp.where(real, q0, zero),
            jnp.where(real, q_end[seq], zero),
            jnp.where(real, kv_lens[seq], zero),
        ],
        axis=1,
    ).astype(jnp.int32)


def sanitize_block_tables(
    block_tables: jax.Array, kv_lens: jax.Array, block_size: int, pages_per_block: int
) -> jax.Array:
    """Pad columns to a multiple of pages_per_block and zero entries past each context.

    The kernel reads whole compute blocks of pages; entries past a sequence's last page may be
    stale or garbage, and page 0 is always a safe address (its keys are masked out).
    """
    num_slots, max_pages = block_tables.shape
    padded = -(-max_pages // pages_per_block) * pages_per_block
    used = (kv_lens + block_size - 1) // block_size
    col = jnp.arange(padded, dtype=jnp.int32)
    tables = jnp.pad(block_tables.astype(jnp.int32), ((0, 0), (0, padded - max_pages)))
    return jnp.where(col[None, :] < used[:, None], tables, 0)


def merge_splits(o_parts: jax.Array, lse_parts: jax.Array) -> jax.Array:
    """Combine per-split normalized outputs [K, T, H, G, D] f32 with their base-2 lse [K, T, H, G].

    Written as a chain over the K (static) splits instead of reductions over axis 0: every step is then
    elementwise and XLA emits the whole merge as one kernel (the reductions made it two, ~1.2 us each per
    layer in a batch-1 decode step on an H200)."""
    num_splits = o_parts.shape[0]
    lse_max = lse_parts[0]
    for i in range(1, num_splits):
        lse_max = jnp.maximum(lse_max, lse_parts[i])
    num, den = 0.0, 0.0
    for i in range(num_splits):
        w = jnp.exp2(lse_parts[i] - lse_max)  # empty splits (lse = -inf) weigh 0
        num, den = num + o_parts[i] * w[..., None], den + w
    return num / den[..., None]


def split_kv_range(
    q0: jax.Array,
    q_end: jax.Array,
    kv_len: jax.Array,
    split: jax.Array,
    *,
    block_q: int,
    block_k: int,
    num_splits: int,
    sliding_window: int | None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """In-kernel: this split's KV blocks [start, stop) of a tile and its unmasked core [full_lo, full_hi).

    A tile is tokens [q0, min(q0 + block_q, q_end)) of a sequence whose queries end at q_end and whose
    context is kv_len long; blocks are `block_k` KV positions. Blocks in [full_lo, full_hi) are
    visible to every token of the tile, so they skip the causal / window mask.
    """
    kv_hi = kv_len - (q_end - jnp.minimum(q0 + block_q, q_end))
    kv_lo = 0 if sliding_window is None else jnp.maximum(kv_len - (q_end - q0) - sliding_window + 1, 0)
    blk_lo = kv_lo // block_k
    blk_hi = (kv_hi + block_k - 1) // block_k
    per_split = (blk_hi - blk_lo + num_splits - 1) // num_splits
    start = blk_lo + split * per_split
    stop = jnp.minimum(start + per_split, blk_hi)
    first_pos = kv_len - (q_end - q0)
    full_hi = jnp.clip((first_pos + 1) // block_k, start, stop)
    if sliding_window is None:
        full_lo = start
    else:
        full_lo = jnp.clip((kv_hi - sliding_window + block_k - 1) // block_k, start, full_hi)
    return start, stop, full_lo, full_hi


def online_softmax_step(
    s: jax.Array, v: jax.Array, acc: jax.Array, m: jax.Array, denom: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """In-kernel flash update with base-2 logits s [rows, cols] f32 and values v [cols, head_dim].

    Carry: acc [rows, head_dim] f32 (unnormalized), m [rows] running max, denom [rows] running sum.
    """
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    denom = denom * alpha + p.sum(axis=1)
    acc = acc * alpha[:, None] + tl_dot(p.astype(v.dtype), v)
    return acc, m_new, denom


def finish_softmax(acc: jax.Array, m: jax.Array, denom: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Normalized output [rows, head_dim] f32 and base-2 lse [rows] (-inf for an empty split)."""
    denom_safe = jnp.where(denom == 0.0, 1.0, denom)  # empty split: acc is 0, keep it finite
    lse = jnp.where(denom == 0.0, -jnp.inf, m + jnp.log2(denom_safe))
    return acc / denom_safe[:, None], lse


def attend_kv_blocks(step: Callable[..., tuple[jax.Array, ...]], start: jax.Array, full_lo: jax.Array,
                     full_hi: jax.Array, stop: jax.Array, rows: int, head_dim: int,
                     single_loop: bool = False) -> tuple[jax.Array, jax.Array]:
    """Online softmax over KV blocks [start, stop): mask arithmetic only on the edge blocks
    [start, full_lo) and [full_hi, stop), none on the fully visible interior.

    `step(j, carry, masked=...)` folds block j into carry = (acc [rows, D], m [rows], denom [rows]).
    With `single_loop` there is one loop from 0 to stop - start that masks every block (the shape of
    JAX's built-in paged decode kernel: one software pipeline, no edge loops).
    Returns (normalized out [rows, D], base-2 lse [rows]).
    """
    masked_step = functools.partial(step, masked=True)
    carry = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    if single_loop:
        acc, m, denom = jax.lax.fori_loop(
            0, jnp.maximum(stop - start, 0), lambda i, c: masked_step(start + i, c), carry)
        return finish_softmax(acc, m, denom)
    carry = jax.lax.fori_loop(start, full_lo, masked_step, carry)
    carry = jax.lax.fori_loop(full_lo, full_hi, functools.partial(step, masked=False), carry)
    acc, m, denom = jax.lax.fori_loop(full_hi, stop, masked_step, carry)
    return finish_softmax(acc, m, denom)
