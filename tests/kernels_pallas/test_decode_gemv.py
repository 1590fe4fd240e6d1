"""The fused decode GEMV (kernels_pallas/decode_gemv.py) against its pure-JAX reference, in the Pallas
interpreter on the CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.decode_gemv import norm_gemv, norm_gemv_reference


def _arrays(m: int, n: int, k: int, pair: bool, seed: int = 0) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(seed), 4)
    w_shape = (2, n, k) if pair else (n, k)
    return {
        "x": (3 * jax.random.normal(keys[0], (m, k))).astype(jnp.bfloat16),  # rms 3: the norm shows
        "w": (0.05 * jax.random.normal(keys[1], w_shape, jnp.float32)).astype(jnp.bfloat16),
        "norm_weight": (1 + 0.1 * jax.random.normal(keys[2], (k,), jnp.float32)).astype(jnp.bfloat16),
        "residual": jax.random.normal(keys[3], (m, n), jnp.float32).astype(jnp.bfloat16),
    }


@pytest.mark.parametrize("m, pair, use_norm, use_residual", [
    (1, False, True, False),   # RMSNorm -> q/k/v
    (4, False, False, True),   # o_proj / down_proj + residual
    (3, True, True, False),    # RMSNorm -> gate/up -> silu * up
    (16, True, False, True),   # every row of the tensor-core tile used
])
def test_fused_gemv_matches_reference(m, pair, use_norm, use_residual):
    """Each prologue/epilogue combination gives the reference's values to bf16 rounding (the kernel sums
    in a different order), for batches from 1 to 16 rows."""
    a = _arrays(m, n=64, k=256, pair=pair)
    kw = dict(norm_weight=a["norm_weight"] if use_norm else None,
              residual=a["residual"] if use_residual else None, eps=1e-5)
    got = norm_gemv(a["x"], a["w"], block_n=32, block_k=128, interpret=True, **kw)
    want = norm_gemv_reference(a["x"], a["w"], **kw)
    assert got.shape == want.shape == (m, 64) and got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("change, message", [
    (dict(w_shape=(64, 200)), "w must be"),
    (dict(block_n=48), "multiples"),
    (dict(m=17), "at most 16"),
    (dict(residual_shape=(3, 64)), "residual must be"),
])
def test_bad_shapes_are_refused_with_the_argument_named(change, message):
    m = change.get("m", 2)
    x = jnp.zeros((m, 256), jnp.bfloat16)
    w = jnp.zeros(change.get("w_shape", (64, 256)), jnp.bfloat16)
    residual = jnp.zeros(change["residual_shape"], jnp.bfloat16) if "residual_shape" in change else None
    with pytest.raises(ValueError, match=message):
        norm_gemv(x, w, residual=residual, block_n=change.get("block_n", 32), block_k=128, interpret=True)


def test_reference_prologue_is_the_models_rms_norm():
    """The reference's RMSNorm is the model's (`rtp_jax.models.attention.rms_norm`), bit for bit, so the
    kernel is checked against what the model computes."""
    from rtp_jax.models.attention import rms_norm

    a = _arrays(4, n=64, k=256, pair=False)
    eye = jnp.eye(256, dtype=jnp.bfloat16)  # w = I: the GEMV returns its (normalised) input
    got = norm_gemv_reference(a["x"], eye, norm_weight=a["norm_weight"], eps=1e-5)
    want = rms_norm(a["x"], a["norm_weight"], 1e-5)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
