"""Split-K epilogues of the decode layer's GEMMs as single Pallas kernels (Triton lowering).

At batch 1-16 XLA runs each of a decode layer's small GEMMs with split-K, then sums the partials in a
separate reduction kernel, then the consumer (residual add, RMSNorm, RoPE, the K/V cache write) in one or
two more: ~1.4-1.8 us each for a few KB of work (bench/notes_bench.md, H200 kernel tables). Here the
model computes the partials itself (a batched GEMM over K split `S` ways, see `split_k_matmul`) and one
kernel does everything after it:

  `add_rmsnorm`:  x = residual + sum_s partials[s]; xn = rms_norm(x) * weight       (o_proj, down_proj)
  `qkv_rope_write`: q, k, v = sum_s partials[s] per KV head; RoPE on q and k; K and V rows written to
                  their cache slots in place; q out in the decode kernel's padded layout (q_proj/k_proj/
                  v_proj)

Rounding matches the unfused XLA graph: the GEMM result is rounded to the activation dtype before the
residual add or RoPE, RMSNorm's statistics are f32, RoPE runs in f32 on the rounded values. The
`*_reference` functions are the same contracts in plain JAX (the test oracles and the fallback).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas._lowering import gpu_lowering


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def split_k_matmul(x: jax.Array, w_split: jax.Array) -> jax.Array:
    """Partial products of a GEMM whose contraction axis is split `S` ways, in f32.

    x: [T, K]; w_split: [S, N..., K // S] (the weight's output axes, then its slice of K) ->
    [S, T, N...]. Summing over the first axis gives x @ w.T.
    """
    s = w_split.shape[0]
    xs = x.reshape(x.shape[0], s, x.shape[1] // s)
    out_axes = "".join("abcdefg"[: w_split.ndim - 2])
    return jnp.einsum(f"tsk,s{out_axes}k->st{out_axes}", xs, w_split, preferred_element_type=jnp.float32)


# ---- add_rmsnorm -----------------------------------------------------------------------------------
def add_rmsnorm_reference(partials: jax.Array, residual: jax.Array, weight: jax.Array, eps: float
                          ) -> tuple[jax.Array, jax.Array]:
    """partials: f32 [S, T, N]; residual: [T, N]; weight: [N] -> (x, xn), both [T, N] in residual's
    dtype: x = residual + (sum of the partials, rounded), xn = RMSNorm(x) * weight as rms_norm does."""
    dtype = residual.dtype
    x = (residual.astype(jnp.float32) + partials.sum(0).astype(dtype).astype(jnp.float32)).astype(dtype)
    x32 = x.astype(jnp.float32)
    normed = (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(dtype)
    return x, (weight.astype(dtype).astype(jnp.float32) * normed.astype(jnp.float32)).astype(dtype)


def add_rmsnorm_supported(partials: Any, residual: Any) -> bool:
    """Static shapes the kernel serves: power-of-two S and N of at least 16 (Triton blocks)."""
    s, _, n = partials.shape
    return _pow2(s) and _pow2(n) and n >= 16 and residual.shape == partials.shape[1:]


def add_rmsnorm(partials: jax.Array, residual: jax.Array, weight: jax.Array, eps: float, *,
                interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """`add_rmsnorm_reference` as one kernel: program t reads row t's S partial rows and its residual."""
    if not add_rmsnorm_supported(partials, residual) or weight.shape != residual.shape[1:]:
        raise ValueError(f"add_rmsnorm needs partials [S, T, N] (S, N powers of two), residual [T, N] and "
                         f"weight [N]; got {partials.shape}, {residual.shape}, {weight.shape}")
    return _add_rmsnorm(partials, residual, weight, eps=float(eps), interpret=interpret)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def _add_rmsnorm(partials: jax.Array, residual: jax.Array, weight: jax.Array, *, eps: float,
                 interpret: bool) -> tuple[jax.Array, jax.Array]:
    s, t, n = partials.shape
    dtype = residual.dtype

    def kernel(p_ref: Any, r_ref: Any, w_ref: Any, x_ref: Any, xn_ref: Any) -> None:
        acc = p_ref[0]
        for i in range(1, s):  # S is small and static; rows of N f32 each
            acc = acc + p_ref[i]
        x = (r_ref[...].astype(jnp.float32) + acc.astype(dtype).astype(jnp.float32)).astype(dtype)
        x32 = x.astype(jnp.float32)
        inv = jax.lax.rsqrt(jnp.sum(x32 * x32) / n + eps)
        normed = (x32 * inv).astype(dtype).astype(jnp.float32)
        x_ref[...] = x
        xn_ref[...] = (w_ref[...].astype(dtype).astype(jnp.float32) * normed).astype(dtype)

    row = pl.BlockSpec((None, n), lambda i: (i, 0))
    return pl.pallas_call(
        kernel,
        grid=(t,),
        in_specs=[pl.BlockSpec((s, None, n), lambda i: (0, i, 0)), row, pl.BlockSpec((n,), lambda i: (0,))],
        out_specs=[row, row],
        out_shape=[jax.ShapeDtypeStruct((t, n), dtype)] * 2,
        interpret=interpret,
        name=f"add_rmsnorm_s{s}",
        **({} if interpret else gpu_lowering("triton", num_warps=8, num_stages=1)),
    )(partials, residual, weight)


# ---- qkv_rope_write --------------------------------------------------------------------------------
def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array) -> tuple[jax.Array, jax.Array]:
    """positions: int32[T], inv_freq: f32[head_dim // 2] -> cos, sin: f32 [T, head_dim // 2]."""
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(freqs), jnp.sin(freqs)


