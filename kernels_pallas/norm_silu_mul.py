"""SwiGLU's activation with the MLP's input RMSNorm applied on the way (Pallas, Triton lowering).

At batch 1 a decoder layer runs the post-attention RMSNorm as its own kernel before the gate/up GEMM, and
XLA's silu(gate) * up fusion after it (1.5-1.7 us each on an H200 for a few KB of work; notes_bench.md).
The norm's weight is a per-column scale of the GEMM's input, so it fuses into the GEMM's operand
(`x * weight`), and its per-row factor r = rsqrt(mean(x ** 2) + eps) commutes with the GEMM, so it can be
applied to the GEMM's output: `norm_silu_mul` computes silu(r * gate) * (r * up), each program reading its
token's row of x to get r. One kernel where there were two.

    gate_up: [T, 2, I] (`GateUpProj.project` of x * weight: gate first)
    x:       [T, D], the norm's input (the residual stream)
    returns  [T, I] in gate_up's dtype

`norm_silu_mul_reference` is the same contract in plain JAX, the test oracle.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas._lowering import gpu_lowering

MAX_BLOCK = 2048  # columns of I per program


def norm_silu_mul_reference(gate_up: jax.Array, x: jax.Array, eps: float) -> jax.Array:
    """The contract in plain JAX: float32 math, one rounding at the end."""
    from rtp_jax.models.attention import rms_scale

    r = rms_scale(x, eps)[:, None]
    gate = gate_up[:, 0].astype(jnp.float32) * r
    up = gate_up[:, 1].astype(jnp.float32) * r
    return (jax.nn.silu(gate) * up).astype(gate_up.dtype)


def block_columns(intermediate: int) -> int:
    """The largest power of two <= MAX_BLOCK dividing `intermediate` (0 below 16: not served)."""
    block = MAX_BLOCK
    while block >= 16 and intermediate % block:
        block //= 2
    return block if block >= 16 else 0


def supports(gate_up: jax.Array, x: jax.Array) -> bool:
    """Whether the kernel serves these shapes: [T, 2, I] and [T, D], I split into power-of-two blocks of
    at least 16 columns, D a power of two (one Triton load per row)."""
    d = x.shape[-1]
    return (gate_up.ndim == 3 and x.ndim == 2 and gate_up.shape[1] == 2 and gate_up.shape[0] == x.shape[0]
            and block_columns(gate_up.shape[2]) > 0 and d > 0 and d & (d - 1) == 0)


def norm_silu_mul(gate_up: jax.Array, x: jax.Array, eps: float, *, interpret: bool = False) -> jax.Array:
    """`norm_silu_mul_reference` as one kernel (see the module docstring)."""
    if not supports(gate_up, x):
        raise ValueError(f"gate_up {gate_up.shape} and x {x.shape}: need gate_up [T, 2, I] with I a multiple "
                         "of 16 and x [T, D] with D a power of two; use norm_silu_mul_reference")
    return _norm_silu_mul(gate_up, x, eps=float(eps), interpret=interpret)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def _norm_silu_mul(gate_up: jax.Array, x: jax.Array, *, eps: float, interpret: bool) -> jax.Array:
    t, _, inter = gate_up.shape
    d = x.shape[1]
    block = block_columns(inter)

    # One program per (token, column block): each reads its token's x row (8 KB for Llama-3-8B, from L2)
    # beside its gate and up blocks, so the row factor costs no extra round trip.
    def kernel(gu_ref: Any, x_ref: Any, o_ref: Any) -> None:
        row = x_ref[0, :].astype(jnp.float32)
        r = jax.lax.rsqrt(jnp.sum(row * row) / d + eps)
        gate = gu_ref[0, 0, :].astype(jnp.float32) * r
        up = gu_ref[0, 1, :].astype(jnp.float32) * r
        o_ref[0, :] = (gate * jax.nn.sigmoid(gate) * up).astype(o_ref.dtype)

    return pl.pallas_call(
        kernel,
        grid=(t, inter // block),
        in_specs=[pl.BlockSpec((1, 2, block), lambda i, j: (i, 0, j)),
                  pl.BlockSpec((1, d), lambda i, j: (i, 0))],
        out_specs=pl.BlockSpec((1, block), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((t, inter), gate_up.dtype),
        interpret=interpret,
        name="norm_silu_mul",
        **({} if interpret else gpu_lowering("triton", num_warps=4, num_stages=1)),
    )(gate_up, x)
