"""The device side of the fast loader: sending a job's host rows to the devices of its sharding
(`_transfer`, `_put_piece`), never leaving a device array aliasing staged host bytes (`_aliases`), and
joining a tensor's row pieces per device (`_join`, `_assemble`) with the on-device cast (`_cast`)."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from rtp_jax.loader.reading import PlannedTensor
from rtp_jax.loader.shards import _device_keys


def _aliases(out: Any, lo: int, hi: int) -> bool:
    """Whether a shard of `out` lives in host bytes [lo, hi) (a host backend that aliased a numpy view)."""
    try:
        ptrs = [s.data.unsafe_buffer_pointer() for s in out.addressable_shards]
    except Exception:  # noqa: BLE001 - no pointer: a device buffer
        return False
    return any(lo <= p < hi for p in ptrs)


def _transfer(hosts: dict[Any, np.ndarray], t: PlannedTensor, sharding: Any) -> tuple[Any, int]:
    """(jax.Array of `t` placed in `sharding`, bytes sent) from the host rows of each shard key."""
    import jax

    if sharding is None or not t.entry.shape:
        (host,) = hosts.values()
        return jax.device_put(host, sharding), host.nbytes
    singles, nsent = [], 0
    for device, key in _device_keys(t, sharding):
        singles.append(jax.device_put(hosts[key], device))
        nsent += hosts[key].nbytes
    return jax.make_array_from_single_device_arrays(t.entry.shape, sharding, singles), nsent


def _key_devices(t: PlannedTensor, sharding: Any, key: Any) -> list[Any]:
    """The devices of `sharding` that hold the shard `key` of `t` ([None]: the default device)."""
    if sharding is None or not t.entry.shape:
        return [None]
    return [d for d, k in _device_keys(t, sharding) if k == key]


def _put_piece(host: np.ndarray, devices: list[Any], lo: int, hi: int) -> dict[Any, Any]:
    """{device: jax.Array} of `host` sent to each of `devices` (None: the default one), complete on
    return, and not aliasing host bytes [lo, hi) (a host backend that kept the view gets a copy)."""
    import jax

    out = {d: jax.device_put(host, d) for d in devices}
    for d, a in out.items():
        a.block_until_ready()
        if hi and _aliases(a, lo, hi):
            out[d] = jax.device_put(np.array(host), d)
            out[d].block_until_ready()
    return out


_JOINS: dict[Any, Any] = {}


def _join(chunks: list[tuple[int, Any]], dtype: np.dtype | None, how: str) -> Any:
    """One device array from row chunks [(first row, array)] on one device, sorted and contiguous from
    the first one's row, cast to `dtype` (None: keep). how="concat": one jitted concatenate + cast;
    "dus": a zero buffer updated in place (donated) by each chunk, then cast."""
    import jax
    import jax.numpy as jnp

    chunks = sorted(chunks, key=lambda c: c[0])
    base = chunks[0][0]
    arrays = [a for _, a in chunks]
    if how == "concat":
        fn = _JOINS.get(("concat", dtype))
        if fn is None:
            fn = _JOINS["concat", dtype] = jax.jit(
                lambda *c: jnp.concatenate(c) if dtype is None else jnp.concatenate(c).astype(dtype))
        return fn(*arrays)
    if how != "dus":
        raise ValueError(f"assemble must be 'concat' or 'dus', got {how!r}")
    fn = _JOINS.get("dus")
    if fn is None:
        fn = _JOINS["dus"] = jax.jit(lambda buf, c, i: jax.lax.dynamic_update_slice_in_dim(buf, c, i, 0),
                                     donate_argnums=0)
    rows = sum(a.shape[0] for a in arrays)
    device = next(iter(arrays[0].devices()))
    buf = jnp.zeros((rows, *arrays[0].shape[1:]), arrays[0].dtype, device=device)
    for r0, a in chunks:
        buf = fn(buf, a, np.int32(r0 - base))
    return buf if dtype is None or dtype == buf.dtype else _cast(buf, dtype)


@functools.lru_cache(maxsize=16)
def _fuse_fn(kind: str, head_dim: int, sharding: Any) -> Any:
    """One jitted combination per (fusion kind, sharding): every layer's parts reuse its compiled program."""
    import jax
    import jax.numpy as jnp

    from rtp_jax.models.fused import fuse_parts

    return jax.jit(lambda *parts: fuse_parts(kind, parts, head_dim, jnp), out_shardings=sharding)


def fuse_on_devices(fused: str, parts: list[Any], head_dim: int, sharding: Any) -> Any:
    """models/fused.py's combination of device arrays sharded alike (gate/up split on I, or q/k/v split on
    heads / KV heads), placed in `sharding` (the fused parameter's: each device combines its own rows,
    nothing crosses devices; None: where the parts are)."""
    from rtp_jax.models.fused import fusion_kind

    return _fuse_fn(fusion_kind(fused), head_dim, sharding)(*parts)


def _assemble(t: PlannedTensor, sharding: Any, parts: list[tuple[Any, int, dict[Any, Any]]],
              dtype: np.dtype | None, how: str) -> Any:
    """The jax.Array of `t` in `sharding` (None: the default device) from its pieces
    [(shard key, first row, {device: rows on that device})], joined per device by `_join`."""
    import jax

    per_device: dict[Any, list[tuple[int, Any]]] = {}
    for _, r0, arrays in parts:
        for d, a in arrays.items():
            per_device.setdefault(d, []).append((r0, a))
    singles = {d: _join(chunks, dtype, how) for d, chunks in per_device.items()}
    if sharding is None or not t.entry.shape:
        (out,) = singles.values()
        return out
    return jax.make_array_from_single_device_arrays(t.entry.shape, sharding,
                                                    [singles[d] for d, _ in _device_keys(t, sharding)])


_CASTS: dict[Any, Any] = {}


def _cast(x: Any, dtype: np.dtype) -> Any:
    """Casts on the device where `x` lives (jitted per dtype; output sharding follows the input's)."""
    import jax

    fn = _CASTS.get(dtype)
    if fn is None:
        fn = _CASTS[dtype] = jax.jit(lambda a: a.astype(dtype))
    return fn(x)
