"""add_rms_norm (Pallas: compiled on a GPU, interpreted on the CPU) against its plain-JAX contract and the
engine's own ops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.add_rms_norm import add_rms_norm, add_rms_norm_reference, supports
from rtp_jax.models.attention import rms_norm

INTERPRET = jax.default_backend() != "gpu"


def _case(splits: int, dtype: jnp.dtype, t: int = 5, d: int = 256, seed: int = 0):
    rng = np.random.default_rng(seed)
    delta_shape, delta_dtype = ((splits, t, d), jnp.float32) if splits else ((t, d), dtype)
    delta = jnp.asarray(rng.standard_normal(delta_shape), delta_dtype)
    residual = jnp.asarray(rng.standard_normal((t, d)) * 3, dtype)
    weight = jnp.asarray(1 + 0.1 * rng.standard_normal(d), dtype)
    return delta, residual, weight


def _ulps(got: jax.Array, want: jax.Array) -> float:
    """Largest difference in units of want's bf16 spacing (2^-7 relative)."""
    g, w = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(g - w) / np.maximum(np.abs(w) * 2.0**-7, 1e-30)))


@pytest.mark.parametrize("splits", [0, 1, 2, 4, 8, 16])
def test_matches_reference_float32(splits: int) -> None:
    """x = residual + delta (partials summed) and rms_norm(x) * weight, as the plain-JAX contract to
    float32 rounding (the kernel sums the partials in its own order)."""
    args = _case(splits, jnp.float32)
    want = add_rms_norm_reference(*args, 1e-5)
    got = add_rms_norm(*args, 1e-5, interpret=INTERPRET)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [0, 4, 8])
def test_bf16_within_one_rounding(splits: int) -> None:
    """In bf16 the sum is rounded to the residual's dtype as the unsplit GEMM's output is, then added and
    normalized: each output is the reference's value or a neighbour (one rounding of a different partial
    order). A plain delta has no reordering: bit for bit."""
    args = _case(splits, jnp.bfloat16, d=4096)
    want = add_rms_norm_reference(*args, 1e-6)
    got = add_rms_norm(*args, 1e-6, interpret=INTERPRET)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == jnp.bfloat16
        if splits == 0 and INTERPRET:
            np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
        assert _ulps(g, w) <= 2.0 + 1e-6


def test_reference_is_the_engines_add_and_norm() -> None:
    """The contract is what a layer does without the kernel: `x + h`, then `rms_norm` (bit for bit)."""
    delta, residual, weight = _case(0, jnp.bfloat16)
    x, h = add_rms_norm_reference(delta, residual, weight, 1e-5)
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(residual + delta, np.float32))
    np.testing.assert_array_equal(np.asarray(h, np.float32),
                                  np.asarray(rms_norm(residual + delta, weight, 1e-5), np.float32))


def test_supports_and_refusals_name_the_argument() -> None:
    """Rows must be a power of two from 128 wide, partials float32 and at most 16; a wrong weight or shape
    is refused with a message naming it."""
    delta, residual, weight = _case(4, jnp.bfloat16)
    assert supports(delta, residual)
    assert not supports(delta.astype(jnp.bfloat16), residual)  # partials in bf16
    assert not supports(jnp.zeros((17, 5, 256), jnp.float32), residual)
    assert not supports(jnp.zeros((5, 576)), jnp.zeros((5, 576)))  # SmolLM2's width: XLA's ops instead
    assert not supports(jnp.zeros((4, 256)), residual)  # rows differ
    with pytest.raises(ValueError, match="delta"):
        add_rms_norm(jnp.zeros((5, 576)), jnp.zeros((5, 576)), jnp.zeros(576), 1e-5, interpret=True)
    with pytest.raises(ValueError, match="weight must be"):
        add_rms_norm(delta, residual, weight[:128], 1e-5, interpret=True)
