"""The residual stream between the GEMMs of decoder layers, with its add and RMSNorm fused where offered.

Each layer adds two outputs to the residual stream (o_proj's, then down_proj's), and each sum is normalized
right away (post-attention norm, then the next layer's input norm, or the final norm). At batch 1 XLA runs
the add fused into its split-K reduction and the norm as a second kernel. A decode attention function may
carry an `add_norm` attribute (`AddNorm`, e.g. kernels_pallas/add_rms_norm.py): then the layers leave each
sum `Pending` (the residual and what to add to it: an output, or float32 split-K partials of one, written
by a batched GEMM, `DECODE_RESIDUAL_SPLITS`) and `add_norm_hidden` adds and normalizes in one kernel. Without
it the layers compute exactly what they did before: `x + delta`, then the norm.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from rtp_jax.models.attention import PARTIALS_MAX_ROWS, AttentionMetadata, rms_norm

# Split-K factor of o_proj and down_proj in decode steps of at most `PARTIALS_MAX_ROWS` rows whose attention
# function offers `add_norm`: the GEMM becomes a batched one writing this many float32 partials
# (`Linear.partials`), summed inside the add + norm kernel instead of by a reduction kernel of XLA's. 0: off,
# and `add_norm` is not used at all. Off by default: on an H200 at batch 1 the kernel took 2.1 us alone
# (XLA's RMSNorm 1.7) and 3.1 us with 4 partials, so add_norm alone lost (229.7 vs 231.6 tok/s) and with
# 4 or 8 splits it gained nothing (231.8, 227.7; bench/notes_bench.md, twelfth session). A/B:
# bench/probe_decode_variants.py's `res_split:S`.
DECODE_RESIDUAL_SPLITS = 0


class Pending(NamedTuple):
    """The residual stream `residual + delta`, the add not yet done. residual: [T, D]; delta: [T, D], or
    float32 [S, T, D] split-K partial sums of it."""

    residual: jax.Array
    delta: jax.Array


Hidden = jax.Array | Pending


class AddNorm(Protocol):
    """(delta [T, D] or float32 partials [S, T, D], residual [T, D], norm weight [D], eps) ->
    (residual + delta, rms_norm of it), both in residual's dtype; None where it does not apply (static
    shapes), and the layer then adds and normalizes itself."""

    def __call__(self, delta: jax.Array, residual: jax.Array, weight: jax.Array,
                 eps: float) -> tuple[jax.Array, jax.Array] | None: ...


def add_norm_of(attn_fn: Any) -> AddNorm | None:
    """The fused add + RMSNorm that goes with `attn_fn`, if its backend offers one and
    `DECODE_RESIDUAL_SPLITS` turns it on."""
    return getattr(attn_fn, "add_norm", None) if DECODE_RESIDUAL_SPLITS else None


def residual_splits(add_norm: AddNorm | None, num_tokens: int, md: AttentionMetadata, in_dim: int) -> int:
    """How many split-K partials a GEMM of input width `in_dim` writes for `add_norm`:
    `DECODE_RESIDUAL_SPLITS` in a decode step (one row per sequence slot) of at most `PARTIALS_MAX_ROWS`
    rows when they divide `in_dim`; else 0 (the GEMM's own output)."""
    splits = DECODE_RESIDUAL_SPLITS
    if (add_norm is None or splits < 2 or in_dim % splits or num_tokens != md.kv_lens.shape[0]
            or num_tokens > PARTIALS_MAX_ROWS):
        return 0
    return splits


def split_k_partials(x: jax.Array, w: jax.Array, splits: int) -> jax.Array:
    """x: [T, K], w: [..., K] (a weight in its stored layout, contraction last) -> float32 [S, T, ...]:
    x @ w.T as S split-K partial sums, one batched GEMM over S slices of K, for a consumer that sums them
    itself (`sum_partials`, or a kernel on the way)."""
    t, k = x.shape
    return jnp.einsum("tsk,...sk->st...", x.reshape(t, splits, k // splits),
                      w.reshape(*w.shape[:-1], splits, k // splits), preferred_element_type=jnp.float32)


def sum_partials(partials: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """float32 [S, ...] split-K partials -> [...] in `dtype`, summed and rounded as the unsplit GEMM's
    output would be."""
    return partials.astype(jnp.float32).sum(0).astype(dtype)


def resolve(x: Hidden) -> jax.Array:
    """The residual stream as one array: `residual + delta` (partials summed as the GEMM's output)."""
    if not isinstance(x, Pending):
        return x
    dtype = x.residual.dtype
    delta = sum_partials(x.delta, dtype) if x.delta.ndim == 3 else x.delta.astype(dtype)
    return x.residual + delta


def add_norm_hidden(x: Hidden, weight: jax.Array, eps: float,
                    add_norm: AddNorm | None) -> tuple[jax.Array, jax.Array]:
    """(the residual stream x as one array, rms_norm(x) * weight): by `add_norm` in one kernel when x is
    `Pending` and it applies, else XLA's add and `rms_norm`."""
    if isinstance(x, Pending) and add_norm is not None:
        done = add_norm(x.delta, x.residual, weight, eps)
        if done is not None:
            return done
    x = resolve(x)
    return x, rms_norm(x, weight, eps)


def pallas_add_norm(delta: jax.Array, residual: jax.Array, weight: jax.Array,
                    eps: float) -> tuple[jax.Array, jax.Array] | None:
    """`AddNorm` by kernels_pallas/add_rms_norm.py where the shapes allow; None elsewhere."""
    from kernels_pallas.add_rms_norm import add_rms_norm, supports

    if not supports(delta, residual):
        return None
    return add_rms_norm(delta, residual, weight, eps)
