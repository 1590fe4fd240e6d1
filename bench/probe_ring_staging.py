"""Can a warm load stage through a small, cache-resident pinned ring instead of the 384 MiB slab?

    python3 bench/probe_ring_staging.py --out $OUT --ckpt /var/tmp/llama3-8b [--baseline]

The loader's warm path reads the page cache into a pinned slab (pread), then DMAs the slab to the GPU
(`jax.device_put` of 32 MiB row pieces, joined on the device). Every byte crosses host memory three times:
page cache read, slab write, slab read by the DMA. If each reader thread instead owns a few pinned slots of a
few MiB and the DMA reads a slot right after the pread filled it, the slot may still sit in the CPU's last
level cache (PCIe reads of cached lines are served from the cache), so only the page-cache read would touch
DRAM. This probe measures, on the checkpoint's own files (treated as byte streams, one device buffer each):
  host_pread: N threads pread C-byte chunks into a per-thread reused buffer (cache-resident for small C)
      or into consecutive places of a 1 GiB ring (DRAM);
  ring: N threads, each with K pinned slots of C bytes; per chunk: wait for the slot's last copy, pread,
      cuMemcpyHtoDAsync into the file's device buffer at the chunk's offset, record an event;
  loader (--baseline): `load_model_state` as `rtp-jax bench load` times it warm, in the same process.
Every ring pass is checked against the file bytes at sampled offsets. Host facts (CPU, caches, NUMA, the
GPU's NUMA node) go in the JSON; the table of GB/s is printed last.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import mmap
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe_pagecache_dma import Cuda  # noqa: E402  (the probe's driver calls)

MIB = 1 << 20
_EVENT_FLAGS = 0x1 | 0x2  # CU_EVENT_BLOCKING_SYNC | CU_EVENT_DISABLE_TIMING: waiters sleep, not spin


def host_facts() -> dict[str, Any]:
    def sh(cmd: str) -> str:
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=20).stdout[-4000:]
        except Exception as e:  # noqa: BLE001 - a missing tool is a fact too
            return repr(e)

    return {"lscpu": sh("lscpu"), "nodes": sh("ls /sys/devices/system/node/ | grep node; "
                                              "cat /sys/devices/system/node/node*/cpulist"),
            "gpu_numa": sh("for b in $(nvidia-smi --query-gpu=pci.bus_id --format=csv,noheader); do "
                           "b=$(echo $b | tr A-Z a-z); cat /sys/bus/pci/devices/*${b#0000}/numa_node; done"),
            "topo": sh("nvidia-smi topo -m"), "thp": sh("cat /sys/kernel/mm/transparent_hugepage/enabled"),
            "pcie": sh("nvidia-smi --query-gpu=pcie.link.gen.current,pcie.link.width.current --format=csv"),
            "meminfo": sh("head -5 /proc/meminfo")}


def chunk_plan(sizes: list[int], chunk: int) -> list[tuple[int, int, int]]:
    """(file index, offset, nbytes) of every chunk, file by file."""
    return [(i, off, min(chunk, n - off)) for i, n in enumerate(sizes) for off in range(0, n, chunk)]


def host_pread(fds: list[int], sizes: list[int], threads: int, chunk: int, ring: bool) -> float:
    """GB/s of preads of every file's bytes by `threads` threads into reused per-thread buffers (ring=False)
    or consecutive places of a 1 GiB ring (ring=True)."""
    plan = chunk_plan(sizes, chunk)
    counter = itertools.count()
    big = np.empty(1 << 30, np.uint8) if ring else None
    if big is not None:
        big[::4096] = 0
    nslots = (1 << 30) // chunk

    def work(t: int) -> None:
        own = np.empty(chunk, np.uint8)
        own[::4096] = 0
        while (i := next(counter)) < len(plan):
            f, off, n = plan[i]
            buf = memoryview(big[(i % nslots) * chunk:][:n] if big is not None else own[:n])
            got = 0
            while got < n:
                got += os.preadv(fds[f], [buf[got:]], off + got)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(work, range(threads)))
    return sum(sizes) / (time.perf_counter() - t0) / 1e9


class Ring:
    """N threads x K pinned slots of C bytes (one registered arena), copying chunks of the files into one
    device buffer per file."""

    def __init__(self, cuda: Cuda, threads: int, slots: int, chunk: int, hugepage: bool) -> None:
        self.cuda, self.threads, self.slots, self.chunk = cuda, threads, slots, chunk
        size = threads * slots * chunk
        self.map = mmap.mmap(-1, size)
        if hugepage:
            self.map.madvise(mmap.MADV_HUGEPAGE)
        self.arena = np.frombuffer(self.map, np.uint8)
        self.arena[::4096] = 0
        self.base = int(self.arena.ctypes.data)
        t0 = time.perf_counter()
        cuda.register(self.base, size, flags=0x01)  # PORTABLE
        self.register_s = time.perf_counter() - t0
        cuda.current()
        self.streams = [cuda.stream() for _ in range(threads)]
        self.events = []
        for _ in range(threads * slots):
            e = ctypes.c_void_p()
            cuda.check(cuda.lib.cuEventCreate(ctypes.byref(e), _EVENT_FLAGS), "cuEventCreate")
            self.events.append(e)

    def run(self, fds: list[int], sizes: list[int], dst: list[int]) -> dict[str, float]:
        plan = chunk_plan(sizes, self.chunk)
        counter = itertools.count()
        lib, cuda = self.cuda.lib, self.cuda
        waits = [0.0] * self.threads

        def work(t: int) -> None:
            cuda.current()
            stream = self.streams[t]
            used = [False] * self.slots
            j = 0
            while (i := next(counter)) < len(plan):
                f, off, n = plan[i]
                s = j % self.slots
                ev = self.events[t * self.slots + s]
                if used[s]:
                    w0 = time.perf_counter()
                    cuda.check(lib.cuEventSynchronize(ev), "cuEventSynchronize")
                    waits[t] += time.perf_counter() - w0
                addr = self.base + (t * self.slots + s) * self.chunk
                buf = memoryview(self.arena[addr - self.base:addr - self.base + n])
                got = 0
                while got < n:
                    got += os.preadv(fds[f], [buf[got:]], off + got)
                cuda.h2d(dst[f] + off, addr, n, stream)
                cuda.check(lib.cuEventRecord(ev, stream), "cuEventRecord")
                used[s] = True
                j += 1
            for st in range(self.slots):
                if used[st]:
                    cuda.check(lib.cuEventSynchronize(self.events[t * self.slots + st]), "cuEventSynchronize")

        t0 = time.perf_counter()
        with ThreadPoolExecutor(self.threads) as ex:
            list(ex.map(work, range(self.threads)))
        dt = time.perf_counter() - t0
        return {"GBps": sum(sizes) / dt / 1e9, "seconds": dt, "wait_s_mean": statistics.mean(waits)}

    def close(self) -> None:
        self.cuda.unregister(self.base)
        for e in self.events:
            self.cuda.lib.cuEventDestroy_v2(e)
        del self.arena
        self.map.close()


def verify(cuda: Cuda, dst: list[int], paths: list[Path], rng: np.random.Generator, n: int = 6) -> bool:
    """Sampled 8 KiB ranges of each device buffer (read back by the driver: jax indexing is int32) equal
    the file's bytes."""
    ok = True
    cuda.lib.cuMemcpyDtoH_v2.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t]
    cuda.current()
    for f, p in enumerate(paths):
        size = p.stat().st_size
        with open(p, "rb") as fh:
            for off in [0, size - 8192, *rng.integers(0, max(1, size - 8192), n)]:
                off = int(off)
                fh.seek(off)
                want = np.frombuffer(fh.read(8192), np.uint8)
                got = np.empty_like(want)
                cuda.check(cuda.lib.cuMemcpyDtoH_v2(got.ctypes.data, dst[f] + off, len(want)), "cuMemcpyDtoH")
                ok &= bool(np.array_equal(got, want))
    return ok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt", required=True, help="a safetensors checkpoint directory (bench/synth_ckpt.py)")
    ap.add_argument("--baseline", action="store_true", help="also time the loader warm in this process")
    ap.add_argument("--configs", default="8x2x4,12x2x4,16x2x4,8x2x2,16x2x2,12x2x8,12x3x4,12x2x16,12x2x32,"
                    "16x2x1,6x2x4", help="threads x slots x MiB per chunk, comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-pread", action="store_true", help="skip the host-only pread table")
    ap.add_argument("--loader-variants", default="384:32",
                    help="baseline loader runs as max_inflight MiB : split MiB, comma-separated")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"host": host_facts(), "host_pread": {}, "ring": {}}
    rows: list[tuple[str, float, str]] = []

    import jax
    import jax.numpy as jnp

    paths = sorted(Path(args.ckpt).glob("*.safetensors"))
    sizes = [p.stat().st_size for p in paths]
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    res["bytes"] = sum(sizes)
    for p in paths:  # warm the page cache
        with open(p, "rb") as fh:
            while fh.read(256 * MIB):
                pass
    try:
        pread_cfgs = ((16, 64, True), (16, 4, False), (12, 4, False), (16, 2, False), (16, 8, False),
                      (8, 4, False), (16, 4, True))
        for threads, chunk, ring in () if args.skip_pread else pread_cfgs:
            key = f"{threads}x{chunk}MiB_{'dram' if ring else 'reuse'}"
            gbps = [host_pread(fds, sizes, threads, chunk * MIB, ring) for _ in range(2)]
            res["host_pread"][key] = gbps
            rows.append((f"pread {key}", max(gbps), ""))
            print(f"pread {key}: {gbps}", flush=True)

        cuda = Cuda()
        dev = [jnp.zeros((n,), jnp.uint8) for n in sizes]
        jax.block_until_ready(dev)
        dst = [d.unsafe_buffer_pointer() for d in dev]
        rng = np.random.default_rng(0)
        for cfg in args.configs.split(","):
            threads, slots, mib = (int(x) for x in cfg.split("x"))
            for huge in (True,):
                ring = Ring(cuda, threads, slots, mib * MIB, huge)
                try:
                    runs = [ring.run(fds, sizes, dst) for _ in range(args.repeats)]
                finally:
                    ring.close()
                ok = verify(cuda, dst, paths, rng)
                key = f"{cfg}{'_huge' if huge else ''}"
                res["ring"][key] = {"runs": runs, "verified": ok, "register_s": ring.register_s}
                best = max(r["GBps"] for r in runs)
                rows.append((f"ring {key}", best, f"median {statistics.median(r['GBps'] for r in runs):.1f}, "
                             f"wait {statistics.median(r['wait_s_mean'] for r in runs):.3f} s, ok={ok}"))
                print(f"ring {key}: {runs} ok={ok}", flush=True)
                # Fresh zeros: the next config must rewrite every byte for its check to mean anything.
                dev = [jnp.zeros((n,), jnp.uint8) for n in sizes]
                jax.block_until_ready(dev)
                dst = [d.unsafe_buffer_pointer() for d in dev]
        del dev
        if args.baseline:
            from rtp_jax.bench_cli import fast_load

            res["loader_warm"] = {}
            fast_load(Path(args.ckpt), jnp.bfloat16)  # warm-up: programs compiled
            for v in args.loader_variants.split(","):
                inflight, split = (int(x) for x in v.split(":"))
                kw = {"max_inflight_bytes": inflight * MIB, "split_bytes": split * MIB}
                loads = [fast_load(Path(args.ckpt), jnp.bfloat16, **kw) for _ in range(args.repeats)]
                res["loader_warm"][v] = [{k: x for k, x in r.items() if isinstance(x, (int, float, str))}
                                         for r in loads]
                secs = [r["seconds"] for r in loads]
                rows.append((f"loader warm, slab {inflight} MiB, pieces {split} MiB",
                             sum(sizes) / statistics.median(secs) / 1e9,
                             f"median {statistics.median(secs):.3f} s, pipeline "
                             f"{statistics.median(r['pipeline_s'] for r in loads):.3f} s"))
                print(rows[-1], flush=True)
    finally:
        for fd in fds:
            os.close(fd)
        (out / "probe_ring_staging.json").write_text(json.dumps(res, indent=1, default=str))
        print(res["host"]["lscpu"][:1500])
        print(res["host"]["nodes"], res["host"]["gpu_numa"], res["host"]["pcie"], res["host"]["thp"])
        print("| path | GB/s (best) | notes |\n|---|---|---|")
        for name, gbps, note in rows:
            print(f"| {name} | {gbps:.1f} | {note} |")


if __name__ == "__main__":
    main()