def _rotate(x1: jax.Array, x2: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
    """HF's rotate-half RoPE on the two halves of the head dimension, f32."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


def qkv_rope_write_reference(partials: jax.Array, cos: jax.Array, sin: jax.Array, k_cache: jax.Array,
                             v_cache: jax.Array, slot_mapping: jax.Array, *, group_pad: int, dtype: Any
                             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The contract in plain JAX.

    partials: f32 [S, T, kv_heads, group + 2, head_dim] (per KV head: its `group` query heads, its K, its
    V, as `QKVProj`); cos, sin: f32 [T, head_dim // 2]; caches [num_blocks, block_size, kv_heads,
    head_dim]; slot_mapping: int32[T] (out of range: not written). Returns (q [T, kv_heads, group_pad,
    head_dim] in `dtype` with RoPE, rows >= group zero; the caches with this step's K (RoPE) and V rows).
    """
    h = partials.sum(0).astype(dtype).astype(jnp.float32)  # [T, KVH, G + 2, D]
    t, kvh, g2, d = h.shape
    half = d // 2
    c, s = cos[:, None, None, :], sin[:, None, None, :]
    r1, r2 = _rotate(h[..., :half], h[..., half:], c, s)
    roped = jnp.concatenate([r1, r2], -1).astype(dtype)  # rows of q and k
    q = jnp.pad(roped[:, :, : g2 - 2], ((0, 0), (0, 0), (0, group_pad - (g2 - 2)), (0, 0)))
    shape = k_cache.shape
    flat = (shape[0] * shape[1], kvh, d)
    k_new = k_cache.reshape(flat).at[slot_mapping].set(roped[:, :, g2 - 2].astype(k_cache.dtype),
                                                       mode="drop")
    v_new = v_cache.reshape(flat).at[slot_mapping].set(h[:, :, g2 - 1].astype(dtype).astype(v_cache.dtype),
                                                       mode="drop")
    return q, k_new.reshape(shape), v_new.reshape(shape)


def qkv_rope_write_supported(partials: Any, group_pad: int) -> bool:
    """Static shapes the kernel serves: S, group, head_dim / 2 and group_pad - group powers of two (or the
    last zero) — Triton blocks."""
    s, _, _, g2, d = partials.shape
    g = g2 - 2
    pad = group_pad - g
    return _pow2(s) and _pow2(g) and d % 2 == 0 and _pow2(d // 2) and d >= 32 and (pad == 0 or _pow2(pad))


def qkv_rope_write(partials: jax.Array, cos: jax.Array, sin: jax.Array, k_cache: jax.Array,
                   v_cache: jax.Array, slot_mapping: jax.Array, *, group_pad: int, dtype: Any,
                   interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`qkv_rope_write_reference` as one in-place kernel: program (t, h) sums token t's partials of KV
    head h, ropes its q rows and K row, writes K and V to slot t, and q to its padded rows."""
    s, t, kvh, g2, d = partials.shape
    if not qkv_rope_write_supported(partials, group_pad) or group_pad < g2 - 2:
        raise ValueError(f"qkv_rope_write: partials {partials.shape} with group_pad {group_pad} is not a "
                         "supported shape (S, group, head_dim/2, group_pad - group powers of two)")
    if k_cache.shape[2:] != (kvh, d) or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches {k_cache.shape} / {v_cache.shape} do not hold {kvh} heads of {d}")
    if cos.shape != (t, d // 2) or sin.shape != cos.shape or slot_mapping.shape != (t,):
        raise ValueError(f"cos/sin must be [{t}, {d // 2}] and slot_mapping [{t}], got {cos.shape}, "
                         f"{sin.shape}, {slot_mapping.shape}")
    return _qkv_rope_write(partials, cos, sin, k_cache, v_cache, slot_mapping.astype(jnp.int32),
                           group_pad=group_pad, dtype=jnp.dtype(dtype), interpret=interpret)


@functools.partial(jax.jit, static_argnames=("group_pad", "dtype", "interpret"), donate_argnums=(3, 4))
def _qkv_rope_write(partials: jax.Array, cos: jax.Array, sin: jax.Array, k_cache: jax.Array,
                    v_cache: jax.Array, slot_mapping: jax.Array, *, group_pad: int, dtype: Any,
                    interpret: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    s, t, kvh, g2, d = partials.shape
    g, half = g2 - 2, d // 2
    shape = k_cache.shape
    slots = shape[0] * shape[1]

    def kernel(p_ref: Any, cos_ref: Any, sin_ref: Any, slot_ref: Any, _kc: Any, _vc: Any,
               q_ref: Any, kc_ref: Any, vc_ref: Any) -> None:
        def summed(rows: Any, cols: Any) -> jax.Array:  # sum over S, rounded like the GEMM's output
            acc = p_ref[0, rows, cols]
            for i in range(1, s):
                acc = acc + p_ref[i, rows, cols]
            return acc.astype(dtype).astype(jnp.float32)

        lo, hi = pl.ds(0, half), pl.ds(half, half)
        cos, sin = cos_ref[...], sin_ref[...]
        q1, q2 = _rotate(summed(pl.ds(0, g), lo), summed(pl.ds(0, g), hi), cos[None, :], sin[None, :])
        q_ref[pl.ds(0, g), lo] = q1.astype(q_ref.dtype)
        q_ref[pl.ds(0, g), hi] = q2.astype(q_ref.dtype)
        if group_pad > g:
            q_ref[pl.ds(g, group_pad - g), :] = jnp.zeros((group_pad - g, d), q_ref.dtype)
        k1, k2 = _rotate(summed(g, lo), summed(g, hi), cos, sin)
        v = summed(g + 1, pl.ds(0, d))
        slot = slot_ref[0]
        col = pl.program_id(1) * d

        @pl.when((slot >= 0) & (slot < slots))
        def _() -> None:
            row = pl.ds(slot, 1)
            kc_ref[row, pl.ds(col, half)] = k1.astype(dtype).astype(kc_ref.dtype)[None]
            kc_ref[row, pl.ds(col + half, half)] = k2.astype(dtype).astype(kc_ref.dtype)[None]
            vc_ref[row, pl.ds(col, d)] = v.astype(kc_ref.dtype)[None]

    whole = pl.BlockSpec((slots, kvh * d), lambda i, h: (0, 0))
    trig = pl.BlockSpec((None, half), lambda i, h: (i, 0))
    q, kc, vc = pl.pallas_call(
        kernel,
        grid=(t, kvh),
        in_specs=[pl.BlockSpec((s, None, None, g2, d), lambda i, h: (0, i, h, 0, 0)), trig, trig,
                  pl.BlockSpec((1,), lambda i, h: (i,)), whole, whole],
        out_specs=[pl.BlockSpec((None, None, group_pad, d), lambda i, h: (i, h, 0, 0)), whole, whole],
        out_shape=[jax.ShapeDtypeStruct((t, kvh, group_pad, d), dtype),
                   jax.ShapeDtypeStruct((slots, kvh * d), k_cache.dtype),
                   jax.ShapeDtypeStruct((slots, kvh * d), k_cache.dtype)],
        input_output_aliases={4: 1, 5: 2},
        interpret=interpret,
        name=f"qkv_rope_write_s{s}",
        **({} if interpret else gpu_lowering("triton", num_warps=4, num_stages=1)),
    )(partials, cos, sin, slot_mapping, k_cache.reshape(slots, kvh * d), v_cache.reshape(slots, kvh * d))
    return q, kc.reshape(shape), vc.reshape(shape)
