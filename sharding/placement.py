"""Putting arrays on the mesh: weights straight from host to their shards, KV caches, dp replicas.

Every function here takes names and arrays, never model objects (sharding/ does not import models).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from rtp_jax.config import ModelConfig, ParallelConfig
from sharding.mesh import stage_layers, stage_meshes, sub_mesh
from sharding.rules import PARAM_RULES, Rule, kv_cache_spec, logical_axes, param_spec, param_stage

ShardingFn = Callable[[str, int], NamedSharding]


def param_sharding_fn(mesh: Mesh, mc: ModelConfig, pc: ParallelConfig,
                      rules: tuple[Rule, ...] = PARAM_RULES) -> ShardingFn:
    """(parameter name, rank) -> NamedSharding on the sub-mesh of the pipeline stage that owns it."""
    stages, mapping = stage_meshes(mesh), logical_axes(mc, pc)
    pp = len(stages)

    def fn(name: str, ndim: int) -> NamedSharding:
        stage = param_stage(name, mc.num_layers, pp)
        return NamedSharding(stages[stage], param_spec(name, ndim, mapping, rules))

    return fn


def put(x: np.ndarray | jax.Array, sharding: NamedSharding) -> jax.Array:
    """Places `x` so each device receives only its own shard (a host array is sliced per device;
    under multi-host each process fills only its addressable devices)."""
    if isinstance(x, jax.Array):
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def make_placer(mesh: Mesh, mc: ModelConfig, pc: ParallelConfig) -> Callable[[str, Any], jax.Array]:
    """The `place` callback of `rtp_jax.models.params.load_state` for this mesh."""
    fn = param_sharding_fn(mesh, mc, pc)
    return lambda name, x: put(x, fn(name, np.ndim(x)))


def kv_cache_shardings(mesh: Mesh, mc: ModelConfig, pc: ParallelConfig) -> list[NamedSharding]:
    """One sharding per layer: kv heads over tp (replicated when fewer than tp), on the layer's stage."""
    spec = kv_cache_spec(mc, pc)
    stages = stage_meshes(mesh)
    return [NamedSharding(stages[s], spec)
            for s, layers in enumerate(stage_layers(mc.num_layers, len(stages))) for _ in layers]


def replica_view(x: jax.Array, replica: int) -> jax.Array:
    """The part of a dp-replicated array that lives on dp replica `replica`, without copying."""
    sharding = x.sharding
    assert isinstance(sharding, NamedSharding), "replica_view needs a NamedSharding array"
    target = NamedSharding(sub_mesh(sharding.mesh, dp=replica), sharding.spec)
    devices = set(target.mesh.devices.flat)
    shards = [s.data for s in x.addressable_shards if s.device in devices]
    return jax.make_array_from_single_device_arrays(x.shape, target, shards)


def split_replicas(tree: Any, num_replicas: int) -> list[Any]:
    """dp replicas of a pytree of arrays placed on the whole mesh (one view per replica)."""
    return [jax.tree.map(lambda x, d=d: replica_view(x, d), tree) for d in range(num_replicas)]
