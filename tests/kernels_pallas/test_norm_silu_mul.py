"""norm_silu_mul (Pallas: compiled on a GPU, interpreted on the CPU) against its plain-JAX contract and the
MLP it replaces."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.norm_silu_mul import block_columns, norm_silu_mul, norm_silu_mul_reference, supports
from rtp_jax.models.attention import rms_norm

ON_GPU = jax.default_backend() == "gpu"


def _case(tokens: int, inter: int, dim: int, dtype: jnp.dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((tokens, dim)) * 4.0, dtype)
    weight = jnp.asarray(rng.uniform(0.5, 1.5, dim), dtype)
    w_gate_up = jnp.asarray(rng.standard_normal((2, inter, dim)) / np.sqrt(dim), dtype)
    return x, weight, w_gate_up


@pytest.mark.parametrize("tokens,inter,dim", [(3, 96, 128), (4, 4096, 256), (1, 6144, 64)])
def test_matches_reference_and_the_mlp_it_replaces(tokens: int, inter: int, dim: int) -> None:
    """float32: the kernel equals its contract, and the contract on the gate/up GEMM of x * weight equals
    silu(gate) * up of the GEMM of rms_norm(x) * weight (the norm's factor commutes with the GEMM)."""
    x, weight, w = _case(tokens, inter, dim, jnp.float32)
    gate_up = jnp.einsum("td,gid->tgi", x * weight, w)
    want = norm_silu_mul_reference(gate_up, x, 1e-5)
    got = norm_silu_mul(gate_up, x, 1e-5, interpret=not ON_GPU)
    tol = 2e-3 if ON_GPU else 1e-5
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol, atol=tol)
    normed = jnp.einsum("td,gid->tgi", rms_norm(x, weight, 1e-5), w)
    plain = jax.nn.silu(normed[:, 0]) * normed[:, 1]
    np.testing.assert_allclose(np.asarray(want), np.asarray(plain), rtol=tol, atol=tol)


def test_bf16_within_one_rounding_of_reference() -> None:
    """bf16 in and out: each value within one bf16 rounding of the reference."""
    x, weight, w = _case(4, 512, 128, jnp.bfloat16, seed=2)
    gate_up = jnp.einsum("td,gid->tgi", x * weight, w)
    got = norm_silu_mul(gate_up, x, 1e-5, interpret=not ON_GPU)
    assert got.dtype == jnp.bfloat16 and got.shape == (4, 512)
    np.testing.assert_allclose(np.asarray(got, np.float32),
                               np.asarray(norm_silu_mul_reference(gate_up, x, 1e-5), np.float32),
                               rtol=2 ** -7, atol=1e-2)


def test_block_columns_and_refusals() -> None:
    """Column blocks are the largest power of two <= 2048 dividing I (Llama-3-8B's 14336: 2048; SmolLM2's
    1536: 512); shapes the kernel cannot serve are refused by name."""
    assert block_columns(14336) == 2048 and block_columns(1536) == 512 and block_columns(24) == 0
    x = jnp.ones((2, 96))  # width not a power of two
    assert not supports(jnp.ones((2, 2, 64)), x)
    with pytest.raises(ValueError, match="norm_silu_mul_reference"):
        norm_silu_mul(jnp.ones((2, 2, 64)), x, 1e-5, interpret=True)
    with pytest.raises(ValueError, match="gate_up"):
        norm_silu_mul(jnp.ones((3, 2, 64)), jnp.ones((2, 128)), 1e-5, interpret=True)
