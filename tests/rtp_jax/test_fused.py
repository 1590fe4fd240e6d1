"""Checkpoint tensors the model fuses (models/fused.py): a dense MLP's gate_proj and up_proj become one
[2, I, D] parameter, an attention layer's q/k/v_proj one [kv_heads, group + 2, head_dim, D] parameter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rtp_jax.config import ParallelConfig
from rtp_jax.loader import iter_weights, load_model_config
from rtp_jax.loader.fast import load_model_state
from rtp_jax.loader.safetensors_io import iter_safetensors
from rtp_jax.loader.transfer import _fuse_fn
from rtp_jax.models.fused import fuse_parts, fuse_stream, fused_name
from rtp_jax.models.params import flat_param_shapes, load_state
from sharding.rules import logical_axes, param_spec


def test_names_map_both_ways():
    """Only a dense layer's gate/up map to the fused parameter (gate at 0, up at 1); experts do not."""
    assert fused_name("model.layers.3.mlp.gate_proj.weight") == ("model.layers.3.mlp.gate_up_proj.weight", 0)
    assert fused_name("model.layers.3.mlp.up_proj.weight") == ("model.layers.3.mlp.gate_up_proj.weight", 1)
    assert fused_name("model.layers.3.mlp.down_proj.weight") is None
    assert fused_name("model.layers.3.mlp.experts.0.gate_proj.weight") is None
    qkv = "model.layers.3.self_attn.qkv_proj."
    assert fused_name("model.layers.3.self_attn.k_proj.weight") == (qkv + "weight", 1)
    assert fused_name("model.layers.3.self_attn.v_proj.bias") == (qkv + "bias", 2)
    assert fused_name("model.layers.3.self_attn.o_proj.weight") is None


def test_fuse_stream_pairs_halves_in_any_order_and_passes_the_rest():
    """Halves arriving apart and in either order are stacked gate-first when the pair is complete;
    other tensors pass through in their place."""
    g0, u0, g1, u1 = (np.full((2, 3), i, np.float32) for i in range(4))
    name = "model.layers.{}.mlp.{}_proj.weight"
    stream = [(name.format(0, "up"), u0), ("a", 1), (name.format(1, "gate"), g1),
              (name.format(0, "gate"), g0), (name.format(1, "up"), u1)]
    out = list(fuse_stream(stream, lambda name, parts: fuse_parts(name, parts, head_dim=1)))
    assert [n for n, _ in out] == ["a", "model.layers.0.mlp.gate_up_proj.weight",
                                   "model.layers.1.mlp.gate_up_proj.weight"]
    np.testing.assert_array_equal(out[1][1], np.stack([g0, u0]))
    np.testing.assert_array_equal(out[2][1], np.stack([g1, u1]))


def test_qkv_groups_each_kv_head_with_its_query_heads():
    """q head h lands at [h // group, h % group], k head j at [j, group], v head j at [j, group + 1]
    (HF's GQA pairing: query head h reads KV head h // group); biases likewise."""
    kv_heads, group, hd, d = 2, 3, 4, 5
    q = np.arange(kv_heads * group * hd * d, dtype=np.float32).reshape(kv_heads * group * hd, d)
    k, v = -1 - np.arange(2 * kv_heads * hd * d, dtype=np.float32).reshape(2, kv_heads * hd, d)
    w = fuse_parts("model.layers.0.self_attn.qkv_proj.weight", [q, k, v], hd)
    assert w.shape == (kv_heads, group + 2, hd, d)
    for h in range(kv_heads * group):
        np.testing.assert_array_equal(w[h // group, h % group], q[h * hd:(h + 1) * hd])
    for j in range(kv_heads):
        np.testing.assert_array_equal(w[j, group], k[j * hd:(j + 1) * hd])
        np.testing.assert_array_equal(w[j, group + 1], v[j * hd:(j + 1) * hd])
    b = fuse_parts("model.layers.0.self_attn.qkv_proj.bias", [q[:, 0], k[:, 0], v[:, 0]], hd)
    np.testing.assert_array_equal(b, w[..., 0])


def test_fused_qkv_projects_like_the_three_checkpoint_matrices():
    """The model's QKVProj on the fused weight gives exactly x @ q.T, x @ k.T, x @ v.T per head."""
    from rtp_jax.config import ModelConfig
    from rtp_jax.models.llama import QKVProj

    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=32, hidden_size=8, intermediate_size=16,
                      num_layers=1, num_heads=6, num_kv_heads=2, head_dim=4, attention_bias=True)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((n * 4, 8)).astype(np.float32) for n in (6, 2, 2))
    qb, kb, vb = (rng.standard_normal(n * 4).astype(np.float32) for n in (6, 2, 2))
    from flax import nnx

    proj = QKVProj(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    proj.weight[...] = jnp.asarray(fuse_parts("x.qkv_proj.weight", [q, k, v], 4))
    proj.bias[...] = jnp.asarray(fuse_parts("x.qkv_proj.bias", [qb, kb, vb], 4))
    x = rng.standard_normal((3, 8)).astype(np.float32)
    got = proj(jnp.asarray(x))
    for out, w, b, heads in zip(got, (q, k, v), (qb, kb, vb), (6, 2, 2), strict=True):
        np.testing.assert_allclose(np.asarray(out), (x @ w.T + b).reshape(3, heads, 4), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stream, message", [
    ([("model.layers.0.mlp.gate_proj.weight", np.zeros((2, 3)))], "not all of the tensors"),
    ([("model.layers.0.self_attn.q_proj.weight", np.zeros((8, 3))),
      ("model.layers.0.self_attn.v_proj.weight", np.zeros((4, 3)))], "not all of the tensors"),
    ([("model.layers.0.mlp.gate_proj.weight", np.zeros((2, 3))),
      ("model.layers.0.mlp.up_proj.weight", np.zeros((3, 3)))], "differ in shape"),
    ([("model.layers.0.self_attn.q_proj.weight", np.zeros((8, 3))),
      ("model.layers.0.self_attn.k_proj.weight", np.zeros((4, 3))),
      ("model.layers.0.self_attn.v_proj.weight", np.zeros((2, 3)))], "do not fit head_dim 2"),
    ([("model.layers.0.mlp.up_proj.weight", np.zeros((2, 3)))] * 2, "appears twice"),
])
def test_fuse_stream_refuses_incomplete_or_mismatched_parts(stream, message):
    with pytest.raises(ValueError, match=message):
        list(fuse_stream(stream, lambda name, parts: fuse_parts(name, parts, head_dim=2)))


