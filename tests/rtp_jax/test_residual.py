"""The residual stream with its adds and RMSNorms fused (models/residual.py): same forward as XLA's ops."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rtp_jax.models.residual as residual
from kernels_pallas import ragged_paged_attention_reference
from kernels_pallas.add_rms_norm import add_rms_norm
from rtp_jax.config import ModelConfig
from rtp_jax.models import get_model_class
from rtp_jax.models.attention import AttentionMetadata, _from_contract, _mosaic_decode
from rtp_jax.models.residual import Pending, add_norm_hidden, add_norm_of, residual_splits, resolve

SEQS, BLOCKS, BLOCK = 3, 12, 4
# float32 GEMMs run as TF32 on a GPU, where a batched split-K GEMM and XLA's plain one round differently.
TOL = 2e-3 if jax.default_backend() == "gpu" else 1e-4


def _decode_step(cfg: ModelConfig) -> tuple[nnx.Module, tuple]:
    """A decode step of 3 sequences (one new token each) through a float32 model with random weights."""
    model = get_model_class(cfg.architecture)(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    kv = [tuple(jnp.asarray(rng.standard_normal((BLOCKS, BLOCK, cfg.num_kv_heads, cfg.head_dim)), jnp.float32)
                for _ in range(2)) for _ in range(cfg.num_layers)]
    kv_lens = jnp.asarray([5, 9, 2], jnp.int32)
    tables = jnp.asarray(rng.permutation(BLOCKS)[:SEQS * 3].reshape(SEQS, 3), jnp.int32)
    positions = kv_lens - 1
    slots = tables[jnp.arange(SEQS), positions // BLOCK] * BLOCK + positions % BLOCK
    md = AttentionMetadata(slots, kv_lens, tables, jnp.arange(SEQS + 1, dtype=jnp.int32), jnp.int32(SEQS))
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, SEQS), jnp.int32)
    return model, (ids, positions, kv, md)


def _llama(layers: int = 2) -> ModelConfig:
    return ModelConfig.from_hf_config(dict(
        architectures=["LlamaForCausalLM"], hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=64, rms_norm_eps=1e-5, rope_theta=1e4,
        max_position_embeddings=64, model_type="llama"))


def _offering(calls: list[tuple[int, ...]], declines: bool = False) -> Any:
    """The reference attention carrying an `add_norm` that records the delta shapes it is handed and runs
    the kernel (interpreted), or declines."""
    fn = _from_contract(ragged_paged_attention_reference)

    def add_norm(delta, res, weight, eps):
        calls.append(tuple(delta.shape))
        return None if declines else add_rms_norm(delta, res, weight, eps, interpret=True)

    fn.add_norm = add_norm
    return fn


@pytest.mark.parametrize("splits,declines", [(1, False), (4, False), (8, False), (4, True)])
def test_fused_adds_and_norms_give_the_same_forward(splits: int, declines: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode step through a model whose attention function offers `add_norm` adds and normalizes every
    residual sum but the embeddings with it (two per layer, the first layer's input excepted, and the final
    norm), handed o_proj's and down_proj's split-K
    partials when `DECODE_RESIDUAL_SPLITS` is set, and gives the hidden states and caches of XLA's adds and
    norms. Where it declines, the layers sum the partials themselves, with the same result."""
    monkeypatch.setattr(residual, "DECODE_RESIDUAL_SPLITS", splits)
    cfg = _llama()
    model, (ids, positions, kv, md) = _decode_step(cfg)
    plain = _from_contract(ragged_paged_attention_reference)
    calls: list[tuple[int, ...]] = []
    want, want_kv = model(ids, positions, [tuple(jnp.array(c) for c in p) for p in kv], md, plain)
    got, got_kv = model(ids, positions, [tuple(jnp.array(c) for c in p) for p in kv], md,
                        _offering(calls, declines))
    split = (splits,) if splits > 1 else ()  # 1: add_norm with the GEMMs' own outputs
    # recorded while tracing: layer 0's post-attention sum, layer 1's two (its input is Pending, so it is
    # traced apart from layer 0), the final norm's
    assert calls == [split + (SEQS, 128)] * 4, calls
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=TOL, atol=TOL)
    for g, w in zip(got_kv, want_kv, strict=True):
        np.testing.assert_allclose(np.asarray(g[0]), np.asarray(w[0]), rtol=TOL, atol=TOL)


