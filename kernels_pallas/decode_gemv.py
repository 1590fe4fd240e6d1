"""Decode-sized matrix-vector products with the layer's small ops fused in (Pallas, Triton lowering).

At batch 1 a Llama layer runs its four GEMMs near the memory roofline, but XLA surrounds them with ~10 small
kernels (RMSNorm, split-K sums, residual adds, silu * up), each 1-3 us of launch and latency on an H200
(bench/notes_bench.md, 2026-12-01). `norm_gemv` does the work of one GEMM and its neighbours in one kernel:

    y = epilogue(prologue(x) @ w.T)
    prologue: RMSNorm of x with `norm_weight` (optional; HF's numerics: fp32 statistics, cast, then weight)
    w:        [N, K] (HF's [out, in]) or [2, N, K] for a gate/up pair, whose epilogue is silu(gate) * up
    epilogue: + residual [M, N] (optional)

One program owns `block_n` output columns over all of K (no split-K, so the epilogue sees final sums); it
reads its rows of `w` once, in `block_k` chunks that Triton pipelines `num_stages` deep, and recomputes the
RMSNorm statistics of the (tiny) x itself. x's rows are padded to 16 for the tensor-core dot.

`norm_gemv_reference` is the same computation in plain JAX (the model's ops), the contract and the test
oracle. On the CPU `interpret=True` runs the kernel in JAX's Pallas interpreter.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas._lowering import gpu_lowering, tl_dot

MIN_ROWS = 16  # the tensor-core dot's smallest M


def _rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    # The model's `rtp_jax.models.attention.rms_norm`, restated: kernels_pallas imports nothing from the
    # engine (tests/kernels_pallas/test_decode_gemv.py checks the two agree).
    x32 = x.astype(jnp.float32)
    x32 = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * x32.astype(x.dtype)


def norm_gemv_reference(x: jax.Array, w: jax.Array, *, norm_weight: jax.Array | None = None,
                        residual: jax.Array | None = None, eps: float = 1e-5) -> jax.Array:
    """x: [M, K]; w: [N, K] or [2, N, K]; norm_weight: [K]; residual: [M, N] -> [M, N] in x's dtype."""
    h = _rms_norm(x, norm_weight, eps) if norm_weight is not None else x
    if w.ndim == 3:
        gate = jnp.einsum("mk,nk->mn", h, w[0])
        up = jnp.einsum("mk,nk->mn", h, w[1])
        y = jax.nn.silu(gate) * up
    else:
        y = jnp.einsum("mk,nk->mn", h, w)
    return y + residual if residual is not None else y


def norm_gemv(x: jax.Array, w: jax.Array, *, norm_weight: jax.Array | None = None,
              residual: jax.Array | None = None, eps: float = 1e-5, block_n: int = 32, block_k: int = 512,
              num_warps: int = 4, num_stages: int = 3, interpret: bool = False) -> jax.Array:
    """The kernel version of `norm_gemv_reference` (see the module docstring)."""
    m, k = x.shape
    pair = w.ndim == 3
    n = w.shape[-2]
    if w.shape[-1] != k or (pair and w.shape[0] != 2) or w.ndim not in (2, 3):
        raise ValueError(f"w must be [N, {k}] or [2, N, {k}] for x of shape {x.shape}, got {w.shape}")
    if norm_weight is not None and norm_weight.shape != (k,):
        raise ValueError(f"norm_weight must be [{k}], got {norm_weight.shape}")
    if residual is not None and residual.shape != (m, n):
        raise ValueError(f"residual must be [{m}, {n}], got {residual.shape}")
    if m > MIN_ROWS:
        raise ValueError(f"norm_gemv serves decode batches of at most {MIN_ROWS} rows, got {m}")
    if n % block_n or k % block_k:
        raise ValueError(f"N={n} and K={k} must be multiples of block_n={block_n} and block_k={block_k}")
    return _norm_gemv(x, w, norm_weight, residual, eps=float(eps), block_n=block_n, block_k=block_k,
                      num_warps=num_warps, num_stages=num_stages, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("eps", "block_n", "block_k", "num_warps", "num_stages",
                                             "interpret"))
