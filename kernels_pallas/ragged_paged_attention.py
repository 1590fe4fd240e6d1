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

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kernels_pallas._lowering import gpu_lowering, masked_load, masked_store, tl_dot

# Finite "minus infinity": a fully masked row then yields finite garbage (dropped later) instead of
# NaN, and exp2(MASK - m) underflows to exactly 0 once a real logit has been seen.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2E = math.log2(math.e)


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
    kv_lens, block_tables, query_start_loc = (
        jnp.asarray(x, jnp.int32) for x in (kv_lens, block_tables, query_start_loc)
    )
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


# ----------------------------------------------------------------------------------------------
# Pallas kernel
#
# Work decomposition: grid (kv_head, q_tile, kv_split). A q tile is `block_q` consecutive tokens of
# ONE sequence times the `group` query heads that share a KV head (GQA packing), i.e. a
# [block_q * group, head_dim] matrix, so each KV page is read once per tile for the whole group.
# Decode tiles hold one real token (block_q * group >= 16 rows only to feed the tensor cores).
# Each program walks its share of the tile's visible KV range `pages_per_block` pages at a time
# with a flash-style online softmax in fp32; with kv_split > 1 it writes (o, lse) partials that
# `_merge_splits` combines.
# ----------------------------------------------------------------------------------------------