def test_first_layer_input_is_normalized_plainly() -> None:
    """The embeddings enter the first layer as a plain array: its input norm is `rms_norm`, no add."""
    x = jnp.arange(256, dtype=jnp.float32).reshape(2, 128)
    calls: list[tuple[int, ...]] = []
    out, h = add_norm_hidden(x, jnp.ones(128), 1e-5, _offering(calls).add_norm)
    assert calls == [] and out is x
    from rtp_jax.models.attention import rms_norm

    np.testing.assert_array_equal(np.asarray(h), np.asarray(rms_norm(x, jnp.ones(128), 1e-5)))


def test_moe_layers_hand_their_plain_output_to_add_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sparse-MoE layer has no split-K partials of its own: its output goes to `add_norm` as it is, and
    the forward equals XLA's adds and norms."""
    monkeypatch.setattr(residual, "DECODE_RESIDUAL_SPLITS", 4)
    cfg = ModelConfig("Qwen3MoeForCausalLM", vocab_size=32, hidden_size=128, intermediate_size=0,
                      num_layers=1, num_heads=2, num_kv_heads=1, head_dim=64, qk_norm=True, num_experts=3,
                      num_experts_per_tok=2, moe_intermediate_size=32)
    model, (ids, positions, kv, md) = _decode_step(cfg)
    calls: list[tuple[int, ...]] = []
    want, _ = model(ids, positions, [tuple(jnp.array(c) for c in p) for p in kv], md,
                    _from_contract(ragged_paged_attention_reference))
    got, _ = model(ids, positions, [tuple(jnp.array(c) for c in p) for p in kv], md, _offering(calls))
    assert calls == [(4, SEQS, 128), (SEQS, 128)], calls  # o_proj's partials, then the MoE's output
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=TOL, atol=TOL)


def test_partials_only_in_decode_steps_with_add_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    """`residual_splits`: the configured count in a decode step (one row per sequence slot) with an
    `add_norm` whose GEMM width it divides; 0 in prefill or mixed steps, without `add_norm`, or when off."""
    md = AttentionMetadata(*(jnp.zeros(n, jnp.int32) for n in (3, 3, 3, 4)), jnp.int32(3))
    fn = _offering([]).add_norm
    monkeypatch.setattr(residual, "DECODE_RESIDUAL_SPLITS", 4)
    assert residual_splits(fn, 3, md, 128) == 4
    assert residual_splits(fn, 8, md, 128) == 0
    assert residual_splits(fn, 3, md, 126) == 0
    assert residual_splits(None, 3, md, 128) == 0
    big = AttentionMetadata(*(jnp.zeros(n, jnp.int32) for n in (17, 17, 17, 18)), jnp.int32(17))
    assert residual_splits(fn, 17, big, 128) == 0  # past PARTIALS_MAX_ROWS: XLA's GEMM
    monkeypatch.setattr(residual, "DECODE_RESIDUAL_SPLITS", 0)
    assert residual_splits(fn, 3, md, 128) == 0


def test_resolve_sums_partials_as_the_gemm_output() -> None:
    """`resolve(Pending(r, partials))` = r + (sum of partials rounded to r's dtype); plain arrays pass."""
    r = jnp.asarray([[1.0, 2.0]], jnp.bfloat16)
    parts = jnp.asarray([[[0.5, 0.25]], [[0.25, 0.125]]], jnp.float32)
    np.testing.assert_array_equal(np.asarray(resolve(Pending(r, parts)), np.float32), [[1.75, 2.375]])
    assert resolve(r) is r


def test_mosaic_decode_offers_add_norm_and_the_others_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Mosaic decode function (single device) carries the Pallas add + norm, used when
    `DECODE_RESIDUAL_SPLITS` is set (off by default: measured no faster); the reference carries none."""
    from rtp_jax.models.attention import select_attention_backend

    mosaic = _mosaic_decode(_from_contract(ragged_paged_attention_reference))
    assert add_norm_of(mosaic) is None
    monkeypatch.setattr(residual, "DECODE_RESIDUAL_SPLITS", 4)
    assert add_norm_of(mosaic) is residual.pallas_add_norm
    assert add_norm_of(select_attention_backend("reference").decode) is None