def _norm_gemv(x: jax.Array, w: jax.Array, norm_weight: jax.Array | None, residual: jax.Array | None, *,
               eps: float, block_n: int, block_k: int, num_warps: int, num_stages: int,
               interpret: bool) -> jax.Array:
    m, k = x.shape
    pair, n = w.ndim == 3, w.shape[-2]
    x16 = jnp.pad(x, ((0, MIN_ROWS - m), (0, 0)))
    operands: list[jax.Array] = [x16, w]
    in_specs = [pl.BlockSpec((MIN_ROWS, k), lambda i: (0, 0)),
                pl.BlockSpec((2, block_n, k), lambda i: (0, i, 0)) if pair
                else pl.BlockSpec((block_n, k), lambda i: (i, 0))]
    if norm_weight is not None:
        operands.append(norm_weight)
        in_specs.append(pl.BlockSpec((k,), lambda i: (0,)))
    if residual is not None:
        operands.append(jnp.pad(residual, ((0, MIN_ROWS - m), (0, 0))))
        in_specs.append(pl.BlockSpec((MIN_ROWS, block_n), lambda i: (0, i)))
    has_norm, has_residual = norm_weight is not None, residual is not None
    chunks = k // block_k

    def kernel(*refs: Any) -> None:
        x_ref, w_ref, *rest = refs
        nw_ref = rest.pop(0) if has_norm else None
        r_ref = rest.pop(0) if has_residual else None
        (o_ref,) = rest
        if has_norm:
            def sum_squares(i: jax.Array, ss: jax.Array) -> jax.Array:
                xk = x_ref[:, pl.ds(pl.multiple_of(i * block_k, block_k), block_k)].astype(jnp.float32)
                return ss + jnp.sum(xk * xk, axis=1)

            ss = lax.fori_loop(0, chunks, sum_squares, jnp.zeros((MIN_ROWS,), jnp.float32))
            inv_rms = lax.rsqrt(ss / k + eps)

        def step(i: jax.Array, accs: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
            ks = pl.ds(pl.multiple_of(i * block_k, block_k), block_k)
            xk = x_ref[:, ks]
            if has_norm:
                xk = (xk.astype(jnp.float32) * inv_rms[:, None]).astype(x_ref.dtype) \
                    * nw_ref[ks].astype(x_ref.dtype)[None, :]
            if pair:
                return (accs[0] + tl_dot(xk, w_ref[0, :, ks], trans_b=True),
                        accs[1] + tl_dot(xk, w_ref[1, :, ks], trans_b=True))
            return (accs[0] + tl_dot(xk, w_ref[:, ks], trans_b=True),)

        zero = jnp.zeros((MIN_ROWS, block_n), jnp.float32)
        accs = lax.fori_loop(0, chunks, step, (zero, zero) if pair else (zero,))
        if pair:  # the model's order: each GEMM's result in the activation dtype, then silu(gate) * up
            gate, up = (a.astype(o_ref.dtype).astype(jnp.float32) for a in accs)
            y = (gate * jax.nn.sigmoid(gate)).astype(o_ref.dtype).astype(jnp.float32) * up
        else:
            y = accs[0]
        if has_residual:
            y = y.astype(o_ref.dtype).astype(jnp.float32) + r_ref[...].astype(jnp.float32)
        o_ref[...] = y.astype(o_ref.dtype)

    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((MIN_ROWS, n), x.dtype),
        grid=(n // block_n,),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((MIN_ROWS, block_n), lambda i: (0, i)),
        interpret=interpret,
        **({} if interpret else gpu_lowering("triton", num_warps=num_warps, num_stages=num_stages)),
    )(*operands)
    return out[:m]
