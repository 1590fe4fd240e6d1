"""What host-to-device paths the loader can use, measured on the machine.

    python3 bench/probe_host.py --ckpt /var/tmp/rtp_bench/llama3-8b --out $OUT [--only h2d,load]

Prototype measurements only (no engine edits): raw host-to-device bandwidth from pageable numpy, from
mmap views and through `pinned_host` memory (h2d), and the host primitives of the loader's staging path
(load). The step-dispatch probe that led to the packed, flat-leaf step (bench/notes_bench.md) was removed
once the engine adopted it; bench/profile_engine.py profiles the engine itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def timeit(fn: Any, n: int = 50) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def probe_h2d(ckpt: str, res: dict[str, Any]) -> None:
    import mmap

    import jax

    dev = jax.devices()[0]
    f = sorted(Path(ckpt).glob("*.safetensors"))[0]
    n = min(1 << 30, (f.stat().st_size - (1 << 20)) // (1 << 23) << 23)
    host = np.ones(n, np.uint8)
    jax.device_put(host, dev).block_until_ready()
    res["h2d_pageable_1GiB_GBps"] = n / timeit(lambda: jax.device_put(host, dev).block_until_ready(), 5) / 1e6
    fd = os.open(f, os.O_RDONLY)
    mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    view = np.frombuffer(mm, np.uint8, n, 1 << 20)
    res["h2d_mmap_view_1GiB_GBps"] = n / timeit(lambda: jax.device_put(view, dev).block_until_ready(),
                                                5) / 1e6
    try:
        pinned = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
        on_dev = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
        ph = jax.device_put(host, pinned)
        ph.block_until_ready()
        res["host_to_pinned_1GiB_GBps"] = n / timeit(lambda: jax.device_put(host, pinned).block_until_ready(),
                                                     5) / 1e6
        res["h2d_from_pinned_1GiB_GBps"] = n / timeit(lambda: jax.device_put(ph, on_dev).block_until_ready(),
                                                      5) / 1e6
    except Exception as e:  # noqa: BLE001
        res["pinned_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    # Parallel pageable transfers (the loader's workers): 8 threads x 128 MiB each.
    from concurrent.futures import ThreadPoolExecutor

    parts = [host[i * (n // 8):(i + 1) * (n // 8)] for i in range(8)]
    with ThreadPoolExecutor(8) as ex:
        def par() -> None:
            list(ex.map(lambda p: jax.device_put(p, dev).block_until_ready(), parts))
        res["h2d_pageable_8threads_GBps"] = n / timeit(par, 5) / 1e6
    mm_parts = [view[i * (n // 8):(i + 1) * (n // 8)] for i in range(8)]
    with ThreadPoolExecutor(8) as ex:
        def par_mm() -> None:
            list(ex.map(lambda p: jax.device_put(p, dev).block_until_ready(), mm_parts))
        res["h2d_mmap_8threads_GBps"] = n / timeit(par_mm, 5) / 1e6
    res["mmap_closed"] = False  # views still alive; the process exit unmaps


def probe_filemap_dma(fview: np.ndarray, dev: Any, res: dict[str, Any]) -> None:
    """DMA registration of a read-only file mapping (the page cache), and transfers straight from it."""
    import jax

    addr, n = int(fview.ctypes.data), fview.nbytes
    t0 = time.perf_counter()
    dev.client.dma_map(addr, n)
    res["filemap_dma_map_ms"] = (time.perf_counter() - t0) * 1e3
    res["filemap_h2d_1thread_GBps"] = n / timeit(lambda: jax.device_put(fview, dev).block_until_ready(),
                                                 5) / 1e6
    t0 = time.perf_counter()
    dev.client.dma_unmap(addr)
    res["filemap_dma_unmap_ms"] = (time.perf_counter() - t0) * 1e3


def probe_slab_h2d(slab: Any, fd: int, dev: Any, ex: Any, tag: str, res: dict[str, Any]) -> None:
    """Transfers from a staging slab: one whole, 8 threads x size/8, and pread + transfer in 8 threads."""
    import jax

    from rtp_jax.loader.fast import pread_into

    size = slab.size
    view = slab.view(0, size)
    view[:] = 1
    sp = size // 8

    def put(i: int) -> None:
        jax.device_put(view[i * sp:(i + 1) * sp], dev).block_until_ready()

    def read_put(i: int) -> None:
        pread_into(fd, memoryview(view[i * sp:(i + 1) * sp]), i * sp)
        put(i)

    res[f"slab_{tag}_h2d_1thread_GBps"] = size / timeit(lambda: jax.device_put(view, dev).block_until_ready(),
                                                        5) / 1e6
    res[f"slab_{tag}_h2d_8threads_GBps"] = size / timeit(lambda: list(ex.map(put, range(8))), 5) / 1e6
    res[f"slab_{tag}_pread_then_h2d_8threads_GBps"] = size / timeit(lambda: list(ex.map(read_put, range(8))),
                                                                    5) / 1e6


def probe_load(ckpt: str, res: dict[str, Any]) -> None:
    """Host-side pieces of the loader's warm path: memcpy and pread (page cache) bandwidth with 1 and 8
    threads, the staging slab's set-up (populate, DMA registration) and transfers from it, and DMA
    registration of a file mapping (page cache) itself."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    import jax

    from rtp_jax.loader.fast import StagingSlab, pread_into

    dev = jax.devices()[0]
    f = sorted(Path(ckpt).glob("*.safetensors"))[0]
    n = min(1 << 30, f.stat().st_size >> 26 << 26)  # 1 GiB, or whole 64 MiB pieces of a small file
    part = n // 8
    with ThreadPoolExecutor(16) as ex:
        def par(fn: Any, k: int) -> float:
            return n / timeit(lambda: list(ex.map(fn, range(k))), 5) / 1e6

        src, dst = np.ones(n, np.uint8), np.ones(n, np.uint8)
        res["memcpy_1thread_GBps"] = n / timeit(lambda: np.copyto(dst, src), 5) / 1e6
        res["memcpy_8threads_GBps"] = par(lambda i: np.copyto(dst[i * part:(i + 1) * part],
                                                              src[i * part:(i + 1) * part]), 8)
        fd = os.open(f, os.O_RDONLY)
        mv = memoryview(dst)
        pread_into(fd, mv, 0)  # page cache warm for this range
        res["pread_1thread_GBps"] = n / timeit(lambda: pread_into(fd, mv, 0), 5) / 1e6
        res["pread_8threads_GBps"] = par(lambda i: pread_into(fd, mv[i * part:(i + 1) * part], i * part), 8)
        res["pread_64MiB_pieces_GBps"] = par(lambda i: pread_into(fd, mv[i << 26:(i + 1) << 26], i << 26),
                                             n >> 26)
        for size, tag in ((n // 4, f"{n >> 22}MiB"), (n, f"{n >> 20}MiB")):
            t0 = time.perf_counter()
            slab = StagingSlab(size)
            t1 = time.perf_counter()
            ok = slab.dma_map(dev.client)
            t2 = time.perf_counter()
            res[f"slab_{tag}_populate_ms"] = (t1 - t0) * 1e3
            res[f"slab_{tag}_dma_map_ms"] = (t2 - t1) * 1e3 if ok else None
            probe_slab_h2d(slab, fd, dev, ex, tag, res)
            t3 = time.perf_counter()
            slab.close()
            res[f"slab_{tag}_close_ms"] = (time.perf_counter() - t3) * 1e3
        # DMA registration of the page cache itself (a read-only file mapping): no host copy at all.
        mm = mmap.mmap(fd, n, access=mmap.ACCESS_READ)
        try:
            probe_filemap_dma(np.frombuffer(mm, np.uint8, n), dev, res)
        except Exception as e:  # noqa: BLE001
            res["filemap_dma_map_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        os.close(fd)


def main() -> None:
    from synth_ckpt import write_checkpoint

    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", default="/var/tmp/rtp_bench/llama3-8b")
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    p.add_argument("--only", default="h2d", help="comma list of probes: h2d, load")
    ns = p.parse_args()
    write_checkpoint(ns.ckpt, ns.shape)
    res: dict[str, Any] = {}
    probes = {"h2d": probe_h2d, "load": probe_load}
    for fn in (probes[k] for k in ns.only.split(",")):
        try:
            fn(ns.ckpt, res)
        except Exception as e:  # noqa: BLE001
            import traceback

            res[f"{fn.__name__}_error"] = traceback.format_exc()[-2000:]
            print(f"{fn.__name__} failed: {e}", flush=True)
        print(json.dumps(res, indent=1), flush=True)
    name = "probe_host.json" if ns.only == "h2d" else f"probe_{ns.only.replace(',', '_')}.json"
    Path(ns.out, name).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
