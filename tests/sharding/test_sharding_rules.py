"""Mesh, partition rules, per-device shard shapes, validation errors, plan(), multi-host env."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from layouts import DENSE, MOE, engine_config, layout

from rtp_jax.config import ModelConfig, ParallelConfig
from rtp_jax.engine.args import EngineArgs
from rtp_jax.engine.core import DataParallelEngineCore, EngineCore, make_engine_core
from rtp_jax.models.params import abstract_model, flat_param_shapes, place_state, random_state
from sharding import hf_param_shapes, make_mesh, plan, stage_meshes, validate
from sharding.mesh import distributed_env, initialize_distributed_from_env
from sharding.placement import make_placer
from sharding.rules import kv_cache_spec, logical_axes, param_spec, param_specs


def test_mesh_axes_and_order() -> None:
    mesh = make_mesh(layout("dp2-pp1-ep2-tp2"))
    assert mesh.axis_names == ("dp", "pp", "ep", "tp")
    assert dict(mesh.shape) == {"dp": 2, "pp": 1, "ep": 2, "tp": 2}
    # tp innermost: a tp group is neighbouring devices.
    assert [d.id for d in mesh.devices[0, 0, 0]] == [jax.devices()[0].id, jax.devices()[1].id]
    assert [len(m.devices.flat) for m in stage_meshes(make_mesh(layout("pp2-tp4")))] == [4, 4]


@pytest.mark.parametrize("cfg", [DENSE, MOE, DENSE.replace(tie_word_embeddings=True, attention_bias=True)])
def test_plan_shapes_match_the_model(cfg: ModelConfig) -> None:
    """sharding/ names every parameter without importing the models; the names must agree."""
    want = {k: tuple(v.shape) for k, v in flat_param_shapes(abstract_model(cfg, jnp.float32)[1]).items()}
    assert hf_param_shapes(cfg) == want


def test_specs_are_the_documented_layout() -> None:
    specs = param_specs(hf_param_shapes(MOE), MOE, layout("ep2-tp4"))
    assert specs["model.embed_tokens.weight"] == P("tp", None)
    assert specs["lm_head.weight"] == P("tp", None)
    # 2 kv heads < tp 4: the fused q/k/v cannot split by KV head, so it splits on its input dim
    assert specs["model.layers.0.self_attn.qkv_proj.weight"] == P(None, None, None, "tp")
    assert specs["model.layers.0.self_attn.o_proj.weight"] == P(None, "tp")
    assert specs["model.layers.1.mlp.experts.gate_proj"] == P("ep", "tp", None)
    assert specs["model.layers.1.mlp.experts.down_proj"] == P("ep", None, "tp")
    assert specs["model.layers.1.mlp.gate.weight"] == P(None, None)
    assert specs["model.norm.weight"] == P()
    dense = param_specs(hf_param_shapes(DENSE), DENSE, layout("tp2"))
    assert dense["model.layers.0.self_attn.qkv_proj.weight"] == P("tp", None, None, None)
    # The checkpoint's q/k/v, placed by the loader before they are fused, split by heads alike.
    for part in "qkv":
        name = f"model.layers.0.self_attn.{part}_proj.weight"
        assert param_spec(name, 2, logical_axes(DENSE, layout("tp2"))) == P("tp", None)
    assert dense["model.layers.0.mlp.gate_up_proj.weight"] == P(None, "tp", None)
    # The checkpoint's halves, placed by the loader before they are stacked, split on the same rows.
    half = param_spec("model.layers.0.mlp.up_proj.weight", 2, logical_axes(DENSE, layout("tp2")))
    assert half == P("tp", None)
    assert dense["model.layers.0.mlp.down_proj.weight"] == P(None, "tp")
    assert kv_cache_spec(DENSE, layout("tp2")) == P(None, None, "tp", None)
    assert kv_cache_spec(DENSE, layout("tp8")) == P(None, None, None, None)


def _local_shapes(state: object) -> dict[str, set[tuple[int, ...]]]:
    flat = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    from flax import nnx

    walk(nnx.to_pure_dict(state), "")
    return {k: {tuple(s.data.shape) for s in v.addressable_shards} for k, v in flat.items()}


def test_each_device_holds_only_its_shard() -> None:
    """ep2 x tp4 on 8 devices: every parameter's per-device shape is the split one (no silent
    replication), and each device's buffer is exactly that big."""
    pc = layout("ep2-tp4")
    graphdef, state = random_state(MOE, jnp.float32)
    placed = place_state(state, make_placer(make_mesh(pc), MOE, pc))
    local = _local_shapes(placed)
    d, hd, v, i = 64, 16, 256, 32
    want = {
        "model.embed_tokens.weight": (v // 4, d),
        "lm_head.weight": (v // 4, d),
        "model.layers.0.self_attn.qkv_proj.weight": (2, 8 // 2 + 2, hd, d // 4),  # 2 kv heads < tp 4
        "model.layers.0.self_attn.o_proj.weight": (d, 8 * hd // 4),
        "model.layers.0.mlp.experts.gate_proj": (8 // 2, i // 4, d),
        "model.layers.0.mlp.experts.up_proj": (8 // 2, i // 4, d),
        "model.layers.0.mlp.experts.down_proj": (8 // 2, d, i // 4),
        "model.layers.0.mlp.gate.weight": (8, d),
        "model.norm.weight": (d,),
    }
    for name, shape in want.items():
        assert local[name] == {shape}, name
    assert all(len(s) == 1 for s in local.values())


def test_pipeline_stages_hold_their_layers_and_caches() -> None:
    pc = layout("pp2-tp2")
    graphdef, state = random_state(DENSE, jnp.float32)
    core = make_engine_core(engine_config(DENSE, pc), graphdef, state)
    assert isinstance(core, EngineCore)
    stage0, stage1 = (set(m.devices.flat) for m in stage_meshes(core.mesh))
    caches = core.runner.kv_caches
    assert set(caches[0][0].devices()) == stage0 and set(caches[1][0].devices()) == stage1
    assert {tuple(s.data.shape) for s in caches[0][0].addressable_shards} == {(48, 4, 1, 16)}
    own = core.runner._step.own
    assert all(set(a.devices()) <= stage0 for a in own[0].values())
    assert all(set(a.devices()) <= stage1 for a in own[1].values())
    assert ("model", "embed_tokens", "weight") in own[0] and ("lm_head", "weight") in own[1]


def test_data_parallel_replicas_are_disjoint() -> None:
    graphdef, state = random_state(DENSE, jnp.float32)
    core = make_engine_core(engine_config(DENSE, layout("dp2-tp2")), graphdef, state)
    assert isinstance(core, DataParallelEngineCore) and len(core.cores) == 2
    a, b = (set(c.mesh.devices.flat) for c in core.cores)
    assert len(a) == len(b) == 2 and not a & b


@pytest.mark.parametrize(("cfg", "kw", "match"), [
    (DENSE, {"tensor_parallel_size": 16}, "devices"),
    (DENSE, {"tensor_parallel_size": 3}, "devices"),
    (DENSE.replace(num_heads=6, num_kv_heads=2), {"tensor_parallel_size": 4}, "num_attention_heads"),
    (DENSE.replace(num_heads=12, num_kv_heads=3), {"tensor_parallel_size": 4}, "num_key_value_heads"),
    (DENSE, {"expert_parallel_size": 2}, "mixture-of-experts"),
    (MOE.replace(num_experts=6), {"expert_parallel_size": 4}, "num_experts"),
    (DENSE.replace(num_layers=3), {"pipeline_parallel_size": 2}, "num_hidden_layers"),
    (DENSE.replace(vocab_size=250), {"tensor_parallel_size": 4}, "vocab_size"),
])
def test_bad_layouts_raise_clear_errors(cfg: ModelConfig, kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate(cfg, ParallelConfig(**kw), num_devices=8)
    with pytest.raises(ValueError, match=match):
        EngineArgs(**kw).engine_config(cfg)


def test_plan_reports_bytes_and_traffic(capsys: pytest.CaptureFixture[str]) -> None:
    one = plan(MOE, ParallelConfig(), dtype="float32", verbose=False)
    p = plan(MOE, layout("pp2-ep2-tp2"), dtype="float32", batch_tokens=8, kv_tokens=1024)
    assert "per device" in capsys.readouterr().out
    assert one.collectives == () and one.weight_bytes_per_device == one.weight_bytes_total
    assert p.weight_bytes_total == one.weight_bytes_total
    assert p.weight_bytes_per_device < one.weight_bytes_total // 4
    # 1 layer per stage, 2 kv heads split over tp 2: 2 (k, v) * 1 * 1 * 16 * 4 bytes per token.
    assert p.kv_bytes_per_token_per_device == 128 and p.kv_bytes_per_device == 128 * 1024
    kinds = {c.what: c for c in p.collectives}
    assert kinds["moe combine (f32)"].axes == ("ep", "tp") and kinds["moe combine (f32)"].count == 2
    assert kinds["stage boundary activations"].bytes_per_device == 8 * 64 * 4
    assert p.collective_bytes_per_step > 0
    assert "attention qkv_proj (hidden split)" not in kinds  # 2 kv heads split over tp 2
    # tp 4 > 2 kv heads: the fused q/k/v splits on its input dim, so each layer all-reduces its output.
    wide = {c.what: c for c in plan(MOE, layout("ep2-tp4"), dtype="float32", batch_tokens=8,
                                     verbose=False).collectives}
    qkv = wide["attention qkv_proj (hidden split)"]
    assert qkv.count == MOE.num_layers and qkv.bytes_per_device == 2 * 3 * (8 * (8 + 2 * 2) * 16 * 4) // 4


def test_distributed_env() -> None:
    assert distributed_env({}) is None
    assert not initialize_distributed_from_env({})
    env = {"RTP_JAX_COORDINATOR": "10.0.0.1:8476", "RTP_JAX_NUM_PROCESSES": "2", "RTP_JAX_PROCESS_ID": "1"}
    assert distributed_env(env) == {"coordinator": "10.0.0.1:8476", "num_processes": 2, "process_id": 1}
    with pytest.raises(ValueError, match="needs all of"):
        distributed_env({"RTP_JAX_COORDINATOR": "x:1"})
    with pytest.raises(ValueError, match="PROCESS_ID"):
        distributed_env({**env, "RTP_JAX_PROCESS_ID": "2"})
    single = {**env, "RTP_JAX_NUM_PROCESSES": "1", "RTP_JAX_PROCESS_ID": "0"}
    assert not initialize_distributed_from_env(single)


def test_placer_uploads_host_arrays_per_shard() -> None:
    pc = layout("tp4")
    place = make_placer(make_mesh(pc), DENSE, pc)
    host = np.arange(256 * 64, dtype=np.float32).reshape(256, 64)
    arr = place("model.embed_tokens.weight", host)
    assert [tuple(s.data.shape) for s in arr.addressable_shards] == [(64, 64)] * 4
    np.testing.assert_array_equal(np.asarray(arr), host)


def test_pallas_kv_write_kept_only_on_one_device() -> None:
    """The Pallas K/V write (an attention function's `write_kv`) survives `shard_attention` on a mesh of
    one device; on several devices (tp shards, or ep replicas with tp 1) the layers get XLA's scatters,
    since a pallas_call has no SPMD partitioning rule."""
    from rtp_jax.models.attention import kv_writer, pallas_write_kv, write_kv
    from sharding.attention import shard_attention

    def attn(q, k_cache, v_cache, md, *, sm_scale, sliding_window, soft_cap, new_kv=None):
        return q

    attn.write_kv = pallas_write_kv
    one = make_mesh(layout("tp1"), devices=jax.devices()[:1])
    assert kv_writer(shard_attention(attn, one, 8, 2)) is pallas_write_kv
    for name in ("tp2", "ep2-tp1"):
        wrapped = shard_attention(attn, make_mesh(layout(name)), 8, 2)
        assert kv_writer(wrapped) is write_kv, name