def _kernel(
    meta_ref: Any,  # int32[num_tiles, 4]: (seq, q0, q_end, kv_len) per tile
    bt_ref: Any,  # int32[S, pages_padded] sanitized block tables
    q_ref: Any,  # [T_pad, group, head_dim] (this program's kv head)
    k_ref: Any,  # [num_blocks, block_size, head_dim] (this program's kv head)
    v_ref: Any,  # [num_blocks, block_size, head_dim]
    *out_refs: Any,  # o [T_pad, group, head_dim] (+ lse [T_pad, group] when split)
    block_q: int,
    pages_per_block: int,
    num_splits: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
) -> None:
    tile, split = pl.program_id(1), pl.program_id(2)
    _, group, head_dim = q_ref.shape
    block_size = k_ref.shape[1]
    block_k = pages_per_block * block_size
    rows = block_q * group

    seq, q0, q_end, kv_len = meta_ref[tile, 0], meta_ref[tile, 1], meta_ref[tile, 2], meta_ref[tile, 3]
    tok_ok = q0 + jnp.arange(block_q, dtype=jnp.int32) < q_end  # [block_q]
    # Row r is token q0 + r // group; a token's position is counted back from the context end.
    row_pos = kv_len - (q_end - (q0 + jnp.arange(rows, dtype=jnp.int32) // group))  # [rows]

    # Visible KV range of the whole tile, in KV blocks, then this split's share of it.
    kv_hi = kv_len - (q_end - jnp.minimum(q0 + block_q, q_end))
    kv_lo = 0 if sliding_window is None else jnp.maximum(kv_len - (q_end - q0) - sliding_window + 1, 0)
    blk_lo = kv_lo // block_k
    blk_hi = (kv_hi + block_k - 1) // block_k
    per_split = (blk_hi - blk_lo + num_splits - 1) // num_splits
    start = blk_lo + split * per_split
    stop = jnp.minimum(start + per_split, blk_hi)

    q_mask = jnp.broadcast_to(tok_ok[:, None, None], (block_q, group, head_dim))
    q = masked_load(q_ref.at[pl.ds(q0, block_q)], q_mask).reshape(rows, head_dim)
    kv_offsets = jnp.arange(block_k, dtype=jnp.int32)

    def step(j: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array], masked: bool):
        acc, m, denom = carry  # [rows, head_dim] f32, [rows] f32, [rows] f32
        pages = bt_ref[seq, pl.ds(j * pages_per_block, pages_per_block)]
        k = k_ref[pages].reshape(block_k, head_dim)
        v = v_ref[pages].reshape(block_k, head_dim)
        s = tl_dot(q, k, trans_b=True) * sm_scale  # [rows, block_k] f32
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        s = s * LOG2E  # softmax in base 2: exp2 is one instruction
        if masked:
            kv_pos = j * block_k + kv_offsets
            visible = kv_pos[None, :] <= row_pos[:, None]
            if sliding_window is not None:
                visible &= kv_pos[None, :] > row_pos[:, None] - sliding_window
            s = jnp.where(visible, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        denom = denom * alpha + p.sum(axis=1)
        acc = acc * alpha[:, None] + tl_dot(p.astype(v.dtype), v)
        return acc, m_new, denom

    # Blocks [full_lo, full_hi) are visible to every row of the tile and skip the mask arithmetic;
    # only the causal diagonal and the window's lower edge pay for it.
    first_pos = kv_len - (q_end - q0)
    full_hi = jnp.clip((first_pos + 1) // block_k, start, stop)
    if sliding_window is None:
        full_lo = start
    else:
        full_lo = jnp.clip((kv_hi - sliding_window + block_k - 1) // block_k, start, full_hi)
    masked_step = functools.partial(step, masked=True)
    carry = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    carry = jax.lax.fori_loop(start, full_lo, masked_step, carry)
    carry = jax.lax.fori_loop(full_lo, full_hi, functools.partial(step, masked=False), carry)
    acc, m, denom = jax.lax.fori_loop(full_hi, stop, masked_step, carry)
    denom_safe = jnp.where(denom == 0.0, 1.0, denom)  # empty split: acc is 0, keep it finite
    out = (acc / denom_safe[:, None]).reshape(block_q, group, head_dim)
    o_ref = out_refs[0]
    masked_store(o_ref.at[pl.ds(q0, block_q)], out.astype(o_ref.dtype), q_mask)
    if num_splits > 1:
        lse = jnp.where(denom == 0.0, -jnp.inf, m + jnp.log2(denom_safe)).reshape(block_q, group)
        lse_mask = jnp.broadcast_to(tok_ok[:, None], (block_q, group))
        masked_store(out_refs[1].at[pl.ds(q0, block_q)], lse, lse_mask)


def tile_metadata(
    num_tokens: int,
    block_q: int,
    kv_lens: jax.Array,
    query_start_loc: jax.Array,
    num_seqs: jax.Array,
) -> jax.Array:
    """Split every sequence's queries into tiles of `block_q` tokens.

    Returns int32[num_tiles_max, 4] rows (seq, q0, q_end, kv_len); tiles past the last real one
    are (0, 0, 0, 0), which the kernel treats as empty. num_tiles_max bounds sum_s cdiv(len_s, block_q).
    """
    num_slots = kv_lens.shape[0]
    num_tiles = min(num_tokens, (num_tokens + num_slots * (block_q - 1)) // block_q)
    slot = jnp.arange(num_slots, dtype=jnp.int32)
    q_start, q_end = query_start_loc[:-1], query_start_loc[1:]
    q_len = jnp.where(slot < num_seqs, q_end - q_start, 0)
    tiles_per_seq = (q_len + block_q - 1) // block_q
    cum = jnp.cumsum(tiles_per_seq)
    tile = jnp.arange(num_tiles, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(cum, tile, side="right"), num_slots - 1).astype(jnp.int32)
    first = cum[seq] - tiles_per_seq[seq]
    real = tile < cum[-1]
    q0 = q_start[seq] + (tile - first) * block_q
    zero = jnp.zeros_like(tile)
    return jnp.stack(
        [
            jnp.where(real, seq, zero),
            jnp.where(real, q0, zero),
            jnp.where(real, q_end[seq], zero),
            jnp.where(real, kv_lens[seq], zero),
        ],
        axis=1,
    ).astype(jnp.int32)


def _sanitize_block_tables(
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


def _merge_splits(o_parts: jax.Array, lse_parts: jax.Array) -> jax.Array:
    """Combine per-split normalized outputs [K, T, H, G, D] f32 with their base-2 lse [K, T, H, G]."""
    lse_max = lse_parts.max(axis=0)
    w = jnp.exp2(lse_parts - lse_max[None])  # empty splits (lse = -inf) weigh 0
    return (o_parts * w[..., None]).sum(axis=0) / w.sum(axis=0)[..., None]


def default_tuning(
    num_tokens: int, num_slots: int, group: int, max_context: int, num_kv_heads: int
) -> dict[str, int]:
    """Static tuning from the call's shapes (the engine's buckets); see bench/results/attention.md.

    Decode-shaped calls (T <= S) use 16-row tiles and split long contexts until there are ~2
    programs per SM (132 SMs); prefill-shaped calls use 64-row tiles and no split. Measured on H100:
    num_splits=2 is ~10% faster at 64x4096 and 256x512 decode (not yet the default).
    """
    if num_tokens <= num_slots:
        block_q = max(1, 16 // group)
        programs = num_kv_heads * max(1, num_slots)
        kv_blocks = max(1, max_context // 128)
        num_splits = int(min(kv_blocks, max(1, 264 // programs), 16))
        return dict(block_q=block_q, pages_per_block=8, num_splits=num_splits, num_warps=4, num_stages=2)
    return dict(block_q=max(1, 64 // group), pages_per_block=4, num_splits=1, num_warps=4, num_stages=2)


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale", "sliding_window", "soft_cap", "interpret", "block_q", "pages_per_block",
        "num_splits", "num_warps", "num_stages", "lowering",
    ),
)
def _ragged_paged_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    query_start_loc: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    interpret: bool,
    block_q: int,
    pages_per_block: int,
    num_splits: int,
    num_warps: int,
    num_stages: int,
    lowering: str,
) -> jax.Array:
    num_tokens, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    group_pad = 1 << (group - 1).bit_length()  # Triton tiles need power-of-two extents
    # Interpret mode clamps out-of-range dynamic slices instead of masking them, so give the
    # last tile room there; compiled, the masked loads/stores never touch rows >= T.
    pad_t = block_q if interpret else 0
    q4 = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    if group_pad != group or pad_t:
        q4 = jnp.pad(q4, ((0, pad_t), (0, 0), (0, group_pad - group), (0, 0)))
    t_pad = num_tokens + pad_t

    meta = tile_metadata(num_tokens, block_q, kv_lens, query_start_loc, num_seqs)
    tables = _sanitize_block_tables(block_tables, kv_lens, block_size, pages_per_block)
    grid = (num_kv_heads, meta.shape[0], num_splits)

    full = lambda shape: pl.BlockSpec(shape, lambda h, i, k: (0,) * len(shape))
    per_head_q = pl.BlockSpec((t_pad, None, group_pad, head_dim), lambda h, i, k: (0, h, 0, 0))
    per_head_kv = pl.BlockSpec((num_blocks, block_size, None, head_dim), lambda h, i, k: (0, 0, h, 0))
    o_shape = (t_pad, num_kv_heads, group_pad, head_dim)
    if num_splits == 1:
        out_shape = [jax.ShapeDtypeStruct(o_shape, q.dtype)]
        out_specs = [per_head_q]
    else:
        out_shape = [
            jax.ShapeDtypeStruct((num_splits, *o_shape), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, *o_shape[:-1]), jnp.float32),
        ]
        out_specs = [
            pl.BlockSpec((None, t_pad, None, group_pad, head_dim), lambda h, i, k: (k, 0, h, 0, 0)),
            pl.BlockSpec((None, t_pad, None, group_pad), lambda h, i, k: (k, 0, h, 0)),
        ]
    kernel = functools.partial(
        _kernel,
        block_q=block_q,
        pages_per_block=pages_per_block,
        num_splits=num_splits,
        sm_scale=sm_scale,
        sliding_window=sliding_window,
        soft_cap=soft_cap,
    )
    outs = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[full(meta.shape), full(tables.shape), per_head_q, per_head_kv, per_head_kv],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        name=f"ragged_paged_attention_bq{block_q}_p{pages_per_block}_k{num_splits}",
        **gpu_lowering(lowering, num_warps=num_warps, num_stages=num_stages),
    )(meta, tables, q4, k_cache, v_cache)
    out = outs[0] if num_splits == 1 else _merge_splits(outs[0], outs[1])
    out = out[:num_tokens, :, :group].reshape(num_tokens, num_q_heads, head_dim)
    valid = jnp.arange(num_tokens) < query_start_loc[num_seqs]
    return jnp.where(valid[:, None, None], out, 0).astype(q.dtype)


def ragged_paged_attention(
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
    interpret: bool = False,
    **tuning: Any,
) -> jax.Array:
    """Pallas kernel for the contract in the module docstring (same results as the reference).

    `tuning` (all static, defaults from `default_tuning`): block_q (tokens per q tile; block_q *
    group >= 16 on GPU), pages_per_block (KV pages per inner step), num_splits (split-K factor),
    num_warps, num_stages, lowering ("triton").
    Constraints: head_dim and block_size powers of two >= 16; num_q_heads % num_kv_heads == 0.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads=} is not a multiple of {num_kv_heads=}")
    group = num_q_heads // num_kv_heads
    params = default_tuning(
        num_tokens, kv_lens.shape[0], group, block_tables.shape[1] * block_size, num_kv_heads
    )
    params.setdefault("lowering", "triton")
    unknown = set(tuning) - set(params)
    if unknown:
        raise TypeError(f"unknown tuning arguments {sorted(unknown)}")
    params.update(tuning)
    return _ragged_paged_attention(
        q, k_cache, v_cache, jnp.asarray(kv_lens, jnp.int32), jnp.asarray(block_tables, jnp.int32),
        jnp.asarray(query_start_loc, jnp.int32), jnp.asarray(num_seqs, jnp.int32),
        sm_scale=float(sm_scale), sliding_window=sliding_window, soft_cap=soft_cap,
        interpret=interpret, **params,
    )
