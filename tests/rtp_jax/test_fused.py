"""A dense MLP's gate_proj and up_proj checkpoint tensors become one [2, I, D] parameter (models/fused.py)."""

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
from rtp_jax.models.fused import fuse_stream, fused_name
from rtp_jax.models.params import flat_param_shapes, load_state
from sharding.rules import logical_axes, param_spec


def test_names_map_both_ways():
    """Only a dense layer's gate/up map to the fused parameter (gate at 0, up at 1); experts do not."""
    assert fused_name("model.layers.3.mlp.gate_proj.weight") == ("model.layers.3.mlp.gate_up_proj.weight", 0)
    assert fused_name("model.layers.3.mlp.up_proj.weight") == ("model.layers.3.mlp.gate_up_proj.weight", 1)
    assert fused_name("model.layers.3.mlp.down_proj.weight") is None
    assert fused_name("model.layers.3.mlp.experts.0.gate_proj.weight") is None


def test_fuse_stream_pairs_halves_in_any_order_and_passes_the_rest():
    """Halves arriving apart and in either order are stacked gate-first when the pair is complete;
    other tensors pass through in their place."""
    g0, u0, g1, u1 = (np.full((2, 3), i, np.float32) for i in range(4))
    name = "model.layers.{}.mlp.{}_proj.weight"
    stream = [(name.format(0, "up"), u0), ("a", 1), (name.format(1, "gate"), g1),
              (name.format(0, "gate"), g0), (name.format(1, "up"), u1)]
    out = list(fuse_stream(stream, lambda name, parts: np.stack(parts)))
    assert [n for n, _ in out] == ["a", "model.layers.0.mlp.gate_up_proj.weight",
                                   "model.layers.1.mlp.gate_up_proj.weight"]
    np.testing.assert_array_equal(out[1][1], np.stack([g0, u0]))
    np.testing.assert_array_equal(out[2][1], np.stack([g1, u1]))


@pytest.mark.parametrize("stream, message", [
    ([("model.layers.0.mlp.gate_proj.weight", np.zeros((2, 3)))], "not its partner"),
    ([("model.layers.0.mlp.gate_proj.weight", np.zeros((2, 3))),
      ("model.layers.0.mlp.up_proj.weight", np.zeros((3, 3)))], "differ in shape"),
    ([("model.layers.0.mlp.up_proj.weight", np.zeros((2, 3)))] * 2, "appears twice"),
])
def test_fuse_stream_refuses_incomplete_or_mismatched_pairs(stream, message):
    with pytest.raises(ValueError, match=message):
        list(fuse_stream(stream, lambda name, parts: np.stack(parts)))


def test_loaders_fuse_gate_up_and_keep_it_sharded_on_the_intermediate_axis(tiny_hf_model):
    """Both loading paths give gate_up_proj == stack(gate_proj, up_proj) of the checkpoint; the fast
    loader places it split on I over tp (each device holds its rows of both halves), as the rules say."""
    path = tiny_hf_model("llama", sharded=True, dtype="float32")
    cfg = load_model_config(path)
    ref = dict(iter_safetensors(path))
    _, host_state = load_state(cfg, jnp.float32, iter_weights(path, cfg))
    devices = jax.devices()[:2]
    if len(devices) < 2:
        pytest.skip("needs 2 devices")
    mesh = Mesh(np.array(devices), ("tp",))
    axes = dict.fromkeys(logical_axes(cfg, ParallelConfig()), None) | {"mlp": "tp"}  # only the MLP split

    def sharding_for(name: str, shape: tuple[int, ...]) -> NamedSharding:
        return NamedSharding(mesh, param_spec(name, len(shape), axes))

    _, dev_state = load_model_state(path, cfg, jnp.float32, sharding_for=sharding_for)
    for state in (host_state, dev_state):
        flat = flat_param_shapes(state)
        assert not any(n.endswith(("mlp.gate_proj.weight", "mlp.up_proj.weight")) for n in flat)
        for layer in range(cfg.num_layers):
            p = f"model.layers.{layer}.mlp."
            want = np.stack([ref[p + "gate_proj.weight"], ref[p + "up_proj.weight"]])
            np.testing.assert_array_equal(np.asarray(flat[p + "gate_up_proj.weight"]), want)
    fused = flat_param_shapes(dev_state)["model.layers.0.mlp.gate_up_proj.weight"]
    assert fused.sharding.spec == PartitionSpec(None, "tp", None)
    local = {s.data.shape for s in fused.addressable_shards}
    assert local == {(2, cfg.intermediate_size // 2, cfg.hidden_size)}
