"""Fast safetensors loading: parallel readers in file-offset order, a bounded pipeline, and each tensor
placed straight into its target sharding.

    loader = FastLoader(path, num_readers=16, max_inflight_bytes=256 << 20)
    for name, array in loader.iter_device(sharding_for=fn, dtype=jnp.bfloat16):   # jax.Array, placed
        ...
    for name, array in loader.iter_host():     # numpy, same as iter_safetensors, read ahead in parallel
        ...
    graphdef, state = load_model_state(path, config, jnp.bfloat16, sharding_for=fn)  # any format

The pipeline: one producer walks the tensors in (file, offset) order and reserves each tensor's bytes
from a budget before anything is read; a pool of tensor workers reads the tensor (large ones split
into chunks read by a second pool of readers with `os.preadv`, or viewed through `mmap`), sends it to
its device(s), converts the dtype on the device and waits for the transfer; only then are its bytes
returned to the budget. So host memory in flight never exceeds `max_inflight_bytes` (a tensor
larger than the budget goes through alone), and reading, conversion and host-to-device copies of
different tensors overlap.

`iter_device` stages host bytes in one reused, pre-faulted slab (`StagingSlab`, `staging="slab"`) that is
registered with the device runtime (`client.dma_map`), so a transfer is one DMA from it instead of a copy
into the runtime's own pinned buffer; a range of the slab is reused once its transfer is complete.
Tensors larger than `split_bytes` (32 MiB) are read and sent in row pieces, each its own job in the
pipeline, and joined on the device (one jitted concatenate + cast), so the slab can be small (256 MiB:
~60 ms to fault in and register) without a second host copy of any tensor.

Sharded placement reads only what this process's devices hold: for each distinct shard index of
`sharding.addressable_devices_indices_map(shape)`, the rows of axis 0 it covers are read (exactly its
bytes when only axis 0 is split; the covering rows, then a slice, otherwise) and sent to the devices
that hold that shard; the global array is assembled with `jax.make_array_from_single_device_arrays`.
"""

from __future__ import annotations

import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rtp_jax.loader.safetensors_io import TensorEntry, checkpoint_files, read_header

ShardingFor = Callable[[str, tuple[int, ...]], Any]  # (name, shape) -> jax.sharding.Sharding | None

_MAX_PREAD = 1 << 30  # Linux caps one read at ~2 GiB; stay well under


# ---- budget --------------------------------------------------------------------------------------
class ByteBudget:
    """A counting semaphore over bytes, with the peak in use recorded (the instrumented counter).

    `acquire(n)` blocks until n bytes are free; a request larger than the limit waits until nothing
    else is in flight, then goes alone (so `peak <= max(limit, largest request)`).
    """

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"max_inflight_bytes must be positive, got {limit}")
        self.limit = int(limit)
        self.in_use = 0
        self.peak = 0
        self._cv = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self.in_use == 0 or self.in_use + n <= self.limit)
            self.in_use += n
            self.peak = max(self.peak, self.in_use)

    def release(self, n: int) -> None:
        with self._cv:
            self.in_use -= n
            assert self.in_use >= 0, "ByteBudget released more than it acquired"
            self._cv.notify_all()


# ---- staging -------------------------------------------------------------------------------------
_PAGE = 4096
_MADV_POPULATE_READ, _MADV_POPULATE_WRITE = 22, 23  # Linux >= 5.14; not exported by the mmap module


