"""Probe patch (bench/probe_startup.py variant "export_kernel"): the Mosaic GPU decode kernel lowered once
per static signature (shapes, dtypes, tuning) as a `jax.export.Exported` and `.call`ed by every program
that uses it, instead of being lowered again in each.

Why: lowering that one kernel is ~0.67 s of a decode program's ~0.77 s of lowering (CPU box, jax 0.11.2,
lowered for CUDA; bench/notes_bench.md, seventh session), and it is identical across the K-step decode
programs, both sampling modes and the mixed programs with the same sequence slots; calling the exported
kernel lowered a program in 0.008 s there. Not validated on a GPU yet; a probe until it is.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import jax


def install() -> None:
    """Replaces `kernels_pallas.paged_decode_mgpu._paged_decode` (compiled path only) with the memoized
    exported kernel."""
    from jax import export

    import kernels_pallas.paged_decode_mgpu as mgpu

    original = mgpu._paged_decode
    cache: dict[Any, Any] = {}
    lock = threading.Lock()  # `--precompile` traces programs in 8 threads

    def patched(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, kv_lens: jax.Array,
                block_tables: jax.Array, **static: Any) -> jax.Array:
        args = (q, k_cache, v_cache, kv_lens, block_tables)
        if static.get("interpret"):
            return original(*args, **static)
        key = (tuple((a.shape, str(a.dtype)) for a in args), tuple(sorted(static.items())))
        with lock:
            exp = cache.get(key)
            if exp is None:
                avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
                exp = cache[key] = export.export(jax.jit(functools.partial(original, **static)),
                                                 platforms=("cuda",))(*avals)
        return exp.call(*args)

    mgpu._paged_decode = patched
