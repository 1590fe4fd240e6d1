"""What a ring's pinned slots cost to set up on this host: the fault-in of an anonymous mapping
(`MADV_POPULATE_WRITE` of a private mapping with and without `MADV_HUGEPAGE`, or of a shared one, in one
call or split over threads) and its
registration with the CUDA driver; and the host's memory settings that decide it (kernel, transparent huge
pages, LRU). Medians of `--repeats`.

    python3 bench/probe_slot_setup.py --out $OUT [--mib 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import mmap
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rtp_jax.loader.staging import _MADV_POPULATE_WRITE, _madvise_fn, anonymous_map  # noqa: E402

SETTINGS = ("/sys/kernel/mm/transparent_hugepage/enabled", "/sys/kernel/mm/transparent_hugepage/defrag",
            "/sys/kernel/mm/lru_gen/enabled", "/proc/sys/vm/compaction_proactiveness")


def host_settings() -> dict[str, Any]:
    out: dict[str, Any] = {"kernel": platform.release()}
    for p in SETTINGS:
        try:
            out[p] = Path(p).read_text().strip()
        except OSError as e:
            out[p] = f"unreadable: {e.strerror}"
    mounts = Path("/proc/mounts").read_text().splitlines()
    out["mounts"] = [m for m in mounts if m.split()[1] in ("/", "/var", "/var/tmp", "/tmp")]
    return out


def _mapping(kind: str, nbytes: int) -> mmap.mmap:
    """"shared": `mmap.mmap(-1, n)` (MAP_SHARED, shmem); "private": MAP_PRIVATE; "huge": the loader's
    `anonymous_map` (private, MADV_HUGEPAGE)."""
    if kind == "huge":
        return anonymous_map(nbytes)
    if kind == "private":
        return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return mmap.mmap(-1, nbytes)


def one_setup(nbytes: int, kind: str, threads: int, dma: Any) -> dict[str, float]:
    t0 = time.perf_counter()
    m = _mapping(kind, nbytes)
    arena = np.frombuffer(m, np.uint8)
    base = int(arena.ctypes.data)
    madvise = _madvise_fn()
    assert madvise is not None
    t1 = time.perf_counter()
    piece = nbytes // threads
    with ThreadPoolExecutor(threads) as ex:
        codes = list(ex.map(lambda i: madvise(base + i * piece, piece, _MADV_POPULATE_WRITE), range(threads)))
    if any(codes):
        raise SystemExit(f"MADV_POPULATE_WRITE failed: {codes}")
    t2 = time.perf_counter()
    row = {"populate_s": t2 - t1, "map_s": t1 - t0}
    if dma is not None:
        dma.register(base, nbytes)
        t3 = time.perf_counter()
        dma.unregister(base)
        row.update(register_s=t3 - t2, unregister_s=time.perf_counter() - t3)
    del arena
    m.close()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--mib", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from rtp_jax.loader.cuda_dma import host_dma

    dma = host_dma()
    res: dict[str, Any] = {"host": host_settings(), "mib": args.mib, "cuda": dma is not None, "rows": {}}
    for kind in ("huge", "private", "shared"):
        for threads in (1, 8):
            rows = [one_setup(args.mib << 20, kind, threads, dma) for _ in range(args.repeats)]
            res["rows"][f"{kind} x{threads}"] = rows
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "probe_slot_setup.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res["host"], indent=1))
    keys = ("populate_s", "register_s", "unregister_s")
    print(f"| {args.mib} MiB | " + " | ".join(f"{k} (median)" for k in keys) + " |\n|---|---|---|---|")
    for name, rows in res["rows"].items():
        print(f"| {name} | " + " | ".join(f"{statistics.median(r.get(k, 0.0) for r in rows) * 1e3:.1f} ms"
                                          for k in keys) + " |")


if __name__ == "__main__":
    main()
