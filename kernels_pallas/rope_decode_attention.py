"""Decode attention for short contexts in the kernel that ropes q/k and writes K/V (Pallas, Triton lowering).

At batch 1 on an H200 the Mosaic decode kernel and its split merge take ~6.4 us per layer for a 128-384
token context whose K/V take well under 1 us to read (skipping both made bs1 decode 5% faster,
bench/notes_bench.md, sixteenth session): latency, not bytes. This kernel folds that attention into the
program grid of kernels_pallas/rope_kv_write.py, so one kernel replaces three:

    program (t, j, 0): token t's q heads of KV head j: rope q, rope the new k, attend over the cached
                       context [lo, L - 1) in tiles of `pages_per_tile` pages (online softmax in float32),
                       then the new token itself from registers (its cache row is written concurrently by
                       program (t, j, 1), so it is never read back), and store the `group` output rows
    program (t, j, 1): the roped k into the token's cache slot (nothing where the slot is out of range)
    program (t, j, 2): the v likewise

One program walks the whole context, so the kernel is for short contexts (the caller bounds it by the
block table's width); there is no split and no merge.

    h:            [T, kv_heads, group + 2, head_dim] (QKVProj's fused output), or float32 [S, T, ...]: S
                  split-K partial sums of it, summed here and rounded to the caches' dtype
    positions:    int32[T], the new token's position (= kv_lens - 1 for a live slot)
    inv_freq:     float32[head_dim // 2]
    k/v_cache:    [num_blocks, block_size, kv_heads, head_dim]
    slot_mapping: int32[T]; kv_lens: int32[T] (0: padded slot, zero output); block_tables: int32[T, width]
    returns       (out [T, kv_heads * group, head_dim] in the caches' dtype, k_cache, v_cache)

`rope_decode_attention_reference` is the same contract in plain JAX, the test oracle.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas import rope_kv_write as rkw
from kernels_pallas._lowering import gpu_lowering, tl_dot
from kernels_pallas._paged_common import LOG2E, MASK_VALUE, online_softmax_step

ROWS = 16  # q rows of the tensor-core tile: the group padded (tl.dot needs M >= 16)


def rope_decode_attention_reference(h: jax.Array, positions: jax.Array, inv_freq: jax.Array,
                                    k_cache: jax.Array, v_cache: jax.Array, slot_mapping: jax.Array,
                                    kv_lens: jax.Array, block_tables: jax.Array, *, sm_scale: float,
                                    sliding_window: int | None = None, soft_cap: float | None = None,
                                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The contract in plain JAX: rope_kv_write's reference, then dense attention over each token's
    pages (kernels_pallas/ragged_paged_attention.py's reference, one query token per sequence); padded
    slots (kv_len 0) give zero rows."""
    from kernels_pallas.ragged_paged_attention import ragged_paged_attention_reference

    t, kv, g2, hd = h.shape[-4:]
    group = g2 - 2
    q, k_cache, v_cache = rkw.rope_kv_write_reference(h, positions, inv_freq, k_cache, v_cache,
                                                      slot_mapping, group_pad=group)
    out = ragged_paged_attention_reference(
        q.reshape(t, kv * group, hd), k_cache, v_cache, kv_lens, block_tables,
        jnp.arange(t + 1, dtype=jnp.int32), jnp.int32(t), sm_scale=sm_scale, sliding_window=sliding_window,
        soft_cap=soft_cap)
    return jnp.where((kv_lens > 0)[:, None, None], out, 0).astype(out.dtype), k_cache, v_cache


def supports(h: jax.Array, k_cache: jax.Array, block_tables: jax.Array, *, num_q_heads: int,
             pages_per_tile: int) -> bool:
    """Whether the kernel serves these shapes: rope_kv_write's, a power-of-two group of at most ROWS q
    heads per KV head, head_dim a power of two, and a block table of whole tiles."""
    if not rkw.supports(h, k_cache):
        return False
    kv, hd = k_cache.shape[2], k_cache.shape[3]
    group = num_q_heads // kv
    return (num_q_heads == kv * group and h.shape[-2] == group + 2 and 0 < group <= ROWS
            and group & (group - 1) == 0 and hd & (hd - 1) == 0 and pages_per_tile > 0
            and block_tables.ndim == 2 and block_tables.shape[1] % pages_per_tile == 0
            and k_cache.dtype in (jnp.bfloat16, jnp.float16))


