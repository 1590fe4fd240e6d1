"""Fused-heads paged attention: one program per (q tile, KV split) reads whole pages for ALL KV heads.

The engine's cache layout [num_blocks, block_size, num_kv_heads, head_dim] stores one page as
block_size * num_kv_heads contiguous rows of head_dim (32 KB for 16 x 8 x 128 bf16). The per-head
kernel (ragged_paged_attention._kernel) reads 256 B rows at a 2 KB stride, one program per KV head;
here one program reads the page whole, viewed as K [block_size * num_kv_heads, head_dim], and
multiplies it by every query head of the tile at once:

    rows r = t * heads_pad + h     (t < block_q tokens, h < heads_pad query heads; KV head h // group)
    cols c = i * num_kv_heads + g  (i < pages_per_block * block_size positions, KV head g)
    s = q [rows, D] @ K^T [D, cols], masked to the block diagonal g == h // group

so num_kv_heads x more (free) tensor-core FLOPs buy contiguous, fully used page reads and one
page-id lookup per page instead of one per (page, head). Correct for any ragged batch; needs
num_kv_heads a power of two. Opt-in (`fuse_heads=True`): measured on H100 it is NOT faster than the
per-head kernel (bench/notes_attention.md), which shows the page layout is not the decode bottleneck.
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
    online_softmax_step,
    split_kv_range,
)


def _row_col_layout(
    block_q: int, heads_pad: int, group: int, cols: int, num_kv_heads: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Row token offset [rows], column position offset [cols] and the same-head mask [rows, cols]."""
    r = jnp.arange(block_q * heads_pad, dtype=jnp.int32)
    c = jnp.arange(cols, dtype=jnp.int32)
    same_head = ((r % heads_pad) // group)[:, None] == (c % num_kv_heads)[None, :]
    return r // heads_pad, c // num_kv_heads, same_head


def _fused_kernel(
    meta_ref: Any,  # int32[num_tiles, 4]: (seq, q0, q_end, kv_len) per tile
    bt_ref: Any,  # int32[S, pages_padded] sanitized block tables
    q_ref: Any,  # [T_pad, heads_pad, head_dim]
    k_ref: Any,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_ref: Any,  # [num_blocks, block_size, num_kv_heads, head_dim]
    *out_refs: Any,  # o [T_pad, heads_pad, head_dim] (+ lse [T_pad, heads_pad] when split)
    block_q: int,
    pages_per_block: int,
    num_splits: int,
    group: int,
    sm_scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
) -> None:
    tile, split = pl.program_id(0), pl.program_id(1)
    _, heads_pad, head_dim = q_ref.shape
    _, block_size, num_kv_heads, _ = k_ref.shape
    block_k = pages_per_block * block_size  # KV positions per step
    cols = block_k * num_kv_heads
    rows = block_q * heads_pad

    seq, q0, q_end, kv_len = meta_ref[tile, 0], meta_ref[tile, 1], meta_ref[tile, 2], meta_ref[tile, 3]
    tok_ok = q0 + jnp.arange(block_q, dtype=jnp.int32) < q_end  # [block_q]
    row_tok, col_off, same_head = _row_col_layout(block_q, heads_pad, group, cols, num_kv_heads)
    row_pos = kv_len - (q_end - (q0 + row_tok))  # [rows] absolute position of each row's token
    start, stop, full_lo, full_hi = split_kv_range(
        q0, q_end, kv_len, split, block_q=block_q, block_k=block_k, num_splits=num_splits,
        sliding_window=sliding_window,
    )
    q_mask = jnp.broadcast_to(tok_ok[:, None, None], (block_q, heads_pad, head_dim))
    q = masked_load(q_ref.at[pl.ds(q0, block_q)], q_mask).reshape(rows, head_dim)

    def page_ids(j: jax.Array) -> jax.Array:
        """Page id(s) of step j: a scalar for one page per step, else int32[pages_per_block]."""
        if pages_per_block == 1:
            return bt_ref[seq, j]
        return bt_ref[seq, pl.ds(j * pages_per_block, pages_per_block)]

    def step(j: jax.Array, carry: tuple[jax.Array, ...], masked: bool) -> tuple[jax.Array, ...]:
        acc, m, denom = carry  # [rows, D] f32, [rows] f32, [rows] f32
        pages = page_ids(j)
        k = k_ref[pages].reshape(cols, head_dim)
        v = v_ref[pages].reshape(cols, head_dim)
        s = tl_dot(q, k, trans_b=True) * sm_scale  # [rows, cols] f32
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        s = s * LOG2E
        visible = same_head
        if masked:
            kv_pos = (j * block_k + col_off)[None, :]
            visible = visible & (kv_pos <= row_pos[:, None])
            if sliding_window is not None:
                visible = visible & (kv_pos > row_pos[:, None] - sliding_window)
        s = jnp.where(visible, s, MASK_VALUE)
        return online_softmax_step(s, v, acc, m, denom)

    out, lse = attend_kv_blocks(step, start, full_lo, full_hi, stop, rows, head_dim)
    o_ref = out_refs[0]
    masked_store(o_ref.at[pl.ds(q0, block_q)], out.reshape(q_mask.shape).astype(o_ref.dtype), q_mask)
    if num_splits > 1:
        lse_mask = jnp.broadcast_to(tok_ok[:, None], (block_q, heads_pad))
        masked_store(out_refs[1].at[pl.ds(q0, block_q)], lse.reshape(block_q, heads_pad), lse_mask)


def fused_heads_attention(
    meta: jax.Array,
    tables: jax.Array,
    q3: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    *,
    group: int,
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
) -> tuple[jax.Array, jax.Array | None]:
    """Launch the fused-heads kernel (inside the caller's jit).

    meta: int32[num_tiles, 4] from tile_metadata(block_q); tables: sanitized, columns a multiple of
    pages_per_block; q3: [T_pad, heads_pad, head_dim] (heads padded to a power of two, T padded so
    every tile's slice is in range in interpret mode). Returns (o, lse): with num_splits == 1,
    o [T_pad, heads_pad, D] in q's dtype and lse None; else o f32 [K, T_pad, heads_pad, D] and
    base-2 lse [K, T_pad, heads_pad] for `merge_splits`.
    """
    t_pad, heads_pad, head_dim = q3.shape
    num_kv_heads = k_cache.shape[2]
    if num_kv_heads & (num_kv_heads - 1):
        raise ValueError(f"fused-heads kernel needs a power-of-two num_kv_heads, got {num_kv_heads}")
    full = lambda shape: pl.BlockSpec(shape, lambda i, k: (0,) * len(shape))
    if num_splits == 1:
        out_shape = [jax.ShapeDtypeStruct(q3.shape, q3.dtype)]
        out_specs = [full(q3.shape)]
    else:
        out_shape = [
            jax.ShapeDtypeStruct((num_splits, *q3.shape), jnp.float32),
            jax.ShapeDtypeStruct((num_splits, t_pad, heads_pad), jnp.float32),
        ]
        out_specs = [
            pl.BlockSpec((None, *q3.shape), lambda i, k: (k, 0, 0, 0)),
            pl.BlockSpec((None, t_pad, heads_pad), lambda i, k: (k, 0, 0)),
        ]
    kernel = functools.partial(
        _fused_kernel, block_q=block_q, pages_per_block=pages_per_block, num_splits=num_splits,
        group=group, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
    )
    outs = pl.pallas_call(
        kernel,
        grid=(meta.shape[0], num_splits),
        in_specs=[full(meta.shape), full(tables.shape), full(q3.shape), full(k_cache.shape),
                  full(v_cache.shape)],
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        name=f"paged_attention_fused_heads_bq{block_q}_p{pages_per_block}_k{num_splits}",
        **gpu_lowering(lowering, num_warps=num_warps, num_stages=num_stages),
    )(meta, tables, q3, k_cache, v_cache)
    return (outs[0], None) if num_splits == 1 else (outs[0], outs[1])
