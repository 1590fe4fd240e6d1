"""Every JAX call whose spelling moved between releases, in one place (tested on 0.10.2, meant for 0.11.x).

Callers import from here, never from `jax.experimental` directly, so a JAX upgrade touches one file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec


def auto_mesh(devices: np.ndarray, axis_names: Sequence[str]) -> Mesh:
    """A mesh whose axes are all `Auto` (jit propagates shardings, as before explicit sharding existed).

    `jax.make_mesh` defaults to `Explicit` axes in recent releases, which changes jit's typing rules,
    so the mesh is built from `Mesh` with the axis types spelled out.
    """
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is None:  # older JAX: every axis is implicitly auto
        return Mesh(devices, tuple(axis_names))
    return Mesh(devices, tuple(axis_names), axis_types=(axis_type.Auto,) * len(axis_names))


def shard_map(f: Callable[..., Any], mesh: Any, in_specs: Any, out_specs: Any) -> Callable[..., Any]:
    """`shard_map` without the replication check (our bodies end in explicit psums)."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as _shard_map  # JAX < 0.7

    return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None) -> Iterator[None]:
    """Makes `mesh` the context mesh while tracing, so model code can ask `current_mesh()`."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else jax.sharding.use_mesh(mesh):
        yield


def current_mesh() -> Any | None:
    """The (abstract) mesh set by `use_mesh`, or None outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def axis_size(mesh: Any, name: str) -> int:
    return int(dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True)).get(name, 1))


def ragged_dot_out_in(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Grouped matmul with HF's [out, in] expert layout: x [M, in] rows grouped by `group_sizes` [G],
    w [G, out, in] -> [M, out]; rows past sum(group_sizes) come out zero."""
    dn = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0]
    )
    return jax.lax.ragged_dot_general(x, w, group_sizes, dn, preferred_element_type=x.dtype)


def spec(*axes: Any) -> PartitionSpec:
    return PartitionSpec(*axes)


def initialize_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
