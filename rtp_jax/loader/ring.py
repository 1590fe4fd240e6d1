"""Staging through a ring of small pinned slots that stay in the CPU's last-level cache (the fast loader's
default on CUDA, `staging="ring"`).

The slab path stages every job in a 384 MiB pinned slab: the pread writes the slab and the DMA reads it back,
both from DRAM (the slab is larger than the cache), so each byte crosses host memory three times. Here each
of `threads` threads owns `slots` pinned slots of `chunk_bytes` (10 x 2 x 8 MiB = 160 MiB, well inside an
H200 host's 300 MiB L3): it preads a chunk into a slot and queues its DMA straight into the tensor's device
buffer at the chunk's offset; the slot is reused once that copy is done, so the DMA reads lines the pread
has just written, from the cache. Measured on the H200 host (bench/probe_ring_staging.py): pread into
reused 4 MiB buffers 80 GB/s against 41-43 GB/s into DRAM, and the whole read-and-copy of 16 GB at 49 GB/s
against the slab pipeline's ~22 GB/s. Copying into the final buffers also removes the slab path's row
pieces and their device-side joins. Only files already in the page cache take the ring (`copies.
choose_ring`): from disk, the slab's large parallel reads are faster.

`RingCopier` takes the jobs as `DirectJob`s (file byte ranges and the device buffers they fill, as the direct
path builds them): a feeder thread allocates each job's buffers (zero-filled by XLA, a few jobs ahead) and
queues its chunks in plan order; the ring threads copy them; `collect(job)` returns the job's buffers once
all its copies are done. The CUDA calls go through `HostDma` (`loader.cuda_dma`); tests drive the same code
with a host-memory stand-in.
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rtp_jax.loader.direct import DirectJob, HostDma, _zeros_fn, default_device
from rtp_jax.loader.reading import pread_into
from rtp_jax.loader.staging import _MADV_POPULATE_WRITE, _madvise_fn, anonymous_map


@dataclass(frozen=True)
class RingConfig:
    """`threads` copying threads, each with `slots` pinned slots of `chunk_bytes`. The defaults are the
    H200 host's best in the loader (bench/probe_ring_configs.py, 16 GB warm, medians of 5-6 in three
    calls once a chunk released the GIL only for its pread (1a6c6f9 on): 10 x 2 x 8 MiB 0.463, 0.539,
    0.562 s against 8 x 2 x 8 0.497, 0.560, 0.594; 12 x 2 x 8 0.566, 0.551; 16 x 2 x 8 0.691; 8 x 2 x 4
    0.579; the slab 0.707-0.756). Bare copies without the loader around them peaked at 12 x 2 x 4 MiB
    (bench/probe_ring_staging.py, 49 GB/s): in the loader each chunk also costs Python time under the
    GIL, which larger chunks amortize."""

    threads: int = 10
    slots: int = 2
    chunk_bytes: int = 8 << 20

    def __post_init__(self) -> None:
        for name in ("threads", "slots", "chunk_bytes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"RingConfig.{name} must be >= 1, got {getattr(self, name)!r}")


class _Progress:
    """One job's buffers and how many of its chunks are still to be copied."""

    def __init__(self) -> None:
        self.arrays: list[Any] = []
        self.left = 0
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._lock = threading.Lock()

    def chunk_done(self) -> None:
        with self._lock:
            self.left -= 1
            if self.left <= 0:
                self.done.set()

    def fail(self, error: BaseException) -> None:
        with self._lock:
            self.error = self.error or error


class Cancelled(RuntimeError):
    """The ring stopped before this job's copies were made (the load ended early)."""