class StagingSlab:
    """One page-aligned host buffer of `size` bytes, faulted in once and reused by every tensor of a load.

    `alloc(n)` returns the offset of a free page-aligned range of n bytes (first fit; blocks until one is
    free, so requests must be <= size), `view(offset, n)` a uint8 view of it, `free(offset)` gives it back.
    With `dma_map(client)` the slab is registered with the device runtime (pinned, e.g. cudaHostRegister
    through PJRT `DmaMap`), and `jax.device_put` of a view then DMAs straight from it instead of first
    copying into the runtime's own pinned staging buffer. Reusing one faulted-in buffer instead of a fresh
    one per tensor saves the page faults and zeroing of every loaded byte.
    """

    def __init__(self, size: int, populate_threads: int = 8) -> None:
        self.size = max(_PAGE, -(-int(size) // _PAGE) * _PAGE)
        self._map = mmap.mmap(-1, self.size)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self._map.madvise(mmap.MADV_HUGEPAGE)
            except (OSError, ValueError):
                pass
        t0 = time.perf_counter()
        self.array = np.frombuffer(self._map, np.uint8)
        self.address = int(self.array.ctypes.data)
        _populate(self.array, populate_threads)
        self.setup_s = time.perf_counter() - t0
        self.in_use = self.peak = 0
        self._free: list[tuple[int, int]] = [(0, self.size)]  # sorted (start, end) holes
        self._used: dict[int, int] = {}  # start -> end
        self._cv = threading.Condition()
        self._client: Any = None

    def dma_map(self, client: Any) -> bool:
        """Registers the slab for direct DMA with `client` (a jax backend); False where unsupported."""
        t0 = time.perf_counter()
        try:
            client.dma_map(self.address, self.size)
        except Exception:  # noqa: BLE001 - e.g. UNIMPLEMENTED on the CPU backend
            return False
        self._client = client
        self.setup_s += time.perf_counter() - t0
        return True

    @property
    def dma_mapped(self) -> bool:
        return self._client is not None

    def _fit(self, n: int) -> int | None:
        for i, (a, b) in enumerate(self._free):
            if b - a >= n:
                self._free[i:i + 1] = [(a + n, b)] if a + n < b else []
                self._used[a] = a + n
                return a
        return None

    def alloc(self, n: int) -> int:
        n = max(_PAGE, -(-n // _PAGE) * _PAGE)
        if n > self.size:
            raise ValueError(f"{n} bytes do not fit a {self.size}-byte staging slab")
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
                if merged and merged[-1][1] == a:
                    merged[-1] = (merged[-1][0], b)
                else:
                    merged.append((a, b))
            self._free = merged
            self._cv.notify_all()

    def view(self, offset: int, n: int) -> np.ndarray:
        return self.array[offset:offset + n]

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.dma_unmap(self.address)
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
            self._client = None
        del self.array
        try:
            self._map.close()
        except BufferError:  # a caller still holds a view; the mapping goes with it
            pass


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
        if madvise is None or madvise(int(part.ctypes.data), len(part), _MADV_POPULATE_WRITE) != 0:
            part[::_PAGE] = 0

    with ThreadPoolExecutor(max(1, threads)) as ex:
        list(ex.map(one, range(0, len(buf), piece)))


# ---- reading -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlannedTensor:
    path: Path
    entry: TensorEntry

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def nbytes(self) -> int:
        return self.entry.end - self.entry.start


def plan_checkpoint(directory: str | Path) -> list[PlannedTensor]:
    """Every tensor of an HF safetensors directory, file by file, each file in data-offset order."""
    out = []
    for path in checkpoint_files(Path(directory)):
        for entry in read_header(path):
            nbytes = entry.end - entry.start
            expected = int(np.prod(entry.shape, dtype=np.int64)) * entry.dtype.itemsize
            if nbytes != expected:
                raise ValueError(f"tensor {entry.name!r}: {nbytes} bytes on disk, but shape {entry.shape} "
                                 f"needs {expected}")
            out.append(PlannedTensor(path, entry))
    return out


def pread_into(fd: int, buf: memoryview, offset: int) -> None:
    """Fills `buf` from `fd` at `offset` (loops over short reads); raises on end of file."""
    done, n = 0, len(buf)
    while done < n:
        got = os.preadv(fd, [buf[done:done + min(n - done, _MAX_PREAD)]], offset + done)
        if got <= 0:
            raise ValueError(f"file ends {n - done} bytes before the data does (truncated checkpoint?)")
        done += got


@dataclass
class LoadStats:
    """What one pass moved and how long it took; `peak_inflight_bytes` is the budget's high-water mark."""

    num_tensors: int = 0
    bytes_read: int = 0
    bytes_to_device: int = 0
    seconds: float = 0.0
    peak_inflight_bytes: int = 0
    read_s: float = 0.0  # summed over workers (so it can exceed `seconds`)
    transfer_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def gbps(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds else 0.0


class _Files:
    """Open file descriptors (and lazily, read-only mmaps) of a checkpoint, shared by all workers."""

    def __init__(self, paths: list[Path], use_mmap: bool) -> None:
        self.fds = {p: os.open(p, os.O_RDONLY) for p in paths}
        self.maps: dict[Path, mmap.mmap] = {}
        if use_mmap:
            for p, fd in self.fds.items():
                if os.fstat(fd).st_size:
                    self.maps[p] = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)

    def close(self) -> None:
        for m in self.maps.values():
            try:
                m.close()
            except BufferError:  # a caller still holds a view; the mapping goes with it
                pass
        for fd in self.fds.values():
            os.close(fd)


def _row_range(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[int, int, tuple[slice, ...]]:
    """Rows [r0, r1) of axis 0 that a shard index covers, and the rest of the index within them."""
    if not shape:
        return 0, 1, ()
    s0 = index[0] if index else slice(None)
    r0, r1, step = s0.indices(shape[0])
    if step != 1:
        raise ValueError(f"strided shard index {index} is not supported")
    rest = tuple(index[1:]) + (slice(None),) * (len(shape) - 1 - len(index[1:]))
    return r0, r1, rest


def _is_full(rest: tuple[slice, ...], shape: tuple[int, ...]) -> bool:
    return all(s.indices(d) == (0, d, 1) for s, d in zip(rest, shape[1:], strict=True))


def _row_bytes(t: PlannedTensor) -> int:
    shape = t.entry.shape
    return t.nbytes // shape[0] if shape and shape[0] else (0 if shape else t.nbytes)


def _shard_key(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[Any, ...]:
    r0, r1, rest = _row_range(index, shape)
    return (r0, r1, tuple(s.indices(d) for s, d in zip(rest, shape[1:], strict=True)))


def _device_keys(t: PlannedTensor, sharding: Any) -> list[tuple[Any, tuple[Any, ...]]]:
    """(device, shard key) for each addressable device of `sharding`, in its order."""
    shape = t.entry.shape
    return [(d, _shard_key(index, shape))
            for d, index in sharding.addressable_devices_indices_map(shape).items()]


def _shard_reads(t: PlannedTensor, sharding: Any) -> dict[Any, tuple[int, int, tuple[slice, ...]]]:
    """What to read for `t` under `sharding`: shard key -> (r0, r1, rest index), one per distinct local
    shard (one key covering everything for None or a scalar)."""
    shape = t.entry.shape
    if sharding is None or not shape:
        return {None: (0, shape[0] if shape else 1, (slice(None),) * max(0, len(shape) - 1))}
    out: dict[Any, tuple[int, int, tuple[slice, ...]]] = {}
    for index in sharding.addressable_devices_indices_map(shape).values():
        key = _shard_key(index, shape)
        if key not in out:
            out[key] = _row_range(index, shape)
    return out


def _aliases(out: Any, lo: int, hi: int) -> bool:
    """Whether a shard of `out` lives in host bytes [lo, hi) (a host backend that aliased a numpy view)."""
    try:
        ptrs = [s.data.unsafe_buffer_pointer() for s in out.addressable_shards]
    except Exception:  # noqa: BLE001 - no pointer: a device buffer
        return False
    return any(lo <= p < hi for p in ptrs)


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


@dataclass(frozen=True)
class _Job:
    """What one worker reads and sends: row ranges (shard key, r0, r1, rest index) of one tensor.
    `parts == 1`: the whole tensor (every local shard); else piece `part` of `parts`, one range."""

    tensor: PlannedTensor
    ranges: tuple[tuple[Any, int, int, tuple[slice, ...]], ...]
    part: int
    parts: int
    nbytes: int


def _split_jobs(t: PlannedTensor, reads: dict[Any, tuple[int, int, tuple[slice, ...]]], split_bytes: int
                ) -> list[_Job]:
    """`t`'s jobs: one for all of `reads` (shard key -> (r0, r1, rest)) when they hold at most
    `split_bytes` (or `split_bytes <= 0`, or a scalar), else each shard's rows cut into near-equal
    pieces of at most `split_bytes` (at least one row each)."""
    rb = _row_bytes(t)
    total = sum(r1 - r0 for r0, r1, _ in reads.values()) * rb
    if split_bytes <= 0 or total <= split_bytes or not t.entry.shape:
        return [_Job(t, tuple((k, r0, r1, rest) for k, (r0, r1, rest) in reads.items()), 0, 1, total)]
    ranges = []
    for key, (r0, r1, rest) in reads.items():
        n = max(1, -(-(r1 - r0) * rb // split_bytes))
        step = max(1, -(-(r1 - r0) // n))
        ranges += [(key, a, min(a + step, r1), rest) for a in range(r0, r1, step)]
    return [_Job(t, (r,), i, len(ranges), (r[2] - r[1]) * rb) for i, r in enumerate(ranges)]


@dataclass(frozen=True)
class _Ctx:
    """What one pass's workers share: open files, the chunk-reader pool, and the staging slab being set
    up in the background (`slab()`: the slab once ready, else None)."""

    files: _Files
    readers: ThreadPoolExecutor
    slab_future: Future[StagingSlab | None] | None = None

    def slab(self) -> StagingSlab | None:
        f = self.slab_future
        return f.result() if f is not None and f.done() and f.exception() is None else None


class FastLoader:
    """Parallel, pipelined reader of one safetensors checkpoint directory (see the module docstring).

    num_readers: threads issuing chunk reads; num_workers: tensors in flight at once (each reads,
    transfers and waits in its own thread); chunk_bytes: read size of one chunk; max_inflight_bytes:
    host bytes read but not yet on the device (or, for `iter_host`, not yet consumed);
    use_mmap: view the files through mmap instead of copying them into buffers with preadv.
    staging (`iter_device` only): "slab" reads every job (a tensor, or a row piece of one) into one reused,
    pre-faulted host buffer of `max_inflight_bytes` (capped at the checkpoint's size) and transfers from
    there (a job larger than the slab takes a fresh buffer); split_bytes: tensors whose local shards hold
    more are sent in row pieces of at most this (0: never), joined on the device by `assemble`
    ("concat": one jitted concatenate; "dus": in-place updates of a zero buffer). "slab_async" sets the
    slab up in the background and sends jobs that start before it is ready, or are larger, from an mmap
    of their bytes; "none" reads each
    tensor into a fresh buffer (or views the mmap); dma_map: register the slab with the
    device runtime so transfers DMA straight from it (where the backend supports it).
    `skip(name)`: tensors to leave unread.
    """

    def __init__(self, path: str | Path, *, num_readers: int = 16, num_workers: int = 8,
                 chunk_bytes: int = 64 << 20, max_inflight_bytes: int = 256 << 20, use_mmap: bool = False,
                 staging: str = "slab", dma_map: bool = True, split_bytes: int = 32 << 20,
                 assemble: str = "concat", skip: Callable[[str], bool] | None = None) -> None:
        if staging not in ("slab", "slab_async", "none"):
            raise ValueError(f"staging must be 'slab', 'slab_async' or 'none', got {staging!r}")
        if assemble not in ("concat", "dus"):
            raise ValueError(f"assemble must be 'concat' or 'dus', got {assemble!r}")
        self.path = Path(path)
        self.plan = [t for t in plan_checkpoint(self.path) if skip is None or not skip(t.name)]
        self.num_readers = max(1, num_readers)
        self.num_workers = max(1, num_workers)
        self.chunk_bytes = max(1 << 16, chunk_bytes)
        self.max_inflight_bytes = max_inflight_bytes
        self.use_mmap = use_mmap
        self.staging = staging
        self.dma_map = dma_map
        self.split_bytes = split_bytes
        self.assemble = assemble
        self.stats = LoadStats()

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.plan)

    # ---- reading one range ---------------------------------------------------------------------
    def _fill(self, ctx: _Ctx, path: Path, start: int, dest: np.ndarray) -> None:
        """Fills the uint8 array `dest` with its length of bytes at offset `start` of `path` (chunks
        larger than `chunk_bytes` are read in parallel by the reader pool)."""
        mv, nbytes = memoryview(dest), len(dest)
        fd = ctx.files.fds[path]
        if nbytes <= self.chunk_bytes:
            pread_into(fd, mv, start)
            return
        futs = [ctx.readers.submit(pread_into, fd, mv[o:o + self.chunk_bytes], start + o)
                for o in range(0, nbytes, self.chunk_bytes)]
        for f in futs:
            f.result()

    def _read(self, ctx: _Ctx, path: Path, start: int, nbytes: int) -> np.ndarray:
        """`nbytes` at absolute offset `start` of `path`, as a uint8 array (a view of the mmap, or a
        fresh buffer filled by parallel chunk reads)."""
        if self.use_mmap and path in ctx.files.maps:
            return np.frombuffer(ctx.files.maps[path], np.uint8, nbytes, start)
        buf = np.empty(nbytes, np.uint8)
        self._fill(ctx, path, start, buf)
        return buf

    def _read_rows(self, ctx: _Ctx, t: PlannedTensor, r0: int, r1: int, dest: np.ndarray | None = None
                   ) -> np.ndarray:
        """Rows [r0, r1) of axis 0 of `t` (the whole scalar for shape ()), in the stored dtype; read into
        `dest` (uint8, exactly their size) when given."""
        e = t.entry
        shape = e.shape
        if shape and shape[0] == 0:
            return np.empty(shape, e.dtype)
        row_bytes = (t.nbytes // shape[0]) if shape else t.nbytes
        start, nbytes = e.start + r0 * row_bytes, (r1 - r0) * row_bytes
        if dest is None:
            raw = self._read(ctx, t.path, start, nbytes)
        else:
            self._fill(ctx, t.path, start, dest)
            raw = dest
        return raw.view(e.dtype).reshape((r1 - r0, *shape[1:]) if shape else ())

    def _shard_bytes(self, t: PlannedTensor, sharding: Any) -> int:
        """Host bytes a tensor needs in flight: the rows each distinct local shard covers."""
        return sum((r1 - r0) for r0, r1, _ in _shard_reads(t, sharding).values()) * _row_bytes(t)

    # ---- the pipeline --------------------------------------------------------------------------
    def _run(self, units: list[Any], work: Callable[[_Ctx, Any], tuple[Any, int, int]],
             need: Callable[[Any], int], release_on_consume: bool,
             make_slab: Callable[[], StagingSlab | None] | None = None) -> Iterator[tuple[Any, Any]]:
        """Runs `work(ctx, unit) -> (result, bytes_read, bytes_to_device)` over `units` (tensors, or jobs
        of `iter_device`) and yields (unit, result) in order, with `need(unit)` bytes of the budget held
        from before the read until the work returns (or, with `release_on_consume`, until the consumer
        asks for the next unit). The caller counts `stats.num_tensors`."""
        budget = ByteBudget(self.max_inflight_bytes)
        self.budget = budget
        stats = self.stats = LoadStats()
        t0 = time.perf_counter()
        files = _Files(sorted({t.path for t in self.plan}), self.use_mmap)
        readers = ThreadPoolExecutor(self.num_readers, thread_name_prefix="rtp-read")
        # "slab_async": the slab faults in and registers (~0.3 s per GiB) while the first tensors take
        # the mmap path; "slab": it is set up before the first read.
        setup = ThreadPoolExecutor(1, thread_name_prefix="rtp-slab")
        slab_future = setup.submit(make_slab) if make_slab is not None else None
        if slab_future is not None and self.staging == "slab":
            slab_future.exception()  # wait
        stats.extra["setup_s"] = time.perf_counter() - t0
        ctx = _Ctx(files, readers, slab_future)
        workers = ThreadPoolExecutor(self.num_workers, thread_name_prefix="rtp-load")
        pending: queue.Queue[tuple[Any, int, Future[Any]] | None | BaseException] = queue.Queue()
        stop = threading.Event()
        lock = threading.Lock()

        def task(t: Any, n: int) -> Any:
            try:
                result, nread, nsent = work(ctx, t)
            except BaseException:
                if not release_on_consume:  # else the consumer (or the drain) releases it
                    budget.release(n)
                raise
            with lock:
                stats.bytes_read += nread
                stats.bytes_to_device += nsent
            if not release_on_consume:
                budget.release(n)
            return result

        def produce() -> None:
            try:
                for t in units:
                    if stop.is_set():
                        break
                    n = need(t)
                    budget.acquire(n)
                    if stop.is_set():
                        budget.release(n)
                        break
                    pending.put((t, n, workers.submit(task, t, n)))
                pending.put(None)
            except BaseException as e:  # surfaced to the consumer
                pending.put(e)

        producer = threading.Thread(target=produce, name="rtp-load-plan", daemon=True)
        producer.start()
        held = 0
        try:
            while True:
                item = pending.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                t, n, fut = item
                if release_on_consume:
                    held = n
                result = fut.result()
                yield t, result
                if release_on_consume:
                    budget.release(held)
                    held = 0
        finally:
            stop.set()
            if held:
                budget.release(held)
            # Drain: let submitted work finish (and release its bytes) so the producer can exit.
            while producer.is_alive() or not pending.empty():
                try:
                    item = pending.get(timeout=0.05)
                except queue.Empty:
                    continue
                if isinstance(item, tuple):
                    try:
                        item[2].result()
                    except BaseException:  # noqa: BLE001 - already failing or closing
                        pass
                    if release_on_consume:
                        budget.release(item[1])
            workers.shutdown(wait=True)
            readers.shutdown(wait=True)
            setup.shutdown(wait=True)
            slab = None
            if slab_future is not None:
                if slab_future.exception() is not None:
                    stats.extra["slab_error"] = repr(slab_future.exception())
                else:
                    slab = slab_future.result()
            if slab is not None:
                stats.extra.update(staging="slab+dma" if slab.dma_mapped else "slab", slab_bytes=slab.size,
                                   slab_peak_bytes=slab.peak, slab_setup_s=slab.setup_s)
                slab.close()
            else:
                stats.extra["staging"] = "none"
            files.close()
            stats.seconds = time.perf_counter() - t0
            stats.peak_inflight_bytes = budget.peak

    def iter_host(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, numpy array of the stored dtype and shape), in plan order, read ahead in parallel.

        The consumer must be done with an array when it asks for the next one (its bytes go back to
        the budget then); arrays are fresh buffers (views of the mmap with `use_mmap`)."""

        def work(ctx: _Ctx, t: PlannedTensor) -> tuple[Any, int, int]:
            return self._read_rows(ctx, t, 0, t.entry.shape[0] if t.entry.shape else 1), t.nbytes, 0

        for t, array in self._run(self.plan, work, lambda t: t.nbytes, release_on_consume=True):
            self.stats.num_tensors += 1
            yield t.name, array

    def _make_slab(self) -> StagingSlab | None:
        """The staging slab of `iter_device`: `max_inflight_bytes`, capped at the page-rounded size of
        everything the plan reads; registered for DMA with the default backend when `dma_map`."""
        if not self.plan:
            return None
        import jax

        total = sum(-(-max(1, t.nbytes) // _PAGE) * _PAGE for t in self.plan)
        slab = StagingSlab(min(self.max_inflight_bytes, total), populate_threads=min(8, self.num_readers))
        if self.dma_map:
            device = jax.local_devices()[0]
            if device.platform != "cpu":
                slab.dma_map(device.client)
        return slab

    def iter_device(self, sharding_for: ShardingFor | None = None, dtype: Any = None,
                    dtype_for: Callable[[str], Any] | None = None) -> Iterator[tuple[str, Any]]:
        """(name, jax.Array) in plan order, each placed in `sharding_for(name, shape)` (None: the default
        device) and cast on the device to `dtype_for(name)` or `dtype` (None: keep the stored dtype).

        A tensor whose local shards hold more than `split_bytes` is cut into row pieces of about that
        size (`_split_jobs`); each piece goes through the slab and onto the device(s) on its own, and
        the pieces are joined on the device (`_join`: one concatenate, or updates of a zero buffer) and
        cast there. With `staging="slab"` a job's host bytes live in the slab from the read until its
        transfer is complete (then the range is reused); a job larger than the slab takes a fresh
        buffer. With "slab_async", while the slab is still being set up in the background, and for jobs
        larger than it, a job is transferred from an mmap of its bytes instead (faulted in by parallel
        MADV_POPULATE_READ)."""

        def target_dtype(name: str) -> Any:
            return dtype_for(name) if dtype_for is not None else dtype

        shardings: dict[str, Any] = {}

        def sharding_of(t: PlannedTensor) -> Any:
            if t.name not in shardings:
                shardings[t.name] = sharding_for(t.name, t.entry.shape) if sharding_for is not None else None
            return shardings[t.name]

        jobs = [job for t in self.plan
                for job in _split_jobs(t, _shard_reads(t, sharding_of(t)), self.split_bytes)]

        def work(ctx: _Ctx, job: _Job) -> tuple[Any, int, int]:
            t = job.tensor
            e, rb, sharding = t.entry, _row_bytes(t), sharding_of(t)
            slab = ctx.slab()
            slab = slab if slab is not None and 0 < job.nbytes <= slab.size else None
            lo_row = min(r0 for _, r0, _, _ in job.ranges)
            hi_row = max(r1 for _, _, r1, _ in job.ranges)
            # Slab not ready yet, or the job is larger: an mmap of the job's bytes instead.
            mapped = _MappedRange(ctx.files.fds[t.path], e.start + lo_row * rb, (hi_row - lo_row) * rb,
                                  ctx.readers, self.chunk_bytes) \
                if slab is None and self.staging == "slab_async" and job.nbytes > 0 else None
            t0 = time.perf_counter()
            offset = slab.alloc(job.nbytes) if slab is not None else 0
            try:
                hosts: dict[Any, np.ndarray] = {}
                at = 0
                for key, r0, r1, rest in job.ranges:
                    nbytes = (r1 - r0) * rb
                    if mapped is not None:
                        raw = mapped.array[(r0 - lo_row) * rb:(r1 - lo_row) * rb]
                        rows = raw.view(e.dtype).reshape((r1 - r0, *e.shape[1:]) if e.shape else ())
                    else:
                        dest = slab.view(offset + at, nbytes) if slab is not None else None
                        rows = self._read_rows(ctx, t, r0, r1, dest)
                    at += nbytes
                    hosts[key] = rows if _is_full(rest, e.shape) else \
                        np.ascontiguousarray(rows[(slice(None), *rest)])
                t1 = time.perf_counter()
                lo, hi = (slab.address, slab.address + slab.size) if slab is not None else \
                    (mapped.lo, mapped.hi) if mapped is not None else (0, 0)
                if job.parts == 1:
                    out, nsent = _transfer(hosts, t, sharding)
                    out.block_until_ready()
                    if hi and _aliases(out, lo, hi):  # a host backend kept the staged bytes: copy them
                        out = _transfer({k: np.array(h) for k, h in hosts.items()}, t, sharding)[0]
                        out.block_until_ready()
                else:
                    ((key, r0, _, _),) = job.ranges
                    (host,) = hosts.values()
                    out = (key, r0, _put_piece(host, _key_devices(t, sharding, key), lo, hi))
                    nsent = host.nbytes * len(out[2])
                del hosts
            finally:
                if slab is not None:
                    slab.free(offset)
                if mapped is not None:
                    mapped.close()
            want = target_dtype(t.name)
            if job.parts == 1 and want is not None and np.dtype(want) != out.dtype:
                out = _cast(out, np.dtype(want))
                out.block_until_ready()
            self._time(t0, t1)
            return out, job.nbytes, nsent

        parts: list[tuple[Any, int, dict[Any, Any]]] = []
        for job, out in self._run(jobs, work, lambda j: j.nbytes, release_on_consume=False,
                                  make_slab=self._make_slab if self.staging != "none" else None):
            if job.parts > 1:
                parts.append(out)
                if job.part < job.parts - 1:
                    continue
                want = target_dtype(job.tensor.name)
                out = _assemble(job.tensor, sharding_of(job.tensor), parts,
                                None if want is None else np.dtype(want), self.assemble)
                parts = []
            self.stats.num_tensors += 1
            yield job.tensor.name, out

    def _time(self, t0: float, t1: float) -> None:
        t2 = time.perf_counter()
        self.stats.read_s += t1 - t0
        self.stats.transfer_s += t2 - t1


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


# ---- whole models --------------------------------------------------------------------------------
class _KeyRngs:
    """Stands in for `nnx.Rngs` while tracing a model for its shapes: `params()` is always the same key.

    Models only draw init keys (`rngs.params()`); `nnx.Rngs` bumps a counter that is a tracer under
    `nnx.eval_shape`, and each bump builds a jax error message by walking the whole trace (flax checks
    `getattr(tracer, "sharding", None)`), quadratic in the model size: 0.75 s of 0.78 s for an 8B Llama
    on a CPU-only box, 0.13 s without it."""

    def params(self) -> Any:
        import jax

        return jax.random.key(0)


def abstract_state(config: Any, dtype: Any) -> tuple[Any, Any]:
    """`rtp_jax.models.params.abstract_model` (graphdef, shape-only state), traced with `_KeyRngs`; falls
    back to the original where a model needs a real `nnx.Rngs`."""
    from flax import nnx

    from rtp_jax.models import get_model_class
    from rtp_jax.models.params import abstract_model

    cls = get_model_class(config.architecture)
    try:
        return nnx.split(nnx.eval_shape(lambda: cls(config, dtype=dtype, rngs=_KeyRngs())))
    except (AttributeError, TypeError):
        return abstract_model(config, dtype)


def load_model_state(path: str | Path, config: Any, dtype: Any, *, sharding_for: ShardingFor | None = None,
                     stats: dict[str, Any] | None = None, **loader_kw: Any) -> tuple[Any, Any]:
    """(graphdef, nnx.State) of a model from an HF safetensors directory or an orbax checkpoint directory.

    Dense models go through `FastLoader.iter_device` (each tensor placed by `sharding_for`, cast to
    `dtype` on the device); MoE checkpoints (per-expert tensors stacked on the host) stream through
    `FastLoader.iter_host` into `rtp_jax.models.params.load_state`, with `sharding_for` as its placer.
    `stats`, if given, receives the loader's LoadStats fields.
    """
    import jax.numpy as jnp
    from flax import nnx

    from rtp_jax.loader.orbax_io import is_orbax_checkpoint, restore_model_state
    from rtp_jax.models.params import flat_param_shapes, load_state, nest

    path = Path(path)
    dtype = jnp.dtype(dtype)
    if is_orbax_checkpoint(path):
        t0 = time.perf_counter()
        out = restore_model_state(path, config, dtype, sharding_for=sharding_for)
        if stats is not None:
            stats.update(seconds=time.perf_counter() - t0, format="orbax")
        return out

    def skip(name: str) -> bool:
        tied_head = config.tie_word_embeddings and name == "lm_head.weight"
        return name.endswith("rotary_emb.inv_freq") or tied_head

    loader = FastLoader(path, skip=skip, **loader_kw)
    if config.is_moe:
        import jax

        def place(name: str, x: Any) -> Any:
            s = sharding_for(name, tuple(np.shape(x))) if sharding_for is not None else None
            return jax.device_put(x, s)

        out = load_state(config, dtype, loader.iter_host(), place)
    else:
        # Tracing the model for its abstract state is pure Python (~0.1 s): overlap it with the reads.
        with ThreadPoolExecutor(1) as ex:
            abstract_fut = ex.submit(abstract_state, config, dtype)
            loaded: dict[str, Any] = dict(loader.iter_device(sharding_for=sharding_for, dtype=dtype))
            graphdef, abstract = abstract_fut.result()
        expected = flat_param_shapes(abstract)
        for name, array in loaded.items():
            if name not in expected:
                raise ValueError(f"checkpoint tensor {name!r} does not belong to a "
                                 f"{config.architecture} model")
            if tuple(array.shape) != tuple(expected[name].shape):
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(array.shape)}, expected "
                                 f"{tuple(expected[name].shape)} from the model config")
        missing = sorted(set(expected) - set(loaded))
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")
        nnx.replace_by_pure_dict(abstract, nest(loaded))
        out = (graphdef, abstract)
    if stats is not None:
        s = loader.stats
        stats.update(num_tensors=s.num_tensors, bytes=s.bytes_read, bytes_to_device=s.bytes_to_device,
                     seconds=s.seconds, peak_inflight_bytes=s.peak_inflight_bytes, format="safetensors",
                     **s.extra)
    return out


def mesh_sharding_for(mesh: Any, model_config: Any, parallel_config: Any) -> ShardingFor:
    """`sharding_for` of the engine's partition rules on `mesh` (sharding.placement's table)."""
    from sharding.placement import param_sharding_fn

    fn = param_sharding_fn(mesh, model_config, parallel_config)
    return lambda name, shape: fn(name, len(shape))
