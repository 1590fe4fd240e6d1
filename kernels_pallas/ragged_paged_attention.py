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
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas._lowering import gpu_lowering, masked_load, masked_store, tl_dot
from kernels_pallas._paged_common import (
    LOG2E,
    MASK_VALUE,
    attend_kv_blocks,
    merge_splits,
    online_softmax_step,
    sanitize_block_tables,
    split_kv_range,
    tile_metadata,
)
from kernels_pallas.decode_attention import fused_heads_attention


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
    bt_ref: Any,  # int32[S, pages_padded] sanitized block tables (row_gather: flat [S * pages_padded])
    q_ref: Any,  # [T_pad, group, head_dim] (this program's kv head)
    k_ref: Any,  # [num_blocks, block_size, head_dim] (row_gather: [num_blocks * block_size, head_dim])
    v_ref: Any,  # like k_ref
    *out_refs: Any,  # o [T_pad, group, head_dim] (+ lse [T_pad, group] when split)
    block_q: int,
    pages_per_block: int,
    num_splits: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    heads_inner: bool,
    single_loop: bool = False,
    row_gather: tuple[int, int] | None = None,
) -> None:
    """One (q tile, KV split) of one KV head; row_gather = (block_size, table columns) of flat views."""
    tile_axis = 0 if heads_inner else 1  # grid (tile, split, head) or (head, tile, split)
    tile, split = pl.program_id(tile_axis), pl.program_id(tile_axis + 1)
    _, group, head_dim = q_ref.shape
    block_size, table_cols = row_gather or (k_ref.shape[1], 0)
    block_k = pages_per_block * block_size
    rows = block_q * group

    seq, q0, q_end, kv_len = meta_ref[tile, 0], meta_ref[tile, 1], meta_ref[tile, 2], meta_ref[tile, 3]
    tok_ok = q0 + jnp.arange(block_q, dtype=jnp.int32) < q_end  # [block_q]
    # Row r is token q0 + r // group; a token's position is counted back from the context end.
    row_pos = kv_len - (q_end - (q0 + jnp.arange(rows, dtype=jnp.int32) // group))  # [rows]

    start, stop, full_lo, full_hi = split_kv_range(
        q0, q_end, kv_len, split, block_q=block_q, block_k=block_k, num_splits=num_splits,
        sliding_window=sliding_window,
    )
    q_mask = jnp.broadcast_to(tok_ok[:, None, None], (block_q, group, head_dim))
    q = masked_load(q_ref.at[pl.ds(q0, block_q)], q_mask).reshape(rows, head_dim)
    kv_offsets = jnp.arange(block_k, dtype=jnp.int32)
    page_of_row, row_in_page = kv_offsets // block_size, kv_offsets % block_size

    def load_kv(j: jax.Array) -> tuple[jax.Array, jax.Array]:
        """K, V [block_k, head_dim] of compute block j (pages j*P .. j*P+P-1 of the sequence)."""
        if row_gather:  # one gather of block_k rows: no [P, bs, D] -> [P*bs, D] reshape
            rows_ids = bt_ref[seq * table_cols + j * pages_per_block + page_of_row] * block_size + row_in_page
            return k_ref[rows_ids], v_ref[rows_ids]
        pages = bt_ref[seq, pl.ds(j * pages_per_block, pages_per_block)]
        return k_ref[pages].reshape(block_k, head_dim), v_ref[pages].reshape(block_k, head_dim)

    def step(j: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array], masked: bool):
        acc, m, denom = carry  # [rows, head_dim] f32, [rows] f32, [rows] f32
        k, v = load_kv(j)
        s = tl_dot(q, k, trans_b=True)  # [rows, block_k] f32
        # softmax in base 2 (exp2 is one instruction); scales folded into one multiply
        if soft_cap is not None:
            s = (soft_cap * LOG2E) * jnp.tanh(s * (sm_scale / soft_cap))
        else:
            s = s * (sm_scale * LOG2E)
        if masked:
            kv_pos = j * block_k + kv_offsets
            visible = kv_pos[None, :] <= row_pos[:, None]
            if sliding_window is not None:
                visible &= kv_pos[None, :] > row_pos[:, None] - sliding_window
            s = jnp.where(visible, s, MASK_VALUE)
        return online_softmax_step(s, v, acc, m, denom)

    out, lse = attend_kv_blocks(step, start, full_lo, full_hi, stop, rows, head_dim, single_loop)
    out = out.reshape(block_q, group, head_dim)
    o_ref = out_refs[0]
    masked_store(o_ref.at[pl.ds(q0, block_q)], out.astype(o_ref.dtype), q_mask)
    if num_splits > 1:
        lse = lse.reshape(block_q, group)
        lse_mask = jnp.broadcast_to(tok_ok[:, None], (block_q, group))
        masked_store(out_refs[1].at[pl.ds(q0, block_q)], lse, lse_mask)


NUM_SMS = 132  # H100 SXM; the split heuristics aim for a few programs per SM


def default_tuning(
    num_tokens: int, num_slots: int, group: int, max_context: int, num_kv_heads: int, block_size: int = 16
) -> dict[str, Any]:
    """Static tuning from the call's shapes (the engine's buckets); see bench/results/attention.md.

    KV steps are sized in tokens (128 for decode, 64 or 128 for prefill) and divided into pages of
    `block_size`, so larger pages do not grow the shared-memory tiles.

    Every call: per-head kernel with K/V rows gathered straight from the flat cache view
    (row_gather; 1.2-4x faster on H100 than gathering [pages, 16, D] and reshaping).
    Decode-shaped calls (T <= S): 16-row tiles, one KV loop masked every step (single_loop), at least
    4 KV splits and up to ~2 programs per SM (max 16), grid (tile, split, kv_head) from 8 sequences up.
    Prefill-shaped calls of <= 8 sequences: longest tiles first (heavy_first), 3 pipeline stages;
    128-row tiles x 128 KV positions with 8 warps from 4096 tokens, else 64 x 64 with 4 warps. Mixed
    calls (> 8 sequences): 64 x 64 tiles, pages gathered and reshaped, no reordering (the
    2026-11-25 knobs measured slower there; bench/notes_attention.md).
    The fused-heads kernel (fuse_heads=True) is opt-in: not faster.
    """
    common = dict(fuse_heads=False, num_stages=2, row_gather=True, single_loop=False, heavy_first=False)

    def pages(tokens: int) -> int:
        return max(1, tokens // block_size)

    if num_tokens <= num_slots:
        programs = num_kv_heads * max(1, num_slots)
        kv_blocks = max(1, max_context // 128)
        num_splits = int(min(kv_blocks, max(4, 2 * NUM_SMS // programs), 16))
        return dict(common, block_q=max(1, 16 // group), pages_per_block=pages(128), num_splits=num_splits,
                    heads_inner=num_slots >= 8, num_warps=4, single_loop=True)
    if num_slots > 8:  # mixed batches (many sequences): the 2026-11-25 knobs measured slower there
        return dict(common, block_q=max(1, 64 // group), pages_per_block=pages(64), num_warps=4,
                    num_splits=1, heads_inner=False, row_gather=False)
    common.update(num_splits=1, heads_inner=False, heavy_first=True, num_stages=3)
    if num_tokens >= 4096:
        return dict(common, block_q=max(1, 128 // group), pages_per_block=pages(128), num_warps=8)
    return dict(common, block_q=max(1, 64 // group), pages_per_block=pages(64), num_warps=4)


def _pow2(n: int) -> int:
    """Smallest power of two >= n (Triton tiles need power-of-two extents)."""
    return 1 << (n - 1).bit_length()


def sort_tiles_by_work(meta: jax.Array, block_q: int) -> jax.Array:
    """Reorder tile rows (seq, q0, q_end, kv_len) by descending KV extent (the last row's context), so
    the longest causal tiles start first and the short ones fill the tail of the launch.

    meta: int32[num_tiles, 4] from tile_metadata; empty tiles (q_end = 0) sort last.
    """
    q0, q_end, kv_len = meta[:, 1], meta[:, 2], meta[:, 3]
    kv_extent = kv_len - (q_end - jnp.minimum(q0 + block_q, q_end))  # [num_tiles]
    return meta[jnp.argsort(-kv_extent, stable=True)]


def _per_head_attention(
    meta: jax.Array,
    tables: jax.Array,
    q4: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    *,
    block_q: int,
    pages_per_block: int,
    num_splits: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
    interpret: bool,
    num_warps: int,
    num_stages: int,
    lowering: str,
    heads_inner: bool = False,
    single_loop: bool = False,
    row_gather: bool = False,
    kv_head_major: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Launch the per-head kernel on q4 [T_pad, kv_heads, group_pad, D] (inside the caller's jit).

    heads_inner orders the grid (tile, split, kv_head) so the programs of one tile's KV heads run
    back to back and read the same pages; kv_head_major (benchmark diagnostic only) takes caches
    laid out [kv_heads, num_blocks, block_size, D], JAX's built-in kernel's layout. single_loop: one
    KV loop masked every step; row_gather: K/V rows gathered from flat [blocks * block_size] views.

    Returns (o, None) with o like q4 when num_splits == 1, else f32 o [K, *q4.shape] and base-2
    lse [K, *q4.shape[:-1]] for `merge_splits`.
    """
    t_pad, num_kv_heads, group_pad, head_dim = q4.shape
    row_gather_shape = None
    if row_gather:  # flat views (free reshapes): rows [blocks * block_size, kv_heads, D], table [S * cols]
        if kv_head_major:
            raise ValueError("row_gather needs the engine's [blocks, block_size, kv_heads, D] layout")
        num_blocks, block_size = k_cache.shape[:2]
        row_gather_shape = (block_size, tables.shape[1])
        k_cache = k_cache.reshape(num_blocks * block_size, num_kv_heads, head_dim)
        v_cache = v_cache.reshape(num_blocks * block_size, num_kv_heads, head_dim)
        tables = tables.reshape(-1)
        kv_block, kv_index = (num_blocks * block_size, None, head_dim), lambda h, i, k: (0, h, 0)
    elif kv_head_major:  # diagnostic layout [kv_heads, num_blocks, block_size, D] (bench only)
        num_blocks, block_size = k_cache.shape[1:3]
        kv_block, kv_index = (None, num_blocks, block_size, head_dim), lambda h, i, k: (h, 0, 0, 0)
    else:
        num_blocks, block_size = k_cache.shape[:2]
        kv_block, kv_index = (num_blocks, block_size, None, head_dim), lambda h, i, k: (0, 0, h, 0)

    def spec(block: tuple, index_map: Any) -> pl.BlockSpec:
        """BlockSpec whose index map takes (head, tile, split) whatever the grid order."""
        return pl.BlockSpec(block, (lambda i, k, h: index_map(h, i, k)) if heads_inner else index_map)

    full = lambda shape: spec(shape, lambda h, i, k: (0,) * len(shape))
    per_head_q = spec((t_pad, None, group_pad, head_dim), lambda h, i, k: (0, h, 0, 0))
    per_head_kv = spec(kv_block, kv_index)
    if num_splits == 1:
        out_shape = [jax.ShapeDtypeStruct(q4.shape, q4.dtype)]
        out_specs = [per_head_q]
    else:
        out_shape = [
            jax.ShapeDtypeStruct((num_splits, *q4.shape), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, *q4.shape[:-1]), jnp.float32),
        ]
        out_specs = [
            spec((None, t_pad, None, group_pad, head_dim), lambda h, i, k: (k, 0, h, 0, 0)),
            spec((None, t_pad, None, group_pad), lambda h, i, k: (k, 0, h, 0)),
        ]
    kernel = functools.partial(
        _kernel, block_q=block_q, pages_per_block=pages_per_block, num_splits=num_splits,
        sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, heads_inner=heads_inner,
        single_loop=single_loop, row_gather=row_gather_shape,
    )
    tiles = meta.shape[0]
    grid = (tiles, num_splits, num_kv_heads) if heads_inner else (num_kv_heads, tiles, num_splits)
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
    return (outs[0], None) if num_splits == 1 else (outs[0], outs[1])


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale", "sliding_window", "soft_cap", "interpret", "fuse_heads", "block_q",
        "pages_per_block", "num_splits", "num_warps", "num_stages", "heads_inner",
        "lowering", "single_loop", "row_gather", "heavy_first",
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
    fuse_heads: bool,
    block_q: int,
    pages_per_block: int,
    num_splits: int,
    num_warps: int,
    num_stages: int,
    heads_inner: bool,
    lowering: str,
    single_loop: bool = False,
    row_gather: bool = False,
    heavy_first: bool = False,
) -> jax.Array:
    num_tokens, num_q_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1:3]
    group = num_q_heads // num_kv_heads
    # Interpret mode clamps out-of-range dynamic slices instead of masking them, so give the
    # last tile room there; compiled, the masked loads/stores never touch rows >= T.
    pad_t = block_q if interpret else 0
    # Padding tokens get tiles of their own that write zeros (kv_len 0); only the split merge
    # (0/0 for them) still needs the final `where`.
    meta = tile_metadata(num_tokens, block_q, kv_lens, query_start_loc, num_seqs, cover_padding=True)
    if heavy_first:
        meta = sort_tiles_by_work(meta, block_q)
    tables = sanitize_block_tables(block_tables, kv_lens, block_size, pages_per_block)
    knobs = dict(block_q=block_q, pages_per_block=pages_per_block, num_splits=num_splits,
                 sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                 interpret=interpret, num_warps=num_warps, num_stages=num_stages, lowering=lowering)
    if fuse_heads:
        if row_gather or single_loop:
            raise ValueError("row_gather / single_loop are knobs of the per-head kernel (fuse_heads=False)")
        heads_pad = _pow2(num_q_heads)
        q3 = jnp.pad(q, ((0, pad_t), (0, heads_pad - num_q_heads), (0, 0)))
        o, lse = fused_heads_attention(meta, tables, q3, k_cache, v_cache, group=group, **knobs)
    else:
        group_pad = _pow2(group)
        q4 = q.reshape(num_tokens, num_kv_heads, group, head_dim)
        q4 = jnp.pad(q4, ((0, pad_t), (0, 0), (0, group_pad - group), (0, 0)))
        o, lse = _per_head_attention(meta, tables, q4, k_cache, v_cache, heads_inner=heads_inner,
                                     single_loop=single_loop, row_gather=row_gather, **knobs)
    out = o if lse is None else merge_splits(o, lse)
    if fuse_heads:
        out = out[:num_tokens, :num_q_heads]
    else:
        out = out[:num_tokens, :, :group].reshape(num_tokens, num_q_heads, head_dim)
    if lse is None:
        return out.astype(q.dtype)
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

    `tuning` (all static, defaults from `default_tuning`): fuse_heads (one program reads whole
    pages for all KV heads, decode_attention.py; needs a power-of-two num_kv_heads), block_q (tokens
    per q tile; rows = block_q * group (per-head) or block_q * num_q_heads (fused) >= 16 on GPU),
    pages_per_block (KV pages per inner step), num_splits (split-K factor), num_warps, num_stages,
    heads_inner (per-head only: grid (tile, split, kv_head) instead of (kv_head, tile, split)),
    lowering ("triton").
    Constraints: head_dim and block_size powers of two >= 16; num_q_heads % num_kv_heads == 0.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads=} is not a multiple of {num_kv_heads=}")
    group = num_q_heads // num_kv_heads
    params = default_tuning(
        num_tokens, kv_lens.shape[0], group, block_tables.shape[1] * block_size, num_kv_heads, block_size
    )
    params.setdefault("lowering", "triton")
    unknown = set(tuning) - set(params)
    if unknown:
        raise TypeError(f"unknown tuning arguments {sorted(unknown)}")
    params.update(tuning)
    if params["fuse_heads"]:  # per-head-only knobs stay off unless asked for (then refused)
        params.update({k: tuning.get(k, False) for k in ("row_gather", "single_loop")})
    return _ragged_paged_attention(
        q, k_cache, v_cache, jnp.asarray(kv_lens, jnp.int32), jnp.asarray(block_tables, jnp.int32),
        jnp.asarray(query_start_loc, jnp.int32), jnp.asarray(num_seqs, jnp.int32),
        sm_scale=float(sm_scale), sliding_window=sliding_window, soft_cap=soft_cap,
        interpret=interpret, **params,
    )
