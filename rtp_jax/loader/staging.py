"""Host staging buffers of the fast loader: the reused, pre-faulted `StagingSlab` (first-fit allocator,
optional registration with the device runtime for direct DMA) and `_MappedRange`, an mmap of a file range
faulted in by parallel MADV_POPULATE_READ, used while the slab is not ready or for jobs larger than it.
Both are about where a job's host bytes live until their transfer completes; no reading logic here."""

from __future__ import annotations

import mmap
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

_PAGE = 4096
_MADV_POPULATE_READ, _MADV_POPULATE_WRITE = 22, 23  # Linux >= 5.14; not exported by the mmap module


class StagingSlab:
    """One page-aligned host buffer of `size` bytes, faulted in once and reused by every tensor of a load.

    `alloc(n)` returns the offset of a free page-aligned range of n bytes (first fit; blocks until one is
    free, so requests must be <= `max_alloc`), `view(offset, n)` a uint8 view of it, `free(offset)` gives
    it back. `prepare(client)` faults the slab in (and, with a client, registers it with the device
    runtime: pinned, e.g. cudaHostRegister through PJRT `DmaMap`, so `jax.device_put` of a view DMAs
    straight from it instead of first copying into the runtime's own pinned staging buffer) one segment of
    `segment_bytes` at a time; each segment can be allocated from as soon as it is ready, so a load run
    with `prepare` in the background starts after the first segment instead of the whole slab. Ranges
    never span two segments (each segment is its own registration, and a transfer must lie within one).
    Reusing one faulted-in buffer instead of a fresh one per tensor saves the page faults and zeroing of
    every loaded byte.
    """

    def __init__(self, size: int, populate_threads: int = 8, segment_bytes: int = 0,
                 prepare: bool = True) -> None:
        self.size = max(_PAGE, -(-int(size) // _PAGE) * _PAGE)
        seg = -(-int(segment_bytes) // _PAGE) * _PAGE
        self.segment_bytes = seg if 0 < seg < self.size else self.size
        self._map = anonymous_map(self.size)
        self.array = np.frombuffer(self._map, np.uint8)
        self.address = int(self.array.ctypes.data)
        self.populate_threads = populate_threads
        self.setup_s = self.first_segment_s = 0.0
        self.in_use = self.peak = 0
        self._free: list[tuple[int, int]] = []  # sorted (start, end) holes in ready segments
        self._used: dict[int, int] = {}  # start -> end
        self._cv = threading.Condition()
        self._client: Any = None
        self._registered: list[int] = []  # addresses of the dma-mapped segments
        if prepare:
            self.prepare()

    @property
    def max_alloc(self) -> int:
        """The largest request `alloc` accepts: one segment."""
        return self.segment_bytes

    def prepare(self, client: Any = None) -> None:
        """Faults in each segment, registers it for direct DMA with `client` (a jax backend; skipped where
        unsupported, e.g. UNIMPLEMENTED on the CPU backend), and makes it allocatable. Whatever fails,
        every segment ends up allocatable (unregistered ones are still correct staging memory)."""
        t0 = time.perf_counter()
        start = 0
        try:
            for start in range(0, self.size, self.segment_bytes):
                end = min(self.size, start + self.segment_bytes)
                _populate(self.array[start:end], self.populate_threads)
                if client is not None:
                    try:
                        client.dma_map(self.address + start, end - start)
                        self._client = client
                        self._registered.append(self.address + start)
                    except Exception:  # noqa: BLE001 - not supported here: plain staging memory
                        client = None
                self._add_ready(start, end)
                if start == 0:
                    self.first_segment_s = time.perf_counter() - t0
                start = end
        finally:
            if start < self.size:
                self._add_ready(start, self.size)
            self.setup_s = time.perf_counter() - t0

    def dma_map(self, client: Any) -> bool:
        """Registers the whole (prepared) slab for direct DMA with `client`; False where unsupported."""
        t0 = time.perf_counter()
        try:
            client.dma_map(self.address, self.size)
        except Exception:  # noqa: BLE001 - e.g. UNIMPLEMENTED on the CPU backend
            return False
        self._client = client
        self._registered = [self.address]
        self.setup_s += time.perf_counter() - t0
        return True

    @property
    def dma_mapped(self) -> bool:
        return self._client is not None

    def _add_ready(self, start: int, end: int) -> None:
        with self._cv:
            self._free = sorted([*self._free, (start, end)])
            self._cv.notify_all()

    def _fit(self, n: int) -> int | None:
        for i, (a, b) in enumerate(self._free):
            if b - a >= n:
                self._free[i:i + 1] = [(a + n, b)] if a + n < b else []
                self._used[a] = a + n
                return a
        return None

    def alloc(self, n: int) -> int:
        n = max(_PAGE, -(-n // _PAGE) * _PAGE)
        if n > self.max_alloc:
            raise ValueError(f"{n} bytes do not fit a staging slab segment of {self.max_alloc} bytes")
        with self._cv:
            while (off := self._fit(n)) is None:
                self._cv.wait()
            self.in_use += n
            self.peak = max(self.peak, self.in_use)
            return off

    def free(self, offset: int) -> None:
        with self._cv:
            end = self._used.pop(offset)
            self.in_use -= end - offset
            holes = sorted([*self._free, (offset, end)])
            merged: list[tuple[int, int]] = []
            for a, b in holes:
                if merged and merged[-1][1] == a and a % self.segment_bytes:  # not across a segment edge
                    merged[-1] = (merged[-1][0], b)
                else:
                    merged.append((a, b))
            self._free = merged
            self._cv.notify_all()

    def view(self, offset: int, n: int) -> np.ndarray:
        return self.array[offset:offset + n]

    def close(self) -> None:
        if self._client is not None:
            for address in self._registered:
                try:
                    self._client.dma_unmap(address)
                except Exception:  # noqa: BLE001 - best effort at teardown
                    pass
            self._client = None
        del self.array
        try:
            self._map.close()
        except BufferError:  # a caller still holds a view; the mapping goes with it
            pass


def anonymous_map(size: int) -> mmap.mmap:
    """An anonymous private mapping of `size` bytes, backed by huge pages where the kernel allows (fewer
    page faults to fill it and fewer pages to pin). Private, not `mmap.mmap(-1, n)`'s default MAP_SHARED:
    shared anonymous memory is shmem, which takes huge pages only under `shmem_enabled` (usually never);
    on a CPU box with the H200 host's kernel (6.18), 128 MiB faulted in in ~7 ms private with huge pages,
    ~45 ms private without and ~80 ms shared (bench/probe_slot_setup.py)."""
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    m = mmap.mmap(-1, size, flags=flags) if flags else mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m.madvise(mmap.MADV_HUGEPAGE)
        except (OSError, ValueError):
            pass
    return m


def _populate(buf: np.ndarray, threads: int) -> None:
    """Faults in every page of `buf` from `threads` threads (MADV_POPULATE_WRITE through libc, which
    releases the GIL; else a write to each page)."""
    import ctypes

    piece = max(_PAGE, -(-len(buf) // max(1, threads) // _PAGE) * _PAGE)
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        madvise = None

    def one(start: int) -> None:
        part = buf[start:start + piece]
        if madvise is None or not populate_write(int(part.ctypes.data), len(part), madvise):
            part[::_PAGE] = 0

    with ThreadPoolExecutor(max(1, threads)) as ex:
        list(ex.map(one, range(0, len(buf), piece)))


POPULATE_PIECE = 4 << 20


def populate_write(address: int, nbytes: int, madvise: Callable[[int, int, int], int],
                   piece: int = POPULATE_PIECE) -> bool:
    """Faults in [address, address + nbytes) for writing by `MADV_POPULATE_WRITE` calls of at most `piece`
    bytes; False if one fails (the caller then writes to each page). The kernel holds the process's mmap
    lock through each call, and any other thread's mmap or munmap (Python's allocator growing, a thread's
    stack) waits for it: one call over 320 MiB kept a 1 MiB mmap in another thread waiting for all of it
    (14 of 17 ms on a CPU box), and the ring's 160 MiB fault-in in one call made the abstract model's build
    beside it take 0.055-0.064 s on the H200 host against 0.020 s alone (the ring now pins per thread,
    `loader.ring`); pieces of a few MiB keep each wait short."""
    for offset in range(0, nbytes, piece):
        if madvise(address + offset, min(piece, nbytes - offset), _MADV_POPULATE_WRITE) != 0:
            return False
    return True


def _madvise_fn() -> Callable[[int, int, int], int] | None:
    """libc `madvise(addr, length, advice)` through ctypes (which releases the GIL), or None."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


class _MappedRange:
    """A read-only mmap of bytes [start, start + nbytes) of a file, faulted in by parallel
    MADV_POPULATE_READ calls of `chunk` bytes (reads from disk when cold, maps page-cache pages when
    warm); `array` is the uint8 view. `close()` unmaps it (or leaves it to the GC while a view lives)."""

    def __init__(self, fd: int, start: int, nbytes: int, readers: ThreadPoolExecutor, chunk: int) -> None:
        base = start - start % mmap.ALLOCATIONGRANULARITY
        self._map = mmap.mmap(fd, nbytes + start - base, offset=base, access=mmap.ACCESS_READ)
        self.array = np.frombuffer(self._map, np.uint8, nbytes, start - base)
        whole = np.frombuffer(self._map, np.uint8)
        addr, size = int(whole.ctypes.data), len(whole)
        del whole
        self.lo, self.hi = addr, addr + size
        madvise = _madvise_fn()
        if madvise is not None and size:
            step = max(_PAGE, chunk // _PAGE * _PAGE)
            futs = [readers.submit(madvise, addr + o, min(step, size - o), _MADV_POPULATE_READ)
                    for o in range(0, size, step)]
            for f in futs:
                f.result()  # a failure (old kernel) only means pages fault in during the copy

    def close(self) -> None:
        del self.array
        try:
            self._map.close()
        except BufferError:
            pass
