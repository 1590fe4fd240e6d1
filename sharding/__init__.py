"""Multi-device layouts: the ("dp", "pp", "ep", "tp") mesh, partition rules as data, placement, plan().

    from sharding import make_mesh, plan
    mesh = make_mesh(ParallelConfig(tensor_parallel_size=4))
    plan(model_config, ParallelConfig(tensor_parallel_size=4))   # prints per-device bytes and traffic

This package never imports the models: rules are keyed by parameter path (HF names).
"""

from sharding.mesh import (
    AXES,
    initialize_distributed_from_env,
    make_mesh,
    replica_meshes,
    stage_layers,
    stage_meshes,
    sub_mesh,
    validate,
)
from sharding.plan import ShardingPlan, hf_param_shapes, plan
from sharding.rules import KV_CACHE_AXES, PARAM_RULES, kv_cache_spec, logical_axes, param_spec, param_specs

__all__ = [
    "AXES",
    "KV_CACHE_AXES",
    "PARAM_RULES",
    "ShardingPlan",
    "hf_param_shapes",
    "initialize_distributed_from_env",
    "kv_cache_spec",
    "logical_axes",
    "make_mesh",
    "param_spec",
    "param_specs",
    "plan",
    "replica_meshes",
    "stage_layers",
    "stage_meshes",
    "sub_mesh",
    "validate",
]
