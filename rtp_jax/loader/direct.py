"""Transfers straight from the page cache (opt-in: `FastLoader(direct=True)`): a warm checkpoint's file
pages are pinned where they are and copied to the devices by DMA, instead of being read into the staging
slab first.

The slab path moves every byte three times through host memory (page cache -> slab by pread, slab ->
device by DMA). When a file already sits in the page cache, its pages can be pinned in place: CUDA
registers a read-only file mapping with `cuMemHostRegister(CU_MEMHOSTREGISTER_READ_ONLY)` (where the
device reports CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED), after which a host-to-device copy
from it is one DMA. PJRT's `dma_map` cannot do this (it registers with write access, which a read-only
mapping refuses), so the copies go through the driver: into device buffers that XLA allocated (zeros,
made ready before the copy), on our own streams, complete before the array is handed on.

`PageCacheSource` maps the plan's resident files and pins them in `chunk_bytes` pieces ahead of the jobs
(pages mapped first by parallel MADV_POPULATE_READ); `DirectCopier` queues every job's copies in order from
one thread; the loader's workers only wait for their job's copies. Everything CUDA-specific is in
`loader.cuda_dma` (`CudaHostDma`; `host_dma()` returns it where it works and None elsewhere: CPU, ROCm, an
old driver). Tests drive the same code with a host-memory stand-in for the driver.

Measured on an H200 host (bench/notes_bench.md, 2026-12-01 ninth session): copies from pinned page-cache
pages run at 54 GB/s alone, but at 29-41 GB/s while other pages are being pinned, and pinning runs at ~20-42
GB/s; in the loader the whole 16 GB took 1.18 s warm against 0.70 s through the slab, hence opt-in.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from rtp_jax.loader.reading import PlannedTensor
from rtp_jax.loader.shards import _device_keys, _is_full, _Job, _row_bytes
from rtp_jax.loader.transfer import _key_devices

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_MADV_POPULATE_READ = 22  # Linux >= 5.14


@dataclass(frozen=True)
class DirectConfig:
    """How the loader's direct path runs: files pinned in pieces of `chunk_bytes` by `pin_threads`
    threads, their pages mapped first by `populate_threads` (0: by the pinning itself); at most
    `window_bytes` pinned at once (None: everything, unpinned after the pass); `share` of the resident
    bytes copied directly, the rest read through the slab beside them: interleaved tensor by tensor, or
    with `tail`, the last `share` of the plan direct (pinned while the slab reads the first part)."""

    chunk_bytes: int = 256 << 20
    window_bytes: int | None = None
    pin_threads: int = 2
    populate_threads: int = 8
    share: float = 1.0
    tail: bool = False


class HostDma(Protocol):
    """Pinning host ranges and copying from them to a device (`CudaHostDma`, or a test stand-in)."""

    def register(self, address: int, nbytes: int) -> None: ...

    def unregister(self, address: int) -> None: ...

    def copy_async(self, device: Any, copies: list[tuple[int, int, int]], lane: int | None = None) -> Any:
        """Starts copying each (device address, host address, bytes) to `device`, on the caller's own
        stream for `lane` (None: a shared one); returns a handle."""
        ...

    def wait(self, handle: Any) -> None:
        """Returns once the copies of `copy_async`'s `handle` are done."""
        ...


