"""Residual add and RMSNorm in one kernel, summing a GEMM's split-K partials on the way (Pallas, Triton).

At batch 1 a decoder layer spends two small kernels after o_proj and two after down_proj: XLA's split-K
reduction with the residual add fused into it, then the RMSNorm of the sum (1.5-1.7 us each on an H200,
for a few KB of work; bench/notes_bench.md). With the GEMM writing its split-K partial sums instead
(`Linear.partials`), `add_rms_norm` does both in one kernel: program t sums row t's partials, rounds them
as the GEMM's output would be rounded, adds the residual, and normalizes the result (vLLM's
`fused_add_rms_norm`, plus the split-K sum).

    delta:    [T, D] (a layer's output), or float32 [S, T, D]: S split-K partial sums of it
    residual: [T, D]
    weight:   [D], the norm's scale
    returns   (x = residual + delta in residual's dtype, rms_norm(x) * weight in residual's dtype)

`add_rms_norm_reference` is the same contract in plain JAX (the engine's own ops), the test oracle.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas._lowering import gpu_lowering


def add_rms_norm_reference(delta: jax.Array, residual: jax.Array, weight: jax.Array,
                           eps: float) -> tuple[jax.Array, jax.Array]:
    """The contract in plain JAX: partials summed in float32 and rounded to residual's dtype (the unsplit
    GEMM's output), the residual add, and the engine's `rms_norm`."""
    from rtp_jax.models.attention import rms_norm  # the model's own ops: the kernel must match them
    from rtp_jax.models.residual import Pending, resolve

    x = resolve(Pending(residual, delta))
    return x, rms_norm(x, weight, eps)


def supports(delta: jax.Array, residual: jax.Array) -> bool:
    """Whether the kernel serves these shapes: a row width that is a power of two from 128 to 16384 (one
    Triton block per row), partials in float32 with a count of at most 16."""
    if residual.ndim != 2:
        return False
    d = residual.shape[1]
    if delta.ndim == 3 and (delta.dtype != jnp.float32 or not 1 <= delta.shape[0] <= 16):
        return False
    return (delta.ndim in (2, 3) and tuple(delta.shape[-2:]) == tuple(residual.shape)
            and 128 <= d <= 16384 and d & (d - 1) == 0)


def add_rms_norm(delta: jax.Array, residual: jax.Array, weight: jax.Array, eps: float, *,
                 interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """`add_rms_norm_reference` as one kernel (see the module docstring)."""
    if not supports(delta, residual):
        raise ValueError(f"delta {delta.shape} {delta.dtype} and residual {residual.shape}: need "
                         "delta [T, D] or float32 [S, T, D] partials (S <= 16) over a residual [T, D], D a "
                         "power of two from 128 to 16384; use add_rms_norm_reference")
    if weight.shape != residual.shape[1:]:
        raise ValueError(f"weight must be [D] = [{residual.shape[1]}], got {weight.shape}")
    return _add_rms_norm(delta, residual, weight, eps=float(eps), interpret=interpret)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def _add_rms_norm(delta: jax.Array, residual: jax.Array, weight: jax.Array, *, eps: float,
                  interpret: bool) -> tuple[jax.Array, jax.Array]:
    t, d = residual.shape
    partials = delta.ndim == 3
    dtype = residual.dtype

    def kernel(delta_ref: Any, res_ref: Any, w_ref: Any, x_ref: Any, h_ref: Any) -> None:
        if partials:  # one partial at a time: S rows of D float32 at once would spill registers
            y = delta_ref[0, 0, :]
            for s in range(1, delta.shape[0]):
                y = y + delta_ref[s, 0, :]
        else:
            y = delta_ref[0, :].astype(jnp.float32)
        x = (res_ref[0, :].astype(jnp.float32) + y.astype(dtype).astype(jnp.float32)).astype(dtype)
        x_ref[0, :] = x
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf) + eps)
        h_ref[0, :] = w_ref[...].astype(dtype) * normed.astype(dtype)

    delta_spec = (pl.BlockSpec((delta.shape[0], 1, d), lambda i: (0, i, 0)) if partials
                  else pl.BlockSpec((1, d), lambda i: (i, 0)))
    row = pl.BlockSpec((1, d), lambda i: (i, 0))
    return pl.pallas_call(
        kernel,
        grid=(t,),
        in_specs=[delta_spec, row, pl.BlockSpec((d,), lambda i: (0,))],
        out_specs=[row, row],
        out_shape=[jax.ShapeDtypeStruct((t, d), dtype)] * 2,
        interpret=interpret,
        name="add_rms_norm",
        **({} if interpret else gpu_lowering("triton", num_warps=min(16, max(4, d // 256)), num_stages=1)),
    )(delta, residual, weight)