def test_loaders_fuse_and_keep_the_fused_parameters_sharded(tiny_hf_model):
    """Both loading paths give gate_up_proj == stack(gate, up) and qkv_proj == fuse_parts(q, k, v) of the
    checkpoint; the fast loader places them as the rules say: gate/up split on I, q/k/v by KV head
    (each device holds its KV head with its query heads), combined on the devices by one compiled program
    per kind."""
    path = tiny_hf_model("llama", sharded=True, dtype="float32")
    cfg = load_model_config(path)
    ref = dict(iter_safetensors(path))
    _, host_state = load_state(cfg, jnp.float32, iter_weights(path, cfg))
    devices = jax.devices()[:2]
    if len(devices) < 2:
        pytest.skip("needs 2 devices")
    mesh = Mesh(np.array(devices), ("tp",))
    # only the MLP and the attention projections split (tp 2 divides the 2 KV heads)
    axes = dict.fromkeys(logical_axes(cfg, ParallelConfig()), None) | {"mlp": "tp", "qkv_groups": "tp"}

    def sharding_for(name: str, shape: tuple[int, ...]) -> NamedSharding:
        return NamedSharding(mesh, param_spec(name, len(shape), axes))

    _fuse_fn.cache_clear()
    _, dev_state = load_model_state(path, cfg, jnp.float32, sharding_for=sharding_for)
    # One combining program per fusion kind, shared by every layer (not one per layer's name).
    assert cfg.num_layers > 1 and _fuse_fn.cache_info().misses == 2
    for state in (host_state, dev_state):
        flat = flat_param_shapes(state)
        assert not any(f".{x}_proj." in n for n in flat for x in ("gate", "up", "q", "k", "v"))
        for layer in range(cfg.num_layers):
            p = f"model.layers.{layer}.mlp."
            want = np.stack([ref[p + "gate_proj.weight"], ref[p + "up_proj.weight"]])
            np.testing.assert_array_equal(np.asarray(flat[p + "gate_up_proj.weight"]), want)
            a = f"model.layers.{layer}.self_attn."
            parts = [ref[a + f"{x}_proj.weight"] for x in "qkv"]
            want = fuse_parts(a + "qkv_proj.weight", parts, cfg.head_dim)
            np.testing.assert_array_equal(np.asarray(flat[a + "qkv_proj.weight"]), want)
    flat = flat_param_shapes(dev_state)
    fused = flat["model.layers.0.mlp.gate_up_proj.weight"]
    assert fused.sharding.spec == PartitionSpec(None, "tp", None)
    local = {s.data.shape for s in fused.addressable_shards}
    assert local == {(2, cfg.intermediate_size // 2, cfg.hidden_size)}
    qkv = flat["model.layers.0.self_attn.qkv_proj.weight"]
    assert qkv.sharding.spec == PartitionSpec("tp", None, None, None)
    group = cfg.num_heads // cfg.num_kv_heads
    assert {s.data.shape for s in qkv.addressable_shards} == {(1, group + 2, cfg.head_dim, cfg.hidden_size)}
