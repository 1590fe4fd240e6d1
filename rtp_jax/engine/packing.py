"""One host-to-device copy per step: a pytree of small numpy arrays packed into two flat buffers.

A step's inputs are ~20 small arrays; copying them one by one cost ~1.5 ms of host time per step on
the H100 host, packing them ~0.2 ms. The layout (`PackSpec`) is hashable and depends only on shapes,
so it is a static argument of the jitted step and adds no compilations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class PackSpec:
    """treedef plus, per leaf, (buffer, offset, shape, dtype); buffer 0 holds 32-bit ints, 1 floats."""

    treedef: Any
    leaves: tuple[tuple[int, int, tuple[int, ...], str], ...]


def pack(tree: Any) -> tuple[np.ndarray, np.ndarray, PackSpec]:
    """tree of int32/uint32/float32 numpy arrays -> (int32[n_i], float32[n_f], spec)."""
    leaves, treedef = jax.tree.flatten(tree)
    ints: list[np.ndarray] = []
    floats: list[np.ndarray] = []
    offsets = [0, 0]
    layout = []
    for x in leaves:
        x = np.asarray(x)
        buf = 1 if x.dtype == np.float32 else 0
        if buf == 0 and x.dtype not in (np.int32, np.uint32):
            raise TypeError(f"cannot pack {x.dtype}: step inputs are int32, uint32 or float32")
        flat = x.reshape(-1)
        (floats if buf else ints).append(flat if buf else flat.view(np.int32))
        layout.append((buf, offsets[buf], x.shape, x.dtype.name))
        offsets[buf] += flat.size
    ibuf = np.concatenate(ints) if ints else np.zeros(0, np.int32)
    fbuf = np.concatenate(floats) if floats else np.zeros(0, np.float32)
    return ibuf, fbuf, PackSpec(treedef, tuple(layout))


def unpack(ibuf: jax.Array, fbuf: jax.Array, spec: PackSpec) -> Any:
    """Inverse of `pack`, inside a jit: static slices of the two device buffers."""
    bufs = (ibuf, fbuf)
    leaves = []
    for buf, off, shape, dtype in spec.leaves:
        size = int(np.prod(shape, dtype=np.int64))
        x = bufs[buf][off:off + size].reshape(shape)
        if dtype == "uint32":
            x = jax.lax.bitcast_convert_type(x, jnp.uint32)
        leaves.append(x)
    return jax.tree.unflatten(spec.treedef, leaves)
