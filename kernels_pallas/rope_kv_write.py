"""One kernel for what lies between the q/k/v projection and decode attention (Pallas, Triton lowering).

At batch 1 XLA spends three kernels per layer there: RoPE on q plus its padding to the Mosaic decode
kernel's 8-row groups, RoPE on k stacked with v, and the K/V cache write (1.4-1.8 us each on an H200 for a
few KB of work; bench/notes_bench.md). `rope_kv_write` does all three in one kernel: program (t, j, r)
writes output row r of KV head j for token t: a roped q head, a zero padding row (q rows are padded to
`group_pad` for the attention kernel), the roped k or the v into the token's cache slot (in place;
nothing where the slot is out of range).

    h:            [T, kv_heads, group + 2, head_dim]  (QKVProj's fused output: per KV head its `group` q
                  heads, then its k, then its v), or [S, T, kv_heads, group + 2, head_dim] float32: S split-K
                  partial sums of it (`QKVProj.project_partials`), summed here and rounded to the caches'
                  dtype as the unsplit projection's output would be, so no kernel of its own sums them
    positions:    int32[T]
    inv_freq:     float32[head_dim // 2]
    k/v_cache:    [num_blocks, block_size, kv_heads, head_dim]
    slot_mapping: int32[T], block * block_size + offset; out of range -> dropped
    returns       (q: [T, kv_heads, group_pad, head_dim] in h's dtype (partials: the caches'), k_cache,
                  v_cache)

`rope_kv_write_reference` is the same contract in plain JAX (the engine's own ops), the test oracle.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas._lowering import gpu_lowering
from kernels_pallas.kv_write import paged_kv_write_reference


def rope_kv_write_reference(h: jax.Array, positions: jax.Array, inv_freq: jax.Array, k_cache: jax.Array,
                            v_cache: jax.Array, slot_mapping: jax.Array, *,
                            group_pad: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The contract in plain JAX: the partials summed (if given), the engine's RoPE, the q padding, and the
    two scatters of `paged_kv_write_reference`."""
    from rtp_jax.models.residual import sum_partials
    from rtp_jax.models.rope import apply_rope  # the model's own RoPE: the kernel must match it

    if h.ndim == 5:
        h = sum_partials(h, k_cache.dtype)
    t, kv, g2, hd = h.shape
    group = g2 - 2
    q = apply_rope(h[:, :, :group].reshape(t, kv * group, hd), positions, inv_freq)
    q = jnp.pad(q.reshape(t, kv, group, hd), ((0, 0), (0, 0), (0, group_pad - group), (0, 0)))
    k = apply_rope(h[:, :, group], positions, inv_freq)
    k_cache, v_cache = paged_kv_write_reference(k_cache, v_cache, k, h[:, :, group + 1], slot_mapping)
    return q, k_cache, v_cache


def supports(h: jax.Array, k_cache: jax.Array) -> bool:
    """Whether the kernel serves these shapes: half a head is a power of two >= 16 and so is a partial-sum
    count (Triton loads), the projection and the cache agree on KV heads and head_dim."""
    if h.ndim == 5:
        splits = h.shape[0]
        if splits < 1 or splits & (splits - 1) or h.dtype != jnp.float32:
            return False
        h = jax.ShapeDtypeStruct(h.shape[1:], k_cache.dtype)
    if h.ndim != 4 or k_cache.ndim != 4 or h.shape[2] < 3:
        return False
    half = h.shape[3] // 2
    return (h.shape[3] % 2 == 0 and half >= 16 and half & (half - 1) == 0
            and tuple(h.shape[1:2]) + tuple(h.shape[3:]) == tuple(k_cache.shape[2:]))


