"""One kernel writing a step's new K and V rows into their paged caches (Pallas, Triton lowering).

XLA writes K and V with two scatter kernels per layer (~3 and ~2.3 us each at batch 1 on an H200, more
than the work: bench/notes_bench.md, 2026-12-01, fifth session). `paged_kv_write` does both in one
kernel, in place (the caches are aliased to its outputs): program (t, j) copies chunk j of token t's K
and V rows to the token's cache slot, or nothing where the slot is out of range (padding tokens).

    k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim]
    k, v:             [T, kv_heads, head_dim]
    slot_mapping:     int32[T], block * block_size + offset; out of range -> dropped

`paged_kv_write_reference` is the same contract in plain JAX (the engine's scatter), the test oracle.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas._lowering import gpu_lowering

MAX_CHUNK = 1024  # elements of one row chunk per program (Triton blocks are powers of two)


def paged_kv_write_reference(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array,
                             slot_mapping: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The contract in plain JAX: two scatters, out-of-range slots dropped (never clamped)."""
    shape = k_cache.shape
    flat = (shape[0] * shape[1], shape[2], shape[3])
    k_cache = k_cache.reshape(flat).at[slot_mapping].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.reshape(flat).at[slot_mapping].set(v.astype(v_cache.dtype), mode="drop")
    return k_cache.reshape(shape), v_cache.reshape(shape)


def row_chunk(width: int) -> int:
    """The largest power of two dividing `width` (a row of kv_heads * head_dim), at most MAX_CHUNK."""
    return min(width & -width, MAX_CHUNK)


def supports(k_cache: jax.Array, k: jax.Array) -> bool:
    """Whether the kernel serves these shapes: rows that split into chunks of at least 16 elements."""
    return k_cache.ndim == 4 and k.ndim == 3 and row_chunk(k_cache.shape[2] * k_cache.shape[3]) >= 16


def paged_kv_write(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array,
                   slot_mapping: jax.Array, *, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """`paged_kv_write_reference` as one in-place kernel (see the module docstring)."""
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache and v_cache must match, got {k_cache.shape} {k_cache.dtype} and "
                         f"{v_cache.shape} {v_cache.dtype}")
    want = (slot_mapping.shape[0], *k_cache.shape[2:])
    if k.shape != want or v.shape != want:
        raise ValueError(f"k and v must be [T, kv_heads, head_dim] = {want}, got {k.shape} and {v.shape}")
    if not supports(k_cache, k):
        raise ValueError(f"rows of {k_cache.shape[2]} x {k_cache.shape[3]} elements have no power-of-two "
                         f"chunk >= 16; use paged_kv_write_reference")
    return _paged_kv_write(k_cache, v_cache, k, v, slot_mapping.astype(jnp.int32), interpret=interpret)


@functools.partial(jax.jit, static_argnames=("interpret",), donate_argnums=(0, 1))
def _paged_kv_write(k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array,
                    slot_mapping: jax.Array, *, interpret: bool) -> tuple[jax.Array, jax.Array]:
    shape = k_cache.shape
    slots, width = shape[0] * shape[1], shape[2] * shape[3]
    chunk = row_chunk(width)
    num_tokens = k.shape[0]

    def kernel(slot_ref: Any, kv_ref: Any, _kc: Any, _vc: Any, kc_ref: Any, vc_ref: Any) -> None:
        slot = slot_ref[0]
        cols = pl.ds(pl.multiple_of(pl.program_id(1) * chunk, chunk), chunk)

        @pl.when((slot >= 0) & (slot < slots))
        def _() -> None:
            kc_ref[pl.ds(slot, 1), cols] = kv_ref[0]
            vc_ref[pl.ds(slot, 1), cols] = kv_ref[1]

    # K and V as one operand: XLA then computes both (RoPE, casts, split-K sums of the q/k/v GEMM) in one
    # fusion; as two operands it made two kernels of them (H200 trace, bench/notes_bench.md).
    kv = jnp.stack([k.reshape(num_tokens, width), v.reshape(num_tokens, width)]).astype(k_cache.dtype)
    whole = pl.BlockSpec((slots, width), lambda t, j: (0, 0))
    kc, vc = pl.pallas_call(
        kernel,
        grid=(num_tokens, width // chunk),
        in_specs=[pl.BlockSpec((1,), lambda t, j: (t,)), pl.BlockSpec((2, 1, chunk), lambda t, j: (0, t, j)),
                  whole, whole],
        out_specs=[whole, whole],
        out_shape=[jax.ShapeDtypeStruct((slots, width), k_cache.dtype)] * 2,
        input_output_aliases={2: 0, 3: 1},
        interpret=interpret,
        name="paged_kv_write",
        **({} if interpret else gpu_lowering("triton", num_warps=4, num_stages=1)),
    )(slot_mapping, kv, k_cache.reshape(slots, width), v_cache.reshape(slots, width))
    return kc.reshape(shape), vc.reshape(shape)
