"""Attention under tensor parallelism: the kernel runs per tp shard on its local heads (shard_map).

q is split on heads over tp. The KV cache is split on kv heads when tp divides them; when there are
fewer kv heads than tp shards it is replicated and each shard picks the one kv head its q heads use
(tp must then be a multiple of the kv head count, so that head is the same for all of them).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from sharding import compat


def shard_attention(attn_fn: Any, mesh: Any, num_heads: int, num_kv_heads: int,
                    uses_new_kv: bool = False) -> Any:
    """Wraps an `AttentionFn` so each tp shard calls it on its own heads; identity when tp is 1.
    `uses_new_kv`: pass the step's K/V (`new_kv`) through to `attn_fn`; else they are dropped here, so no
    collective moves them for a kernel that reads only the caches."""
    tp = compat.axis_size(mesh, "tp")
    if tp == 1:
        if mesh.size > 1 and hasattr(attn_fn, "write_kv"):
            return _scatter_writes(attn_fn)
        return attn_fn
    kv_split = num_kv_heads % tp == 0
    cache_spec = P(None, None, "tp", None) if kv_split else P()
    shards_per_kv_head = 1 if kv_split else tp // num_kv_heads

    def sharded(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, md: Any, *, sm_scale: float,
                sliding_window: int | None, soft_cap: float | None,
                new_kv: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        if not uses_new_kv:
            new_kv = None

        def local(q: jax.Array, k: jax.Array, v: jax.Array, md: Any,
                  new_kv: tuple[jax.Array, jax.Array] | None) -> jax.Array:
            if not kv_split:
                head = jax.lax.axis_index("tp") // shards_per_kv_head
                k = jax.lax.dynamic_slice_in_dim(k, head, 1, axis=2)
                v = jax.lax.dynamic_slice_in_dim(v, head, 1, axis=2)
                if new_kv is not None:
                    new_kv = tuple(jax.lax.dynamic_slice_in_dim(x, head, 1, axis=1) for x in new_kv)
            return attn_fn(q, k, v, md, sm_scale=sm_scale, sliding_window=sliding_window,
                           soft_cap=soft_cap, new_kv=new_kv)

        new_spec = P(None, "tp", None) if kv_split else P()
        f = compat.shard_map(local, mesh, in_specs=(P(None, "tp", None), cache_spec, cache_spec, P(),
                                                    None if new_kv is None else (new_spec, new_spec)),
                             out_specs=P(None, "tp", None))
        return f(q, k_cache, v_cache, md, new_kv)

    return sharded


def _scatter_writes(attn_fn: Any) -> Any:
    """`attn_fn` without its Pallas cache write (`rtp_jax.models.attention.kv_writer`): a `pallas_call`
    has no SPMD partitioning rule, so on a mesh of several devices the layers keep XLA's scatters, which
    partition like the caches."""

    def attn(*args: Any, **kwargs: Any) -> Any:
        return attn_fn(*args, **kwargs)

    return attn
