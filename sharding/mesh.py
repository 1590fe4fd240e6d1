"""The device mesh ("dp", "pp", "ep", "tp"), its sub-meshes, validation, and multi-host start-up.

Multi-host launch (one process per host, same command on every host; host 0 is the coordinator):

    RTP_JAX_COORDINATOR=10.0.0.1:8476 RTP_JAX_NUM_PROCESSES=2 RTP_JAX_PROCESS_ID=<0|1> \
        rtp-jax serve --model /models/Qwen3-30B-A3B --tp 8 --ep 2

`initialize_distributed_from_env()` (called by `build_engine` before any device work) turns these
variables into `jax.distributed.initialize(...)`; without them it does nothing. Then `jax.devices()`
lists every host's devices and the mesh spans them; weights are placed with
`jax.make_array_from_callback`, so each process uploads only its own devices' shards.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from rtp_jax.config import ModelConfig, ParallelConfig
from sharding import compat

AXES = ("dp", "pp", "ep", "tp")

_ENV = ("RTP_JAX_COORDINATOR", "RTP_JAX_NUM_PROCESSES", "RTP_JAX_PROCESS_ID")


def mesh_shape(pc: ParallelConfig) -> tuple[int, int, int, int]:
    return (pc.data_parallel_size, pc.pipeline_parallel_size, pc.expert_parallel_size,
            pc.tensor_parallel_size)


def make_mesh(pc: ParallelConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """Mesh of `pc.world_size` devices with axes ("dp", "pp", "ep", "tp"); tp is innermost so a
    tensor-parallel group is neighbouring devices (one NVLink island on a GPU host)."""
    devices = list(jax.devices() if devices is None else devices)
    n = pc.world_size
    if n > len(devices) or len(devices) % n:
        raise ValueError(
            f"dp {pc.data_parallel_size} x pp {pc.pipeline_parallel_size} x ep {pc.expert_parallel_size} "
            f"x tp {pc.tensor_parallel_size} = {n} devices, but {len(devices)} are available "
            f"(the product must divide the device count)"
        )
    return compat.auto_mesh(np.asarray(devices[:n], dtype=object).reshape(mesh_shape(pc)), AXES)


def sub_mesh(mesh: Mesh, **index: int) -> Mesh:
    """The mesh of one dp replica and/or pp stage, e.g. sub_mesh(mesh, dp=1, pp=0); every axis is kept
    (indexed axes get size 1) so the same partition specs apply."""
    slices = tuple(slice(index[a], index[a] + 1) if a in index else slice(None) for a in mesh.axis_names)
    return compat.auto_mesh(mesh.devices[slices], mesh.axis_names)


def replica_meshes(mesh: Mesh) -> list[Mesh]:
    return [sub_mesh(mesh, dp=d) for d in range(compat.axis_size(mesh, "dp"))]


def stage_meshes(mesh: Mesh) -> list[Mesh]:
    return [sub_mesh(mesh, pp=s) for s in range(compat.axis_size(mesh, "pp"))]


def stage_layers(num_layers: int, pp: int) -> list[range]:
    """Contiguous layer ranges of each pipeline stage (validated to divide evenly)."""
    per = num_layers // pp
    return [range(s * per, (s + 1) * per) for s in range(pp)]


def validate(mc: ModelConfig, pc: ParallelConfig, num_devices: int | None = None) -> None:
    """Raises ValueError naming the first size that does not divide what it splits."""
    tp, pp, ep = pc.tensor_parallel_size, pc.pipeline_parallel_size, pc.expert_parallel_size
    if num_devices is not None and (pc.world_size > num_devices or num_devices % pc.world_size):
        raise ValueError(f"the parallel sizes multiply to {pc.world_size} devices, but {num_devices} "
                         f"are available (the product must divide the device count)")
    checks = [
        (mc.num_heads % tp == 0, f"tensor_parallel_size {tp} must divide num_attention_heads {mc.num_heads}"),
        (mc.num_kv_heads % tp == 0 or tp % mc.num_kv_heads == 0,
         f"tensor_parallel_size {tp} and num_key_value_heads {mc.num_kv_heads}: one must divide the other "
         f"(kv heads are split when tp divides them and replicated when there are fewer than tp)"),
        (mc.vocab_size % tp == 0, f"tensor_parallel_size {tp} must divide vocab_size {mc.vocab_size}"),
        (mc.is_moe or mc.intermediate_size % tp == 0,
         f"tensor_parallel_size {tp} must divide intermediate_size {mc.intermediate_size}"),
        (not mc.is_moe or mc.expert_intermediate_size % tp == 0,
         f"tensor_parallel_size {tp} must divide the expert intermediate size {mc.expert_intermediate_size}"),
        (ep == 1 or mc.is_moe, f"expert_parallel_size {ep} needs a mixture-of-experts model"),
        (not mc.is_moe or mc.num_experts % ep == 0,
         f"expert_parallel_size {ep} must divide num_experts {mc.num_experts}"),
        (mc.num_layers % pp == 0,
         f"pipeline_parallel_size {pp} must divide num_hidden_layers {mc.num_layers}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def distributed_env(env: Mapping[str, str]) -> dict[str, Any] | None:
    """kwargs for `jax.distributed.initialize` from RTP_JAX_* variables, or None when unset."""
    present = [k for k in _ENV if env.get(k)]
    if not present:
        return None
    if len(present) != len(_ENV):
        raise ValueError(f"multi-host launch needs all of {_ENV}; only {present} are set")
    n, pid = int(env["RTP_JAX_NUM_PROCESSES"]), int(env["RTP_JAX_PROCESS_ID"])
    if not 0 <= pid < n:
        raise ValueError(f"RTP_JAX_PROCESS_ID {pid} must be in [0, RTP_JAX_NUM_PROCESSES={n})")
    return {"coordinator": env["RTP_JAX_COORDINATOR"], "num_processes": n, "process_id": pid}


def initialize_distributed_from_env(env: Mapping[str, str] | None = None) -> bool:
    """Calls `jax.distributed.initialize` when launched multi-host; returns whether it did."""
    kw = distributed_env(os.environ if env is None else env)
    if kw is None or kw["num_processes"] == 1:
        return False
    compat.initialize_distributed(**kw)
    return True
