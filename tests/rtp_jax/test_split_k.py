"""Split-K projections of decode batches (`Linear.split_k`): the products of one GEMM, where meant."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rtp_jax.config import ModelConfig
from rtp_jax.models.llama import (
    SPLIT_K_MAX_ROWS,
    Linear,
    LlamaForCausalLM,
    ShapeOnlyRngs,
    split_k_factor,
    split_k_matmul,
)


@pytest.mark.parametrize("s", [2, 4, 8])
def test_split_k_matmul_is_the_product(s: int) -> None:
    """Summing the s partial products over K's slices gives x @ w.T (f32: to rounding)."""
    rng = np.random.default_rng(s)
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((40, 64)), jnp.float32)
    np.testing.assert_allclose(np.asarray(split_k_matmul(x, w, s)), np.asarray(x @ w.T), rtol=1e-5, atol=1e-4)


def test_split_k_factor() -> None:
    """8 slices above 8192 inputs, 4 from 2048, none below or when K does not divide."""
    assert split_k_factor(14336) == 8 and split_k_factor(4096) == 4 and split_k_factor(2048) == 4
    assert split_k_factor(1536) == 1 and split_k_factor(576) == 1 and split_k_factor(8194) == 1


@pytest.mark.parametrize("rows", [1, SPLIT_K_MAX_ROWS, SPLIT_K_MAX_ROWS + 1, 16])
def test_linear_split_k_matches_einsum(rows: int) -> None:
    """A Linear with split_k gives the einsum's result for every batch size (split up to
    SPLIT_K_MAX_ROWS rows, one GEMM above), with its bias, in the activation dtype."""
    lin = Linear(256, 48, bias=True, dtype=jnp.float32, rngs=nnx.Rngs(0))
    lin.bias[...] = jnp.arange(48, dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(1), (rows, 256), jnp.float32)
    want = lin(x)
    lin.split_k = 4
    got = lin(x)
    assert got.shape == (rows, 48) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_use_split_k_sets_row_parallel_projections_only() -> None:
    """use_split_k sets o_proj (K = heads * head_dim) and down_proj (K = intermediate) by their K and
    leaves the other projections alone."""
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=2048,
                      intermediate_size=16384, num_layers=1, num_heads=16,
                      num_kv_heads=4, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position_embeddings=128, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg, dtype=jnp.bfloat16, rngs=ShapeOnlyRngs())
    model.use_split_k()
    layer = model.model.layers[0]
    assert layer.self_attn.o_proj.split_k == 4 and layer.mlp.down_proj.split_k == 8
    assert not hasattr(layer.self_attn.qkv_proj, "split_k") and not hasattr(layer.mlp.gate_up_proj, "split_k")