def rope_decode_attention(h: jax.Array, positions: jax.Array, inv_freq: jax.Array, k_cache: jax.Array,
                          v_cache: jax.Array, slot_mapping: jax.Array, kv_lens: jax.Array,
                          block_tables: jax.Array, *, num_q_heads: int, sm_scale: float,
                          sliding_window: int | None = None, soft_cap: float | None = None,
                          pages_per_tile: int = 4, num_warps: int = 4, num_stages: int = 2,
                          interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`rope_decode_attention_reference` as one kernel (see the module docstring)."""
    t = h.shape[-4]
    for name, a in (("positions", positions), ("slot_mapping", slot_mapping), ("kv_lens", kv_lens)):
        if a.shape != (t,):
            raise ValueError(f"{name} must be [T] = [{t}], got {a.shape}")
    if block_tables.shape[:1] != (t,):
        raise ValueError(f"block_tables must be [T, width] with T = {t}, got {block_tables.shape}")
    if inv_freq.shape != (h.shape[-1] // 2,):
        raise ValueError(f"inv_freq must be [head_dim // 2] = [{h.shape[-1] // 2}], got {inv_freq.shape}")
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache and v_cache must match, got {k_cache.shape} {k_cache.dtype} and "
                         f"{v_cache.shape} {v_cache.dtype}")
    if not supports(h, k_cache, block_tables, num_q_heads=num_q_heads, pages_per_tile=pages_per_tile):
        raise ValueError(f"h {h.shape} {h.dtype}, caches {k_cache.shape} {k_cache.dtype}, block_tables "
                         f"{block_tables.shape}, num_q_heads={num_q_heads}, pages_per_tile={pages_per_tile}: "
                         "need rope_kv_write's shapes, a power-of-two group of at most "
                         f"{ROWS} q heads per KV head, a bf16/fp16 cache and a table width divisible by "
                         "pages_per_tile; use rope_decode_attention_reference")
    i32 = jnp.int32
    return _rope_decode_attention(
        h, positions.astype(i32), inv_freq.astype(jnp.float32), k_cache, v_cache, slot_mapping.astype(i32),
        kv_lens.astype(i32), block_tables.astype(i32), sm_scale=float(sm_scale),
        sliding_window=sliding_window, soft_cap=soft_cap, pages_per_tile=pages_per_tile,
        num_warps=num_warps, num_stages=num_stages, interpret=interpret)


@functools.partial(jax.jit, donate_argnums=(3, 4), static_argnames=(
    "sm_scale", "sliding_window", "soft_cap", "pages_per_tile", "num_warps", "num_stages", "interpret"))
def _rope_decode_attention(h: jax.Array, positions: jax.Array, inv_freq: jax.Array, k_cache: jax.Array,
                           v_cache: jax.Array, slot_mapping: jax.Array, kv_lens: jax.Array,
                           block_tables: jax.Array, *, sm_scale: float, sliding_window: int | None,
                           soft_cap: float | None, pages_per_tile: int, num_warps: int, num_stages: int,
                           interpret: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    partials = h.ndim == 5
    t, kv, g2, hd = h.shape[-4:]
    group, half = g2 - 2, hd // 2
    dtype = k_cache.dtype
    num_blocks, block_size = k_cache.shape[:2]
    slots, width = num_blocks * block_size, kv * hd
    tile = pages_per_tile * block_size
    table_width = block_tables.shape[1]

    def kernel(pos_ref: Any, slot_ref: Any, len_ref: Any, bt_ref: Any, h_ref: Any, inv_ref: Any,
               kin_ref: Any, vin_ref: Any, o_ref: Any, kc_ref: Any, vc_ref: Any) -> None:
        r = pl.program_id(2)
        slot, kv_len = slot_ref[0], len_ref[0]
        table_row = pl.program_id(0) * table_width  # token t's row of the flattened block table
        col = pl.multiple_of(pl.program_id(1) * hd, hd)

        def load(rows: Any, lo: int, n: int) -> jax.Array:
            """h[rows, lo:lo + n] as float32, partials summed and rounded as the projection's output."""
            if not partials:
                return h_ref[0, 0, rows, pl.ds(lo, n)].astype(jnp.float32)
            return jnp.sum(h_ref[:, 0, 0, rows, pl.ds(lo, n)], axis=0).astype(dtype).astype(jnp.float32)

        def rope(rows: Any) -> jax.Array:
            """The roped rows, rounded to the caches' dtype: [half] pieces joined along the last axis."""
            freqs = pos_ref[0].astype(jnp.float32) * inv_ref[...]  # [half]
            cos, sin = jnp.cos(freqs), jnp.sin(freqs)
            x1, x2 = load(rows, 0, half), load(rows, half, half)
            return (x1 * cos - x2 * sin).astype(dtype), (x2 * cos + x1 * sin).astype(dtype)

        @pl.when((r == 1) & (slot >= 0) & (slot < slots))
        def _k() -> None:
            a, b = rope(group)
            kc_ref[pl.ds(slot, 1), pl.ds(col, half)] = a[None]
            kc_ref[pl.ds(slot, 1), pl.ds(col + half, half)] = b[None]

        @pl.when((r == 2) & (slot >= 0) & (slot < slots))
        def _v() -> None:
            vc_ref[pl.ds(slot, 1), pl.ds(col, hd)] = load(group + 1, 0, hd).astype(dtype)[None]

        @pl.when(r == 0)
        def _attend() -> None:
            # q rows padded to ROWS by a one-hot sum (rows >= group zero): tl.dot wants M >= 16.
            qa, qb = rope(pl.ds(0, group))  # [group, half] each
            pick = (jnp.arange(ROWS)[:, None] == jnp.arange(group)[None, :]).astype(jnp.float32)
            q1 = jnp.sum(pick[:, :, None] * qa.astype(jnp.float32)[None], axis=1).astype(dtype)
            q2 = jnp.sum(pick[:, :, None] * qb.astype(jnp.float32)[None], axis=1).astype(dtype)
            scale = sm_scale if soft_cap is None else 1.0

            def logits(s: jax.Array) -> jax.Array:
                """Raw q.k products -> base-2 logits (soft cap, scale)."""
                if soft_cap is not None:
                    return (soft_cap * LOG2E) * jnp.tanh(s * (sm_scale / soft_cap))
                return s * (scale * LOG2E)

            last = kv_len - 1  # the new token's position; the cache holds [0, last) readable
            lo = 0 if sliding_window is None else jnp.maximum(kv_len - sliding_window, 0)

            offsets = jnp.arange(tile, dtype=jnp.int32)

            def step(j: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]):
                # Each position's page id straight from the table (a pointer gather; Triton has no
                # gather of a register array), then its cache row.
                pages = bt_ref[table_row + j * pages_per_tile + offsets // block_size]
                rows = pages * block_size + offsets % block_size  # [tile]
                k1, k2 = kin_ref[rows, pl.ds(col, half)], kin_ref[rows, pl.ds(col + half, half)]
                s = tl_dot(q1, k1, trans_b=True) + tl_dot(q2, k2, trans_b=True)  # [ROWS, tile]
                kv_pos = j * tile + offsets
                visible = (kv_pos < last) & (kv_pos >= lo)
                s = jnp.where(visible[None, :], logits(s), MASK_VALUE)
                return online_softmax_step(s, vin_ref[rows, pl.ds(col, hd)], *carry)

            carry = (jnp.zeros((ROWS, hd), jnp.float32), jnp.full((ROWS,), MASK_VALUE, jnp.float32),
                     jnp.zeros((ROWS,), jnp.float32))
            stop = (jnp.maximum(last, 0) + tile - 1) // tile  # tiles holding a position < last
            start = jnp.where(lo < last, lo // tile, stop)  # so every tile walked has a visible position
            acc, m, denom = jax.lax.fori_loop(start, stop, step, carry)
            # The new token, from registers (its cache row may not be written yet).
            ka, kb = rope(group)
            vn = load(group + 1, 0, hd).astype(dtype).astype(jnp.float32)
            s_new = (jnp.sum(q1.astype(jnp.float32) * ka.astype(jnp.float32)[None], axis=1)
                     + jnp.sum(q2.astype(jnp.float32) * kb.astype(jnp.float32)[None], axis=1))
            s_new = logits(s_new)  # [ROWS]
            m_new = jnp.maximum(m, s_new)
            alpha, p = jnp.exp2(m - m_new), jnp.exp2(s_new - m_new)
            acc = acc * alpha[:, None] + p[:, None] * vn[None, :]
            denom = denom * alpha + p
            out = acc / denom[:, None]
            out = jnp.where(kv_len > 0, out, 0.0)
            # The group's rows out of the ROWS-row tile, by the same one-hot (a sum over ROWS).
            o_ref[0, 0] = jnp.sum(pick[:, :, None] * out[:, None, :], axis=0).astype(o_ref.dtype)

    whole = pl.BlockSpec((slots, width), lambda i, j, r: (0, 0))
    tok = pl.BlockSpec((1,), lambda i, j, r: (i,))
    h_spec = (pl.BlockSpec((h.shape[0], 1, 1, g2, hd), lambda i, j, r: (0, i, j, 0, 0)) if partials
              else pl.BlockSpec((1, 1, g2, hd), lambda i, j, r: (i, j, 0, 0)))
    kc2, vc2 = k_cache.reshape(slots, width), v_cache.reshape(slots, width)  # rows: cache slots
    out, kc, vc = pl.pallas_call(
        kernel,
        grid=(t, kv, 3),
        in_specs=[tok, tok, tok, pl.BlockSpec((t * table_width,), lambda i, j, r: (0,)), h_spec,
                  pl.BlockSpec((half,), lambda i, j, r: (0,)), whole, whole],
        out_specs=[pl.BlockSpec((1, 1, group, hd), lambda i, j, r: (i, j, 0, 0)), whole, whole],
        out_shape=[jax.ShapeDtypeStruct((t, kv, group, hd), dtype),
                   jax.ShapeDtypeStruct((slots, width), dtype),
                   jax.ShapeDtypeStruct((slots, width), dtype)],
        input_output_aliases={6: 1, 7: 2},
        interpret=interpret,
        name="rope_decode_attention",
        **({} if interpret else gpu_lowering("triton", num_warps=num_warps, num_stages=num_stages)),
    )(positions, slot_mapping, kv_lens, block_tables.reshape(-1), h, inv_freq, kc2, vc2)
    return out.reshape(t, kv * group, hd), kc.reshape(k_cache.shape), vc.reshape(v_cache.shape)
