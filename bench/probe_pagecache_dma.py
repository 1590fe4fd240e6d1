"""Can the warm load DMA straight from the page cache? Measured on the GPU machine.

    python3 bench/probe_pagecache_dma.py --out $OUT [--gib 8]

The loader's warm path moves every byte three times through host memory (page cache -> pinned slab by
pread, slab -> GPU by DMA). PJRT's `dma_map` cannot pin a read-only file mapping (it registers with write
access), but the CUDA driver can (`cuMemHostRegister` with CU_MEMHOSTREGISTER_READ_ONLY, where the device
reports attribute 113). Once a range is registered, a host-to-device copy from it is a DMA. XLA does not
stage transfers of >= 1 GiB through its own pinned buffer, so `jax.device_put` of a 1 GiB view of a
registered mapping should DMA from the page cache. This probe checks each step and times:
  register: cuMemHostRegister(READ_ONLY) of fresh mappings, 1 GiB per call, by 1 / 4 / 8 threads;
  put_registered: device_put of 1 GiB views, each as soon as its range is registered (pipelined);
  put_pageable: the same views unregistered (the driver's pageable path);
  memcpy_pieces: our own cuMemcpyHtoDAsync of 32 MiB pieces into XLA buffers (jnp.zeros), registered;
  slice: cutting a 1 GiB device buffer into bf16 tensors (jitted dynamic_slice + bitcast).
Every transfer is checked against the file's bytes at sampled offsets.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

GIB = 1 << 30
READ_ONLY, PORTABLE = 0x08, 0x01


class Cuda:
    """The few driver calls the probe needs, in the primary context XLA uses."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        self.check(self.lib.cuInit(0), "cuInit")
        dev = ctypes.c_int()
        self.check(self.lib.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
        self.dev = dev
        self.ctx = ctypes.c_void_p()
        self.check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(self.ctx), dev), "cuDevicePrimaryCtxRetain")
        self.lib.cuMemcpyHtoDAsync_v2.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t,
                                                  ctypes.c_void_p]

    def check(self, r: int, what: str) -> None:
        if r:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(r, ctypes.byref(name))
            raise RuntimeError(f"{what}: {name.value!r} ({r})")

    def attribute(self, attr: int) -> int:
        v = ctypes.c_int()
        self.check(self.lib.cuDeviceGetAttribute(ctypes.byref(v), attr, self.dev), "cuDeviceGetAttribute")
        return v.value

    def current(self) -> None:
        self.check(self.lib.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")

    def register(self, addr: int, n: int, flags: int = READ_ONLY | PORTABLE) -> None:
        self.current()
        r = self.lib.cuMemHostRegister_v2(ctypes.c_void_p(addr), ctypes.c_size_t(n), ctypes.c_uint(flags))
        self.check(r, "cuMemHostRegister")

    def unregister(self, addr: int) -> None:
        self.current()
        self.check(self.lib.cuMemHostUnregister(ctypes.c_void_p(addr)), "cuMemHostUnregister")

    def stream(self) -> ctypes.c_void_p:
        self.current()
        s = ctypes.c_void_p()
        self.check(self.lib.cuStreamCreate(ctypes.byref(s), 1), "cuStreamCreate")
        return s

    def h2d(self, dst: int, src: int, n: int, stream: ctypes.c_void_p) -> None:
        self.check(self.lib.cuMemcpyHtoDAsync_v2(dst, src, n, stream), "cuMemcpyHtoDAsync")

    def sync(self, stream: ctypes.c_void_p) -> None:
        self.check(self.lib.cuStreamSynchronize(stream), "cuStreamSynchronize")


def write_files(folder: Path, gib: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, 64 << 20, dtype=np.uint8)
    paths = []
    for i in range(max(1, gib // 4)):
        p = folder / f"part{i}.bin"
        with open(p, "wb") as f:
            for j in range(4 * 16):  # 4 GiB in 64 MiB blocks, each block distinct
                f.write((block ^ np.uint8((i * 64 + j) % 251)).tobytes())
        paths.append(p)
    os.sync()
    return paths


def resident_fraction(m: mmap.mmap, n: int) -> tuple[float, float]:
    libc = ctypes.CDLL(None, use_errno=True)
    addr = np.frombuffer(m, np.uint8).ctypes.data
    vec = (ctypes.c_ubyte * ((n + 4095) // 4096))()
    t0 = time.perf_counter()
    r = libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(n), vec)
    dt = time.perf_counter() - t0
    if r:
        return -1.0, dt
    return float((np.frombuffer(vec, np.uint8) & 1).mean()), dt


def chunks_of(paths: list[Path]) -> list[tuple[mmap.mmap, np.ndarray, int]]:
    """Fresh read-only mappings, as (mapping, 1 GiB uint8 view, address) per GiB."""
    out = []
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        os.close(fd)
        for off in range(0, len(m) - GIB + 1, GIB):
            v = np.frombuffer(m, np.uint8, GIB, off)
            out.append((m, v, v.ctypes.data))
    return out


def close(chunks: list[tuple[mmap.mmap, np.ndarray, int]]) -> None:
    maps = {id(m): m for m, _, _ in chunks}
    chunks.clear()
    for m in maps.values():
        try:
            m.close()
        except BufferError:
            pass


def verify(dev_array: Any, host: np.ndarray, rng: np.random.Generator, n: int = 4) -> bool:
    ok = True
    for off in rng.integers(0, len(host) - 4096, n):
        off = int(off) // 4096 * 4096
        ok &= bool(np.array_equal(np.asarray(dev_array[off:off + 4096]), host[off:off + 4096]))
    return ok


def contention(cuda: Cuda, paths: list[Path], res: dict[str, Any], out: Path) -> None:
    """Copy rates (32 MiB pieces, 12 threads, preallocated XLA buffers) from pinned page-cache pages
    alone, while another file is being pinned, while one is being unpinned, and from a huge-page anonymous
    buffer; and the loader's per-piece path (allocate + copy + sync) alone."""
    import jax
    import jax.numpy as jnp

    piece, chunk = 32 << 20, 256 << 20
    maps = []
    for p in paths[:2]:
        fd = os.open(p, os.O_RDONLY)
        maps.append(mmap.mmap(fd, 0, access=mmap.ACCESS_READ))
        os.close(fd)
    addr = [np.frombuffer(m, np.uint8).ctypes.data for m in maps]
    size = min(len(m) for m in maps) // chunk * chunk
    zeros = jax.jit(lambda: jnp.zeros((piece,), jnp.uint8))
    dsts = [zeros() for _ in range(size // piece)]
    for d in dsts:
        d.block_until_ready()
    ptrs = [d.unsafe_buffer_pointer() for d in dsts]
    streams = [cuda.stream() for _ in range(12)]

    def pin(base: int, threads: int = 4) -> float:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(lambda o: cuda.register(base + o, chunk), range(0, size, chunk)))
        return time.perf_counter() - t0

    def unpin(base: int) -> float:
        t0 = time.perf_counter()
        for o in range(0, size, chunk):
            cuda.unregister(base + o)
        return time.perf_counter() - t0

    def copy_all(base: int, alloc: bool = False) -> float:
        def one(i: int) -> None:
            s = streams[i % 12]
            dst = ptrs[i]
            if alloc:
                d = zeros()
                d.block_until_ready()
                dst = d.unsafe_buffer_pointer()
            cuda.h2d(dst, base + i * piece, piece, s)
            cuda.sync(s)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(12) as ex:
            list(ex.map(one, range(size // piece)))
        return size / (time.perf_counter() - t0) / 1e9

    res["size_GiB"] = size / GIB
    res["pin_A_s"] = pin(addr[0])
    res["copy_A_alone_GBps"] = [copy_all(addr[0]) for _ in range(3)]
    res["copy_A_alloc_GBps"] = [copy_all(addr[0], alloc=True) for _ in range(2)]
    with ThreadPoolExecutor(1) as ex:
        f = ex.submit(pin, addr[1])
        res["copy_A_while_pinning_B_GBps"] = copy_all(addr[0])
        res["pin_B_during_copy_s"] = f.result()
    with ThreadPoolExecutor(1) as ex:
        f = ex.submit(unpin, addr[1])
        res["copy_A_while_unpinning_B_GBps"] = copy_all(addr[0])
        res["unpin_B_during_copy_s"] = f.result()
    res["unpin_A_s"] = unpin(addr[0])
    anon = mmap.mmap(-1, size)
    anon.madvise(mmap.MADV_HUGEPAGE)
    buf = np.frombuffer(anon, np.uint8)
    buf[::4096] = 1
    res["pin_anon_s"] = pin(buf.ctypes.data)
    res["copy_anon_hugepage_GBps"] = [copy_all(buf.ctypes.data) for _ in range(3)]
    res["unpin_anon_s"] = unpin(buf.ctypes.data)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as ex:
        madv = ctypes.CDLL(None).madvise
        madv.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        list(ex.map(lambda o: madv(addr[1] + o, chunk, 22), range(0, size, chunk)))  # POPULATE_READ
    res["populate_B_s"] = time.perf_counter() - t0
    res["pin_B_populated_s"] = pin(addr[1])
    res["unpin_B_populated_s"] = unpin(addr[1])
    res["pin_B_1thread_s"] = pin(addr[1], threads=1)
    res["unpin_B_again_s"] = unpin(addr[1])
    (out / "probe_pagecache_contention.json").write_text(json.dumps(res, indent=1))


def alignment(cuda: Cuda, paths: list[Path], res: dict[str, Any], out: Path) -> None:
    """Copy rates of 32 MiB pieces (12 threads) from a pinned page-cache range whose source address is
    off a page boundary by `src` bytes, into device buffers at offset `dst` bytes."""
    import jax
    import jax.numpy as jnp

    piece, size = 32 << 20, 2 * GIB
    fd = os.open(paths[0], os.O_RDONLY)
    m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    os.close(fd)
    base = np.frombuffer(m, np.uint8).ctypes.data
    cuda.register(base, size + GIB // 2)
    zeros = jax.jit(lambda: jnp.zeros((piece + 8192,), jnp.uint8))
    dsts = [zeros() for _ in range(size // piece)]
    for d in dsts:
        d.block_until_ready()
    ptrs = [d.unsafe_buffer_pointer() for d in dsts]
    streams = [cuda.stream() for _ in range(12)]
    n = piece - 8192

    def rate(src: int, dst: int) -> float:
        def one(i: int) -> None:
            s = streams[i % 12]
            cuda.h2d(ptrs[i] + dst, base + i * piece + src, n, s)
            cuda.sync(s)

        best = 0.0
        for _ in range(2):
            t0 = time.perf_counter()
            with ThreadPoolExecutor(12) as ex:
                list(ex.map(one, range(size // piece)))
            best = max(best, n * (size // piece) / (time.perf_counter() - t0) / 1e9)
        return best

    for src, dst in [(0, 0), (8, 0), (8, 8), (64, 0), (64, 64), (256, 0), (256, 256), (2048, 0), (2048, 2048),
                     (4096 - 8, 0), (2, 0), (2, 2)]:
        res[f"copy_src{src}_dst{dst}_GBps"] = rate(src, dst)
        print(src, dst, round(res[f"copy_src{src}_dst{dst}_GBps"], 1), flush=True)
    cuda.unregister(base)
    (out / "probe_pagecache_alignment.json").write_text(json.dumps(res, indent=1))


def main() -> None:
    res: dict[str, Any] = {}
    try:
        run(res)
    except Exception as e:  # noqa: BLE001 - record how far it got
        res["error"] = repr(e)
        raise
    finally:
        print(json.dumps(res, indent=1), flush=True)


def run(res: dict[str, Any]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--gib", type=int, default=8)
    ap.add_argument("--folder", default="/var/tmp/rtp_dma_probe")
    ap.add_argument("--alignment", action="store_true",
                    help="instead: copy rates by source / destination misalignment")
    ap.add_argument("--reread", action="store_true",
                    help="drop the page cache and read the files back (as a cold load leaves them) first")
    ap.add_argument("--contention", action="store_true",
                    help="instead: copy rates alone and while other ranges are pinned / unpinned")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import jax
    import jax.numpy as jnp

    dev = jax.devices()[0]
    jnp.zeros(8).block_until_ready()  # the backend (and its primary context) first
    res["device"] = dev.device_kind
    res["jax"] = jax.__version__
    cuda = Cuda()
    res["read_only_register_supported"] = cuda.attribute(113)
    res["pageable_uses_host_page_tables"] = cuda.attribute(100)
    t0 = time.perf_counter()
    paths = write_files(Path(args.folder), args.gib)
    res["write_s"] = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    if args.reread:
        from rtp_jax.bench_cli import disk_read, drop_page_cache

        res["reread_drop"] = drop_page_cache(paths)
        res["reread_GBps"] = (lambda nb_s: nb_s[0] / nb_s[1] / 1e9)(disk_read(paths, 16, 64 << 20))
    if args.contention:
        contention(cuda, paths, res, out)
        return
    if args.alignment:
        alignment(cuda, paths, res, out)
        return

    chunks = chunks_of(paths)
    frac, dt = resident_fraction(chunks[0][0], len(chunks[0][0]))
    res["mincore_resident"], res["mincore_s_per_4GiB"] = frac, dt
    total = len(chunks) * GIB

    # register: fresh mappings each time, 1 GiB per call
    for threads in (1, 4, 8):
        chunks = chunks_of(paths)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(lambda c: cuda.register(c[2], GIB), chunks))
        reg = time.perf_counter() - t0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as ex:
            list(ex.map(lambda c: cuda.unregister(c[2]), chunks))
        res[f"register_{threads}t_GBps"] = total / reg / 1e9
        res[f"unregister_{threads}t_s"] = time.perf_counter() - t0
        close(chunks)
    print({k: v for k, v in res.items() if k.startswith(("register", "unregister", "read_only"))}, flush=True)

    # put_registered: register in 8 threads, device_put each GiB as soon as it is pinned
    for trial in range(3):
        chunks = chunks_of(paths)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as ex:
            futs = [ex.submit(cuda.register, a, GIB) for _, _, a in chunks]
            arrays = []
            for f, (_, v, _) in zip(futs, chunks, strict=True):
                f.result()
                arrays.append(jax.device_put(v, dev))
            for a in arrays:
                a.block_until_ready()
        dt = time.perf_counter() - t0
        res.setdefault("put_registered_GBps", []).append(total / dt / 1e9)
        if trial == 0:
            res["put_registered_verified"] = all(verify(a, v, rng) for a, (_, v, _) in zip(arrays, chunks,
                                                                                           strict=True))
        for _, _, a in chunks:
            cuda.unregister(a)
        del arrays
        close(chunks)

    # put_pageable: the same views, unregistered
    chunks = chunks_of(paths)
    t0 = time.perf_counter()
    arrays = [jax.device_put(v, dev) for _, v, _ in chunks[:2]]
    for a in arrays:
        a.block_until_ready()
    res["put_pageable_GBps"] = 2 * GIB / (time.perf_counter() - t0) / 1e9
    del arrays
    close(chunks)

    # memcpy_pieces: our copies of 32 MiB pieces into XLA buffers, 4 streams
    piece = 32 << 20
    zeros = jax.jit(lambda: jnp.zeros((piece,), jnp.uint8))
    zeros().block_until_ready()
    streams = [cuda.stream() for _ in range(4)]
    for trial in range(2):
        chunks = chunks_of(paths)
        t0 = time.perf_counter()
        dsts = [zeros() for _ in range(total // piece)]
        for d in dsts:
            d.block_until_ready()
        t_alloc = time.perf_counter() - t0
        with ThreadPoolExecutor(8) as ex:
            futs = [ex.submit(cuda.register, a, GIB) for _, _, a in chunks]
            i = 0
            for f, (_, _, a) in zip(futs, chunks, strict=True):
                f.result()
                for off in range(0, GIB, piece):
                    cuda.h2d(dsts[i].unsafe_buffer_pointer(), a + off, piece, streams[i % 4])
                    i += 1
            for s in streams:
                cuda.sync(s)
        dt = time.perf_counter() - t0
        res.setdefault("memcpy_pieces_GBps", []).append(total / dt / 1e9)
        res.setdefault("memcpy_pieces_alloc_s", []).append(t_alloc)
        if trial == 0:
            v = chunks[0][1]
            res["memcpy_pieces_verified"] = bool(np.array_equal(np.asarray(dsts[1][:4096]),
                                                                 v[piece:piece + 4096]))
        for _, _, a in chunks:
            cuda.unregister(a)
        del dsts
        close(chunks)

    # slice: a 1 GiB device buffer cut into [4096, 4096] bf16 tensors
    flat = jax.device_put(np.zeros(GIB, np.uint8), dev)
    shape = (4096, 4096)
    n = 2 * shape[0] * shape[1]

    @jax.jit
    def cut(buf: Any, off: Any) -> Any:
        raw = jax.lax.dynamic_slice(buf, (off,), (n,)).reshape(-1, 2)
        return jax.lax.bitcast_convert_type(raw, jnp.bfloat16).reshape(shape)

    t0 = time.perf_counter()
    cut(flat, np.int64(0)).block_until_ready()
    res["slice_compile_s"] = time.perf_counter() - t0
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        outs = [cut(flat, np.int64(k * n)) for k in range(GIB // n)]
        for o in outs:
            o.block_until_ready()
        ts.append(time.perf_counter() - t0)
    res["slice_1GiB_s"] = statistics.median(ts)
    res["slice_count"] = GIB // n

    for k in ("put_registered_GBps", "memcpy_pieces_GBps"):
        res[k + "_median"] = statistics.median(res[k])
    (out / "probe_pagecache_dma.json").write_text(json.dumps(res, indent=1))
    print("| what | figure |\n|---|---|")
    for k in ("read_only_register_supported", "register_1t_GBps", "register_8t_GBps", "unregister_8t_s",
              "put_registered_GBps_median", "put_registered_verified", "put_pageable_GBps",
              "memcpy_pieces_GBps_median", "memcpy_pieces_verified", "slice_1GiB_s", "slice_compile_s"):
        print(f"| {k} | {res.get(k)} |")


if __name__ == "__main__":
    main()