class RingCopier:
    """Maps the ring's slots and pins thread 0's; `start(jobs)` then copies the jobs (in order) from the
    files to their device buffers through them (see the module docstring), each other ring thread first
    pinning its own slots. `collect(job)` blocks until the job's copies are done and returns its buffers
    (ranges x devices, in `DirectJob` order), or raises what failed it (e.g. a truncated file's
    ValueError). `cancel()` stops early (jobs not yet done raise `Cancelled`) once the copies in flight are
    done; `close()` cancels and unregisters the slots; call it once the consumer is done. Raises at
    construction if thread 0's slots cannot be registered (the caller then stages another way); a later
    thread whose slots cannot be registered leaves its share of the chunks to the others."""

    def __init__(self, dma: HostDma, config: RingConfig | None = None, alloc_ahead: int = 8) -> None:
        self.config = config = config or RingConfig()
        self.dma = dma
        self._jobs: list[DirectJob] = []
        self._alloc_ahead = alloc_ahead
        self._progress: dict[Any, _Progress] = {}
        self._stop = threading.Event()
        self._started = threading.Event()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.bytes = self.register_failures = 0
        self.wait_s = self.fill_wait_s = self.read_s = self.read_cpu_s = 0.0
        self.populate_s = self.register_s = 0.0  # summed over the threads that pinned their slots
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        # Each thread's slots are one page-aligned region: faulted in and registered by that thread, so the
        # 10 regions of the default ring are pinned in parallel as the copies start. Pinned all at once
        # beside the abstract model's build (before 2026-12-02), the 160 MiB fault-in and registration took
        # 0.05-0.07 s on the H200 host: longer than the build (0.02 s alone), and its fault-in held the
        # process's mmap lock, so the build's own mmaps waited for it (0.04-0.06 s).
        self._region = -(-config.slots * config.chunk_bytes // mmap.PAGESIZE) * mmap.PAGESIZE
        self._map = anonymous_map(config.threads * self._region)
        self._arena = np.frombuffer(self._map, np.uint8)
        self._base = int(self._arena.ctypes.data)
        self._madvise = _madvise_fn()
        self._registered: list[int] = []
        self._fds: dict[Path, int] = {}
        try:
            self._pin(0)
        except BaseException:
            self._release_memory()
            raise
        self.setup_s = time.perf_counter() - self._t0
        self._feeder: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        self._closed = False

    def _pin(self, t: int) -> None:
        """Faults thread `t`'s slots in for writing (one madvise call, without the GIL), then registers
        them. Faulted in first: a read-only registration of untouched memory would pin the shared zero
        page that it maps to for reads."""
        at = t * self._region
        address = self._base + at
        t0 = time.perf_counter()
        if self._madvise is None or self._madvise(address, self._region, _MADV_POPULATE_WRITE) != 0:
            self._arena[at:at + self._region:mmap.PAGESIZE] = 0
        t1 = time.perf_counter()
        self.dma.register(address, self._region)
        t2 = time.perf_counter()
        with self._lock:
            self._registered.append(address)
            self.populate_s += t1 - t0
            self.register_s += t2 - t1

    def start(self, jobs: list[DirectJob]) -> None:
        """Starts copying `jobs`, in order (once per copier)."""
        if self._feeder is not None or self._closed:
            raise RuntimeError("RingCopier.start is called once, before close")
        self._jobs = jobs
        self._progress = {job.key: _Progress() for job in jobs}
        self._fds = {p: os.open(p, os.O_RDONLY) for p in sorted({j.path for j in jobs})}
        self._feeder = threading.Thread(target=self._feed, name="rtp-ring-feed", daemon=True)
        self._threads = [threading.Thread(target=self._copy_loop, args=(t,), name=f"rtp-ring-{t}",
                                          daemon=True) for t in range(self.config.threads)]
        try:
            self._feeder.start()
            for th in self._threads:
                th.start()
        finally:
            self._started.set()  # threads that did start must not wait for the others forever

    # ---- the feeder: buffers, then chunks ------------------------------------------------------
    def _allocate(self, job: DirectJob) -> list[Any]:
        return [_zeros_fn(shape, np.dtype(dtype), default_device() if d is None else d)()
                for _, _, bufs in job.ranges for shape, dtype, d in bufs]

    def _feed(self) -> None:
        allocated: dict[int, list[Any]] = {}
        try:
            for i, job in enumerate(self._jobs):
                if self._stop.is_set():
                    break
                progress = self._progress[job.key]
                try:
                    for j in range(i, min(len(self._jobs), i + self._alloc_ahead)):
                        if j not in allocated:
                            allocated[j] = self._allocate(self._jobs[j])
                    chunks = self._chunks(job, progress, allocated.pop(i))
                except BaseException as e:  # noqa: BLE001 - this job fails; the ring goes on
                    progress.fail(e)
                    progress.done.set()
                    continue
                progress.left = len(chunks)
                if not chunks:
                    progress.done.set()
                for c in chunks:
                    self._queue.put(c)
        finally:
            for _ in self._threads:
                self._queue.put(None)

    def _chunks(self, job: DirectJob, progress: _Progress, arrays: list[Any]) -> list[tuple[Any, ...]]:
        """The job's chunks as the ring threads take them: (progress, fd, file offset, bytes,
        [(device, device address)]), once its zero-filled buffers are ready."""
        t0 = time.perf_counter()
        for a in arrays:
            a.block_until_ready()  # XLA's fill must land before our copies do
        self.fill_wait_s += time.perf_counter() - t0
        progress.arrays = arrays
        chunk, fd = self.config.chunk_bytes, self._fds[job.path]
        chunks: list[tuple[Any, ...]] = []
        at = 0
        for start, nbytes, bufs in job.ranges:
            dsts = [(default_device() if d is None else d, a.unsafe_buffer_pointer())
                    for (_, _, d), a in zip(bufs, arrays[at:at + len(bufs)], strict=True)]
            at += len(bufs)
            chunks += [(progress, fd, start + o, min(chunk, nbytes - o), [(d, p + o) for d, p in dsts])
                       for o in range(0, nbytes, chunk)]
        return chunks

    # ---- the ring threads ----------------------------------------------------------------------
    def _settle(self, pending: list[Any], s: int) -> None:
        """Waits for slot `s`'s copies and counts its chunk as done."""
        item, pending[s] = pending[s], None
        if item is None:
            return
        handles, progress, n = item
        t0 = time.perf_counter()
        try:
            for h in handles:
                self.dma.wait(h)
        except BaseException as e:  # noqa: BLE001 - the job fails; the ring goes on
            progress.fail(e)
        with self._lock:
            self.wait_s += time.perf_counter() - t0
            self.bytes += n * len(handles)
        progress.chunk_done()

    def _copy_loop(self, t: int) -> None:
        cfg = self.config
        if t:
            # Pinning only once every thread exists: a fault-in holds the mmap lock, which the next thread's
            # stack mapping would wait for (the copies' set-up took 0.02-0.03 s longer on the H200 host).
            self._started.wait()
            try:
                self._pin(t)
            except BaseException:  # noqa: BLE001 - the other threads take this one's chunks
                with self._lock:
                    self.register_failures += 1
                return
        first = t * self._region
        pending: list[Any] = [None] * cfg.slots
        turn = 0
        read_s = read_cpu_s = 0.0  # a pread's wall time less its CPU time: waiting (GIL, scheduler, I/O)
        try:
            while not self._stop.is_set():
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    # The feeder is behind: finish what is in flight so its jobs complete meanwhile.
                    for s in range(cfg.slots):
                        self._settle(pending, s)
                    item = self._queue.get()
                if item is None:
                    break
                progress, fd, offset, n, dsts = item
                s, turn = turn, (turn + 1) % cfg.slots
                self._settle(pending, s)
                if progress.error is not None or self._stop.is_set():
                    progress.chunk_done()
                    continue
                at = first + s * cfg.chunk_bytes
                try:
                    w0, c0 = time.perf_counter(), time.thread_time()
                    pread_into(fd, memoryview(self._arena[at:at + n]), offset)
                    read_s += time.perf_counter() - w0
                    read_cpu_s += time.thread_time() - c0
                    src = self._base + at
                    handles = [self.dma.copy_async(device, [(ptr, src, n)], lane=t) for device, ptr in dsts]
                except BaseException as e:  # noqa: BLE001 - e.g. a truncated file: the job fails
                    progress.fail(e)
                    progress.chunk_done()
                    continue
                pending[s] = (handles, progress, n)
        finally:
            for s in range(cfg.slots):
                self._settle(pending, s)
            with self._lock:
                self.read_s += read_s
                self.read_cpu_s += read_cpu_s

    # ---- the consumer's side -------------------------------------------------------------------
    def collect(self, job: DirectJob) -> list[Any]:
        progress = self._progress[job.key]
        progress.done.wait()
        del self._progress[job.key]
        if progress.error is not None:
            raise progress.error
        return progress.arrays

    def stats(self) -> dict[str, Any]:
        return {"ring_bytes": self.bytes, "ring_setup_s": self.setup_s, "ring_populate_s": self.populate_s,
                "ring_register_s": self.register_s, "ring_register_failures": self.register_failures,
                "ring_copy_wait_s": self.wait_s,
                "ring_read_s": self.read_s, "ring_read_cpu_s": self.read_cpu_s,
                "ring_fill_wait_s": self.fill_wait_s}

    def cancel(self) -> None:
        """Stops copying: waits for the copies in flight (their buffers must outlive them), then fails every
        job not done yet with `Cancelled`, so whoever waits for one returns. The slots stay registered."""
        self._stop.set()
        if self._feeder is not None:
            self._feeder.join()
        for th in self._threads:
            th.join()
        for progress in list(self._progress.values()):
            if not progress.done.is_set():
                progress.fail(Cancelled("the load stopped before this tensor was copied"))
                progress.done.set()

    def close(self) -> None:
        """`cancel`, then unregisters and frees the slots (once)."""
        if self._closed:
            return
        self._closed = True
        self.cancel()
        try:
            for address in self._registered:
                self.dma.unregister(address)
        finally:
            for fd in self._fds.values():
                os.close(fd)
            self._release_memory()

    def _release_memory(self) -> None:
        del self._arena
        try:
            self._map.close()
        except BufferError:  # a view is still alive somewhere; the mapping goes with it
            pass