def rope_kv_write(h: jax.Array, positions: jax.Array, inv_freq: jax.Array, k_cache: jax.Array,
                  v_cache: jax.Array, slot_mapping: jax.Array, *, group_pad: int,
                  interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`rope_kv_write_reference` as one kernel (see the module docstring)."""
    t, kv, g2, hd = h.shape[-4:]
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache and v_cache must match, got {k_cache.shape} {k_cache.dtype} and "
                         f"{v_cache.shape} {v_cache.dtype}")
    if positions.shape != (t,) or slot_mapping.shape != (t,):
        raise ValueError(f"positions and slot_mapping must be [T] = [{t}], got {positions.shape} and "
                         f"{slot_mapping.shape}")
    if inv_freq.shape != (hd // 2,):
        raise ValueError(f"inv_freq must be [head_dim // 2] = [{hd // 2}], got {inv_freq.shape}")
    if not supports(h, k_cache):
        raise ValueError(f"h {h.shape} {h.dtype} and caches {k_cache.shape}: need [T, kv_heads, group + 2, "
                         "head_dim] (or float32 [S, T, ...] partials, S a power of two) with the caches' "
                         "kv_heads and head_dim, head_dim / 2 a power of two >= 16; use "
                         "rope_kv_write_reference")
    if group_pad < g2 - 2:
        raise ValueError(f"group_pad={group_pad} is below the group of {g2 - 2} q heads")
    return _rope_kv_write(h, positions.astype(jnp.int32), inv_freq.astype(jnp.float32), k_cache, v_cache,
                          slot_mapping.astype(jnp.int32), group_pad=group_pad, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("group_pad", "interpret"), donate_argnums=(3, 4))
def _rope_kv_write(h: jax.Array, positions: jax.Array, inv_freq: jax.Array, k_cache: jax.Array,
                   v_cache: jax.Array, slot_mapping: jax.Array, *, group_pad: int,
                   interpret: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    partials = h.ndim == 5
    t, kv, g2, hd = h.shape[-4:]
    group, half = g2 - 2, hd // 2
    dtype = k_cache.dtype if partials else h.dtype  # of q, and of h's values before RoPE
    shape = k_cache.shape
    slots, width = shape[0] * shape[1], shape[2] * shape[3]

    # One program per (token, KV head, output row): rows < group are q heads, then the zero padding rows,
    # then k (row group_pad) and v (row group_pad + 1). A program per (token, KV head) doing all rows in
    # sequence took 3.4 us at batch 1 on an H200 (bench/notes_bench.md, tenth session).
    def kernel(pos_ref: Any, slot_ref: Any, h_ref: Any, inv_ref: Any, _kc: Any, _vc: Any, q_ref: Any,
               kc_ref: Any, vc_ref: Any) -> None:
        r = pl.program_id(2)
        slot = slot_ref[0]
        col = pl.multiple_of(pl.program_id(1) * hd, hd)
        in_range = (slot >= 0) & (slot < slots)

        def load(row: Any, lo: int, n: int) -> jax.Array:
            """h[row, lo:lo + n] as float32, partials summed and rounded as the projection's output."""
            if not partials:
                return h_ref[0, 0, row, pl.ds(lo, n)].astype(jnp.float32)
            return jnp.sum(h_ref[:, 0, 0, row, pl.ds(lo, n)], axis=0).astype(dtype).astype(jnp.float32)

        def rope(row: Any) -> tuple[jax.Array, jax.Array]:
            freqs = pos_ref[0].astype(jnp.float32) * inv_ref[...]  # [half]
            cos, sin = jnp.cos(freqs), jnp.sin(freqs)
            x1, x2 = load(row, 0, half), load(row, half, half)
            return x1 * cos - x2 * sin, x2 * cos + x1 * sin

        @pl.when(r < group)
        def _q() -> None:
            a, b = rope(r)
            q_ref[0, 0, 0, pl.ds(0, half)] = a.astype(q_ref.dtype)
            q_ref[0, 0, 0, pl.ds(half, half)] = b.astype(q_ref.dtype)

        @pl.when((r >= group) & (r < group_pad))
        def _pad() -> None:
            q_ref[0, 0, 0, pl.ds(0, half)] = jnp.zeros((half,), q_ref.dtype)
            q_ref[0, 0, 0, pl.ds(half, half)] = jnp.zeros((half,), q_ref.dtype)

        @pl.when((r == group_pad) & in_range)
        def _k() -> None:
            a, b = rope(group)
            kc_ref[pl.ds(slot, 1), pl.ds(col, half)] = a.astype(kc_ref.dtype)[None]
            kc_ref[pl.ds(slot, 1), pl.ds(col + half, half)] = b.astype(kc_ref.dtype)[None]

        @pl.when((r == group_pad + 1) & in_range)
        def _v() -> None:
            vc_ref[pl.ds(slot, 1), pl.ds(col, hd)] = load(group + 1, 0, hd).astype(vc_ref.dtype)[None]

    whole = pl.BlockSpec((slots, width), lambda i, j, r: (0, 0))
    h_spec = (pl.BlockSpec((h.shape[0], 1, 1, g2, hd), lambda i, j, r: (0, i, j, 0, 0)) if partials
              else pl.BlockSpec((1, 1, g2, hd), lambda i, j, r: (i, j, 0, 0)))
    q_row = lambda i, j, r: (i, j, jnp.minimum(r, group_pad - 1), 0)  # noqa: E731 - k/v programs: unused
    q, kc, vc = pl.pallas_call(
        kernel,
        grid=(t, kv, group_pad + 2),
        in_specs=[pl.BlockSpec((1,), lambda i, j, r: (i,)), pl.BlockSpec((1,), lambda i, j, r: (i,)),
                  h_spec,
                  pl.BlockSpec((half,), lambda i, j, r: (0,)), whole, whole],
        out_specs=[pl.BlockSpec((1, 1, 1, hd), q_row), whole, whole],
        out_shape=[jax.ShapeDtypeStruct((t, kv, group_pad, hd), dtype),
                   jax.ShapeDtypeStruct((slots, width), k_cache.dtype),
                   jax.ShapeDtypeStruct((slots, width), k_cache.dtype)],
        input_output_aliases={4: 1, 5: 2},
        interpret=interpret,
        name="rope_kv_write",
        **({} if interpret else gpu_lowering("triton", num_warps=1, num_stages=1)),
    )(positions, slot_mapping, h, inv_freq, k_cache.reshape(slots, width), v_cache.reshape(slots, width))
    return q, kc.reshape(shape), vc.reshape(shape)