def resident(mapping: mmap.mmap, samples: int = 256, window: int = 16 * _PAGE) -> bool:
    """Whether a file mapping's pages are in the page cache, judged by `mincore` over `samples` windows
    spread over it (the whole file would take ~30 ms per 4 GiB). Unknown (no mincore): False."""
    size = len(mapping)
    if size == 0:
        return False
    try:  # PyDLL keeps the GIL: each call takes microseconds, and re-taking a released GIL can wait for
        mincore = ctypes.PyDLL(None, use_errno=True).mincore  # the abstract model's build (ms each)
    except (OSError, AttributeError):
        return False
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    base = _address(mapping)
    step = max(window, size // samples // _PAGE * _PAGE)
    vec = (ctypes.c_ubyte * (window // _PAGE))()
    for start in range(0, size, step):
        n = min(window, size - start)
        if mincore(base + start, n, vec) != 0:
            return False
        if not all(vec[i] & 1 for i in range(-(-n // _PAGE))):
            return False
    return True


def file_resident(path: Path) -> bool:
    """Whether a (non-empty) file's pages sit in the page cache: `resident` over a fresh mapping of it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if not os.fstat(fd).st_size:
            return False
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as m:
            return resident(m)
    finally:
        os.close(fd)


def _address(mapping: mmap.mmap) -> int:
    view = np.frombuffer(mapping, np.uint8)
    try:
        return int(view.ctypes.data)
    finally:
        del view


class PageCacheSource:
    """The plan's files that sit in the page cache, mapped read-only and pinned chunk by chunk ahead of
    the jobs that copy from them.

    `expect(path, start, nbytes)` (before `start()`) counts a future use of a byte range; `start()` sets
    `threads` pinning threads going through the used chunks in the order they were first expected (the
    jobs' order); `acquire` waits until the chunks a range touches are pinned and returns its (host
    address, bytes) pieces, split at chunk edges (a copy must lie within one registration); `release`
    ends one use. With `window_bytes` (None: no limit) at most that much is pinned at once, and a chunk
    whose uses are all over is unpinned right away by a background thread, its pages dropped from this
    process (they stay in the page cache); without it everything stays pinned until `close`, because
    unpinning beside the copies slows them (H200 host: 54 GB/s of copies alone, 41 GB/s beside an unpin
    or a pin) and pinning is the costly step (~30-50 GB/s, fastest in large calls from 1-2 threads).
    The pages are the page cache's own, so pinning them all adds no memory, only keeps them from being
    reclaimed until `close`. If pinning fails, `failed` says why, every waiting `acquire` raises, and the
    loader reads the rest from the files. `close` stops the threads, unpins whatever is pinned and unmaps."""

    def __init__(self, paths: Iterable[Path], dma: HostDma, chunk_bytes: int = 256 << 20,
                 window_bytes: int | None = None, threads: int = 2, populate_threads: int = 8) -> None:
        self.dma = dma
        self.chunk_bytes = max(_PAGE, chunk_bytes // _PAGE * _PAGE)
        # a job may span two chunks, so a window holds at least three
        self.window_bytes = None if window_bytes is None else max(window_bytes, 3 * self.chunk_bytes)
        self.threads = max(1, threads)
        self.populate_threads = populate_threads
        self._populated: dict[tuple[Path, int], Any] = {}
        self._populator: Any = None
        self.maps: dict[Path, mmap.mmap] = {}
        self.bases: dict[Path, int] = {}
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if os.fstat(fd).st_size else None
            finally:
                os.close(fd)
            if m is not None and resident(m):
                self.maps[p], self.bases[p] = m, _address(m)
            elif m is not None:
                m.close()
        self.files = len(self.maps)
        self._uses: dict[tuple[Path, int], int] = {}  # insertion order: the order jobs need them
        self._ready: dict[tuple[Path, int], threading.Event] = {}
        self._pinned: set[tuple[Path, int]] = set()  # registered and not yet handed to the unpinner
        self._cv = threading.Condition()
        self._next = 0
        self._stopped = False
        self._workers: list[threading.Thread] = []
        self._unpins: queue.SimpleQueue[tuple[Path, int] | None] = queue.SimpleQueue()
        self._madvise = _libc_fn("madvise")
        self.register_s = self.unregister_s = self.wait_s = self.copy_s = 0.0
        self.pinned = self.peak_pinned = self.bytes = 0
        self.failed: str | None = None

    def __contains__(self, path: Path) -> bool:
        return path in self.maps and self.failed is None

    def _chunks(self, start: int, nbytes: int) -> range:
        return range(start // self.chunk_bytes, -(-(start + nbytes) // self.chunk_bytes))

    def _span(self, path: Path, k: int) -> tuple[int, int]:
        lo = k * self.chunk_bytes
        return lo, min(len(self.maps[path]), lo + self.chunk_bytes)

    def count(self, nbytes: int, copy_s: float = 0.0) -> None:
        with self._cv:
            self.bytes += nbytes
            self.copy_s += copy_s

    def stats(self) -> dict[str, Any]:
        return {"direct_bytes": self.bytes, "direct_files": self.files, "pin_busy_s": self.register_s,
                "unpin_busy_s": self.unregister_s, "pin_wait_s": self.wait_s,
                "copy_busy_s": self.copy_s, "pinned_peak_bytes": self.peak_pinned,
                "direct_failed": self.failed}

    def expect(self, path: Path, start: int, nbytes: int) -> None:
        ks = self._chunks(start, nbytes)
        for k in ks:
            self._uses[path, k] = self._uses.get((path, k), 0) + 1
        if self.window_bytes is not None:  # the job holding the oldest chunk must be able to get all its own
            self.window_bytes = max(self.window_bytes, (len(ks) + 1) * self.chunk_bytes)

    def start(self) -> None:
        self._order = list(self._uses)
        self._ready = {key: threading.Event() for key in self._order}
        if self.populate_threads > 0 and self._madvise is not None:
            # Mapping the pages in parallel first leaves the pinning threads only the pinning to do
            # (fresh mappings pin at ~16-30 GB/s per thread on an H200 host, populated ones ~50).
            from concurrent.futures import ThreadPoolExecutor

            self._populator = ThreadPoolExecutor(self.populate_threads, thread_name_prefix="rtp-populate")
            for key in self._order:
                lo, hi = self._span(*key)
                self._populated[key] = self._populator.submit(self._madvise, self.bases[key[0]] + lo, hi - lo,
                                                              _MADV_POPULATE_READ)
        self._workers = [threading.Thread(target=self._pin_loop, name=f"rtp-pin-{i}", daemon=True)
                         for i in range(self.threads)]
        self._workers.append(threading.Thread(target=self._unpin_loop, name="rtp-unpin", daemon=True))
        for w in self._workers:
            w.start()

    def _pin_loop(self) -> None:
        while True:
            with self._cv:
                limit = self.window_bytes
                while (not self._stopped and self._next < len(self._order) and self.pinned
                       and limit is not None and self.pinned + self.chunk_bytes > limit):
                    self._cv.wait()
                if self._stopped or self._next >= len(self._order):
                    return
                path, k = self._order[self._next]
                self._next += 1
                lo, hi = self._span(path, k)
                self.pinned += hi - lo  # reserved before the call, so the window holds
                self.peak_pinned = max(self.peak_pinned, self.pinned)
            populated = self._populated.get((path, k))
            if populated is not None:
                populated.result()  # a failure (an old kernel) only means the pinning maps the pages
            t0 = time.perf_counter()
            try:
                self.dma.register(self.bases[path] + lo, hi - lo)
            except Exception as e:  # noqa: BLE001 - surfaced through `failed` and every acquire
                with self._cv:
                    self.pinned -= hi - lo
                    self.failed = self.failed or f"pinning {path.name} [{lo}, {hi}): {e}"
                    self._stopped = True
                    self._cv.notify_all()
                for event in self._ready.values():
                    event.set()
                return
            with self._cv:
                self.register_s += time.perf_counter() - t0
                self._pinned.add((path, k))
            self._ready[path, k].set()

    def _unpin_loop(self) -> None:
        while (key := self._unpins.get()) is not None:
            path, k = key
            lo, hi = self._span(path, k)
            t0 = time.perf_counter()
            try:
                self.dma.unregister(self.bases[path] + lo)
                if self._madvise is not None:  # the pages leave this process's RSS, not the page cache
                    self._madvise(self.bases[path] + lo, hi - lo, _MADV_DONTNEED)
            finally:
                with self._cv:
                    self.unregister_s += time.perf_counter() - t0
                    self.pinned -= hi - lo
                    self._cv.notify_all()

    def acquire(self, path: Path, start: int, nbytes: int) -> list[tuple[int, int]]:
        base, pieces = self.bases[path], []
        for k in self._chunks(start, nbytes):
            if not self._ready[path, k].is_set():
                t0 = time.perf_counter()
                self._ready[path, k].wait()
                with self._cv:
                    self.wait_s += time.perf_counter() - t0
            if (path, k) not in self._pinned:  # woken by a failure before this chunk was pinned
                raise RuntimeError(self.failed or "chunk not pinned")
            lo, hi = self._span(path, k)
            a, b = max(lo, start), min(hi, start + nbytes)
            pieces.append((base + a, b - a))
        return pieces

    def release(self, path: Path, start: int, nbytes: int) -> None:
        for k in self._chunks(start, nbytes):
            with self._cv:
                left = self._uses[path, k] = self._uses[path, k] - 1
                done = left == 0 and (path, k) in self._pinned and self.window_bytes is not None
                if done:
                    self._pinned.discard((path, k))
            if done:
                self._unpins.put((path, k))

    def stop(self) -> None:
        """Stops pinning and wakes every `acquire` still waiting (it raises for a chunk not pinned)."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        for w in self._workers[:-1]:
            w.join()
        for event in self._ready.values():
            event.set()

    def close(self) -> None:
        """Stops pinning, waits for the threads, unpins every chunk still pinned, unmaps the files."""
        self.stop()
        if self._populator is not None:
            self._populator.shutdown(wait=True, cancel_futures=True)
        with self._cv:  # chunks whose jobs went elsewhere (a failure, an early exit) are still pinned
            left, self._pinned = sorted(self._pinned, key=str), set()
        for key in left:
            self._unpins.put(key)
        self._unpins.put(None)
        if self._workers:
            self._workers[-1].join()
        for m in self.maps.values():
            try:
                m.close()
            except BufferError:  # a view is still alive; the mapping goes with it
                pass
        self.maps.clear()

def _libc_fn(name: str) -> Callable[..., int] | None:
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


@functools.lru_cache(maxsize=256)
def _zeros_fn(shape: tuple[int, ...], dtype: np.dtype, device: Any) -> Any:
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=jax.sharding.SingleDeviceSharding(device))


def default_device() -> Any:
    import jax

    return jax.config.jax_default_device or jax.local_devices()[0]


@dataclass(frozen=True)
class DirectJob:
    """One job's copies: file byte ranges of `path` and, for each, the (shape, dtype, device) buffers it
    fills (device None: the default device)."""

    key: Any
    path: Path
    ranges: tuple[tuple[int, int, tuple[tuple[tuple[int, ...], np.dtype, Any], ...]], ...]

    @property
    def nbytes(self) -> int:
        return sum(n * len(bufs) for _, n, bufs in self.ranges)


class DirectCopier:
    """Submits the direct jobs' copies from one thread, in job order, ahead of the workers, which only
    wait for their job's copies to finish (`collect`).

    For each job it allocates zero-filled device buffers (an XLA program on the compute stream, dispatched
    a few jobs ahead so the fills have run when the copies are queued), waits for the job's chunks to be
    pinned, and queues its copies (`HostDma.copy_async`); at most `ahead_bytes` are submitted and not yet
    collected. Queuing from one thread keeps the copy engine fed whatever the workers are doing: a worker
    that allocated, copied and synchronized its own job kept ~3 copies in flight on an H200 host (18 GB/s,
    against 54 GB/s for the same copies queued back to back). A pinning failure fails the job it hit and
    every later one (`collect` raises; the loader reads those from the files)."""

    def __init__(self, source: PageCacheSource, jobs: list[DirectJob], ahead_bytes: int = 2 << 30,
                 alloc_ahead: int = 8) -> None:
        self.source = source
        self._jobs = jobs
        self._ahead = ahead_bytes
        self._alloc_ahead = alloc_ahead
        self._done: dict[Any, threading.Event] = {job.key: threading.Event() for job in jobs}
        self._results: dict[Any, tuple[list[Any], list[Any]] | BaseException] = {}
        self._cv = threading.Condition()
        self._outstanding = 0
        self._stopped = False
        self.fill_wait_s = self.submit_s = 0.0
        self._thread = threading.Thread(target=self._run, name="rtp-direct-copy", daemon=True)
        self._thread.start()

    def _allocate(self, job: DirectJob) -> list[Any]:
        return [_zeros_fn(shape, np.dtype(dtype), default_device() if d is None else d)()
                for _, _, bufs in job.ranges for shape, dtype, d in bufs]

    def _run(self) -> None:
        allocated: dict[int, list[Any]] = {}
        failed: BaseException | None = None
        for i, job in enumerate(self._jobs):
            with self._cv:
                while not (self._stopped or not self._outstanding
                           or self._outstanding + job.nbytes <= self._ahead):
                    self._cv.wait()
                if self._stopped:
                    return
                self._outstanding += job.nbytes
            if failed is not None:
                self._finish(job, failed)
                continue
            for j in range(i, min(len(self._jobs), i + self._alloc_ahead)):
                if j not in allocated:
                    allocated[j] = self._allocate(self._jobs[j])
            arrays = allocated.pop(i)
            handles = []
            try:
                t0 = time.perf_counter()
                for a in arrays:
                    a.block_until_ready()  # XLA's fill must land before our copy does
                t1 = time.perf_counter()
                at = 0
                for start, nbytes, bufs in job.ranges:
                    pieces = self.source.acquire(job.path, start, nbytes)
                    for (_, _, d), dst in zip(bufs, arrays[at:at + len(bufs)], strict=True):
                        ptr, copies = dst.unsafe_buffer_pointer(), []
                        for src, n in pieces:
                            copies.append((ptr, src, n))
                            ptr += n
                        device = default_device() if d is None else d
                        handles.append(self.source.dma.copy_async(device, copies))
                    at += len(bufs)
                self.fill_wait_s += t1 - t0
                self.submit_s += time.perf_counter() - t1
            except BaseException as e:  # noqa: BLE001 - this job and the later ones go back to the files
                for h in handles:  # copies already queued must land before their buffers can be freed
                    self.source.dma.wait(h)
                failed = e
                self._finish(job, e)
                continue
            self._finish(job, (arrays, handles))

    def _finish(self, job: DirectJob, result: tuple[list[Any], list[Any]] | BaseException) -> None:
        with self._cv:
            self._results[job.key] = result
        self._done[job.key].set()

    def collect(self, job: DirectJob) -> list[Any]:
        """The job's buffers (ranges x devices, in order) once its copies are done; raises what made its
        submission fail."""
        self._done[job.key].wait()
        with self._cv:
            result = self._results.pop(job.key)
        try:
            if isinstance(result, BaseException):
                raise RuntimeError(f"direct copy not made: {result}") from result
            arrays, handles = result
            t0 = time.perf_counter()
            for h in handles:
                self.source.dma.wait(h)
            self.source.count(job.nbytes, time.perf_counter() - t0)
            for start, nbytes, _ in job.ranges:
                self.source.release(job.path, start, nbytes)
            return arrays
        finally:
            with self._cv:
                self._outstanding -= job.nbytes
                self._cv.notify_all()

    def close(self) -> None:
        """Stops submitting and waits for every submitted copy (their source pages get unpinned next)."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        self._thread.join()
        with self._cv:
            left, self._results = list(self._results.values()), {}
        for result in left:
            if not isinstance(result, BaseException):
                for h in result[1]:
                    try:
                        self.source.dma.wait(h)
                    except Exception:  # noqa: BLE001 - best effort at teardown
                        pass


def direct_job(job: _Job, sharding: Any) -> DirectJob:
    """The copies of a loader job: each row range's bytes into one buffer per device that holds it."""
    t = job.tensor
    shape = t.entry.shape
    ranges = []
    for key, r0, r1, _ in job.ranges:
        start, nbytes = _byte_range(t, r0, r1)
        bufs = tuple(((r1 - r0, *shape[1:]) if shape else (), t.entry.dtype, d)
                     for d in _key_devices(t, sharding, key))
        ranges.append((start, nbytes, bufs))
    return DirectJob(id(job), t.path, tuple(ranges))


def _byte_range(t: PlannedTensor, r0: int, r1: int) -> tuple[int, int]:
    """(file offset, bytes) of rows [r0, r1) of `t`."""
    rb = _row_bytes(t)
    return t.entry.start + r0 * rb, (r1 - r0) * rb


def direct_result(job: _Job, sharding: Any, arrays: list[Any]) -> tuple[Any, int]:
    """A job's result as the host path makes it (the jax.Array of a whole tensor, or (shard key, first
    row, {device: rows}) for a piece) from its filled buffers (`direct_job` order); and bytes sent."""
    import jax

    t = job.tensor
    shape = t.entry.shape
    outs: dict[Any, dict[Any, Any]] = {}
    nsent, i = 0, 0
    for key, r0, r1, _ in job.ranges:
        devices = _key_devices(t, sharding, key)
        outs[key] = dict(zip(devices, arrays[i:i + len(devices)], strict=True))
        i += len(devices)
        nsent += _byte_range(t, r0, r1)[1] * len(devices)
    if job.parts > 1:
        ((key, r0, _, _),) = job.ranges
        return (key, r0, outs[key]), nsent
    if sharding is None or not shape:
        ((only,),) = (tuple(o.values()) for o in outs.values())
        return only, nsent
    singles = [outs[key][d] for d, key in _device_keys(t, sharding)]
    return jax.make_array_from_single_device_arrays(shape, sharding, singles), nsent


def open_page_cache(plan: list[PlannedTensor], direct: bool | HostDma, config: DirectConfig
                    ) -> PageCacheSource | None:
    """The plan's resident files mapped for direct DMA; None when `direct` is False, the runtime cannot
    pin read-only memory (`host_dma()`), or no file is resident."""
    if direct is False or not plan:
        return None
    from rtp_jax.loader.cuda_dma import host_dma

    dma = host_dma() if direct is True else direct
    if dma is None:
        return None
    source = PageCacheSource(sorted({t.path for t in plan}), dma, chunk_bytes=config.chunk_bytes,
                             window_bytes=config.window_bytes, threads=config.pin_threads,
                             populate_threads=config.populate_threads)
    if not source.maps:
        source.close()
        return None
    return source


def choose_direct(plan: list[PlannedTensor], source: PageCacheSource | None,
                  reads: dict[str, dict[Any, Any]], config: DirectConfig) -> set[str]:
    """Names of the tensors copied from the page cache: those that can be (resident file, bytes to copy,
    whole rows per shard in `reads`), and of those about `config.share` of the bytes (interleaved tensor
    by tensor, or the last ones with `config.tail`)."""
    if source is None:
        return set()
    ok = [t for t in plan if t.path in source and t.nbytes > 0
          and all(_is_full(rest, t.entry.shape) for _, _, rest in reads[t.name].values())]
    out, sent, seen = set(), 0, 0
    if config.tail:
        start = (1 - config.share) * sum(t.nbytes for t in ok)
        for t in ok:
            if seen + t.nbytes / 2 >= start:
                out.add(t.name)
            seen += t.nbytes
        return out
    for t in ok:
        seen += t.nbytes
        if sent + t.nbytes <= config.share * seen + t.nbytes / 2:
            out.add(t.name)
            sent += t.nbytes
    return out
