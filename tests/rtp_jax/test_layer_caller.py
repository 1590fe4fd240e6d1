"""`layer_caller`: the decoder layers of one structure are traced once per program, with the same result
as calling them one by one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rtp_jax.config import ModelConfig
from rtp_jax.models import get_model_class
from rtp_jax.models.attention import AttentionMetadata, select_attention_backend
from rtp_jax.models.llama import DecoderLayer
from rtp_jax.models.rope import rope_tables

NUM_LAYERS, T, BLOCKS, BLOCK = 3, 8, 16, 4


def _model_and_inputs() -> tuple[nnx.Module, tuple]:
    hf = dict(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
              num_hidden_layers=NUM_LAYERS, num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
              rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=64, model_type="llama")
    cfg = ModelConfig.from_hf_config(hf)
    model = get_model_class("LlamaForCausalLM")(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    kv = [(jnp.asarray(rng.normal(size=(BLOCKS, BLOCK, 2, 16)), jnp.float32),
           jnp.asarray(rng.normal(size=(BLOCKS, BLOCK, 2, 16)), jnp.float32)) for _ in range(NUM_LAYERS)]
    # Two sequences of 4 new tokens each, after 4 cached ones (blocks 0-1 and 2-3).
    md = AttentionMetadata(slot_mapping=jnp.array([4, 5, 6, 7, 12, 13, 14, 15], jnp.int32),
                           kv_lens=jnp.array([8, 8], jnp.int32),
                           block_tables=jnp.array([[0, 1, 0, 0], [2, 3, 0, 0]], jnp.int32),
                           query_start_loc=jnp.array([0, 4, 8], jnp.int32), num_seqs=jnp.int32(2))
    ids = jnp.asarray(rng.integers(0, 100, T), jnp.int32)
    positions = jnp.array([4, 5, 6, 7, 4, 5, 6, 7], jnp.int32)
    return model, (ids, positions, kv, md)


def test_layers_traced_once_per_program(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tracing the whole forward runs a layer's Python body once, not once per layer."""
    model, (ids, positions, kv, md) = _model_and_inputs()
    attn = select_attention_backend("reference").mixed
    calls = []
    original = DecoderLayer.__call__

    def counting(self: DecoderLayer, *args: object) -> object:
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(DecoderLayer, "__call__", counting)
    graphdef, state = nnx.split(model)
    jax.jit(lambda st: nnx.merge(graphdef, st)(ids, positions, kv, md, attn)).trace(state)
    assert len(calls) == 1, f"{len(calls)} layer traces for {NUM_LAYERS} layers"


def test_same_result_as_calling_layers_directly() -> None:
    """Hidden states and every layer's updated caches equal those of the plain per-layer loop."""
    model, (ids, positions, kv, md) = _model_and_inputs()
    attn = select_attention_backend("reference").mixed
    hidden, caches = jax.jit(lambda: model(ids, positions, kv, md, attn))()

    x = model.model.embed_tokens(ids)
    inv_freq = jnp.asarray(rope_tables(model.config))
    direct = []
    for layer, cache in zip(model.model.layers, kv, strict=True):
        x, cache = layer(x, positions, inv_freq, cache, md, attn)
        direct.append(cache)
    np.testing.assert_allclose(hidden, model.model.norm(x), rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(caches), jax.tree.leaves(direct), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
