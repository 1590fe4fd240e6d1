"""Fast safetensors loading: parallel readers in file-offset order, a bounded pipeline, and each tensor
placed straight into its target sharding.

    loader = FastLoader(path, num_readers=16, max_inflight_bytes=1 << 30)
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


class FastLoader:
    """Parallel, pipelined reader of one safetensors checkpoint directory (see the module docstring).

    num_readers: threads issuing chunk reads; num_workers: tensors in flight at once (each reads,
    transfers and waits in its own thread); chunk_bytes: read size of one chunk; max_inflight_bytes:
    host bytes read but not yet on the device (or, for `iter_host`, not yet consumed);
    use_mmap: view the files through mmap instead of copying them into buffers with preadv.
    `skip(name)`: tensors to leave unread.
    """

    def __init__(self, path: str | Path, *, num_readers: int = 16, num_workers: int = 8,
                 chunk_bytes: int = 64 << 20, max_inflight_bytes: int = 1 << 30, use_mmap: bool = False,
                 skip: Callable[[str], bool] | None = None) -> None:
        self.path = Path(path)
        self.plan = [t for t in plan_checkpoint(self.path) if skip is None or not skip(t.name)]
        self.num_readers = max(1, num_readers)
        self.num_workers = max(1, num_workers)
        self.chunk_bytes = max(1 << 16, chunk_bytes)
        self.max_inflight_bytes = max_inflight_bytes
        self.use_mmap = use_mmap
        self.stats = LoadStats()

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.plan)

    # ---- reading one range ---------------------------------------------------------------------
    def _read(self, files: _Files, readers: ThreadPoolExecutor, path: Path, start: int, nbytes: int
              ) -> np.ndarray:
        """`nbytes` at absolute offset `start` of `path`, as a uint8 array (a view of the mmap, or a
        fresh buffer filled by parallel chunk reads)."""
        if self.use_mmap and path in files.maps:
            return np.frombuffer(files.maps[path], np.uint8, nbytes, start)
        buf = np.empty(nbytes, np.uint8)
        mv = memoryview(buf)
        fd = files.fds[path]
        if nbytes <= self.chunk_bytes:
            pread_into(fd, mv, start)
            return buf
        futs = [readers.submit(pread_into, fd, mv[o:o + self.chunk_bytes], start + o)
                for o in range(0, nbytes, self.chunk_bytes)]
        for f in futs:
            f.result()
        return buf

    def _read_rows(self, files: _Files, readers: ThreadPoolExecutor, t: PlannedTensor, r0: int, r1: int
                   ) -> np.ndarray:
        e = t.entry
        shape = e.shape
        row_bytes = (t.nbytes // shape[0]) if shape else t.nbytes
        if shape and shape[0] == 0:
            return np.empty(shape, e.dtype)
        raw = self._read(files, readers, t.path, e.start + r0 * row_bytes, (r1 - r0) * row_bytes)
        return raw.view(e.dtype).reshape((r1 - r0, *shape[1:]) if shape else ())

    def _shard_bytes(self, t: PlannedTensor, sharding: Any) -> int:
        """Host bytes a tensor needs in flight: the rows each distinct local shard covers."""
        if sharding is None or not t.entry.shape:
            return t.nbytes
        shape = t.entry.shape
        row_bytes = t.nbytes // shape[0] if shape[0] else 0
        seen, total = set(), 0
        for index in sharding.addressable_devices_indices_map(shape).values():
            r0, r1, rest = _row_range(index, shape)
            key = (r0, r1, tuple(s.indices(d) for s, d in zip(rest, shape[1:], strict=True)))
            if key not in seen:
                seen.add(key)
                total += (r1 - r0) * row_bytes
        return total

    # ---- the pipeline --------------------------------------------------------------------------
    def _run(self, work: Callable[[_Files, ThreadPoolExecutor, PlannedTensor], tuple[Any, int, int]],
             need: Callable[[PlannedTensor], int], release_on_consume: bool) -> Iterator[tuple[str, Any]]:
        """Runs `work(files, readers, tensor) -> (result, bytes_read, bytes_to_device)` over the plan
        with the budget held from before the read until the work returns (or, with
        `release_on_consume`, until the consumer asks for the next tensor)."""
        budget = ByteBudget(self.max_inflight_bytes)
        self.budget = budget
        stats = self.stats = LoadStats()
        files = _Files(sorted({t.path for t in self.plan}), self.use_mmap)
        readers = ThreadPoolExecutor(self.num_readers, thread_name_prefix="rtp-read")
        workers = ThreadPoolExecutor(self.num_workers, thread_name_prefix="rtp-load")
        pending: queue.Queue[tuple[PlannedTensor, int, Future[Any]] | None | BaseException] = queue.Queue()
        stop = threading.Event()
        lock = threading.Lock()

        def task(t: PlannedTensor, n: int) -> Any:
            try:
                result, nread, nsent = work(files, readers, t)
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
                for t in self.plan:
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

        t0 = time.perf_counter()
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
                stats.num_tensors += 1
                yield t.name, result
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
            files.close()
            stats.seconds = time.perf_counter() - t0
            stats.peak_inflight_bytes = budget.peak

    def iter_host(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, numpy array of the stored dtype and shape), in plan order, read ahead in parallel.

        The consumer must be done with an array when it asks for the next one (its bytes go back to
        the budget then); arrays are fresh buffers (views of the mmap with `use_mmap`)."""

        def work(files: _Files, readers: ThreadPoolExecutor, t: PlannedTensor) -> tuple[Any, int, int]:
            e = t.entry
            if not e.shape:
                raw = self._read(files, readers, t.path, e.start, t.nbytes)
                return raw.view(e.dtype).reshape(()), t.nbytes, 0
            return self._read_rows(files, readers, t, 0, e.shape[0]), t.nbytes, 0

        return self._run(work, lambda t: t.nbytes, release_on_consume=True)

    def iter_device(self, sharding_for: ShardingFor | None = None, dtype: Any = None,
                    dtype_for: Callable[[str], Any] | None = None) -> Iterator[tuple[str, Any]]:
        """(name, jax.Array) in plan order, each placed in `sharding_for(name, shape)` (None: the default
        device) and cast on the device to `dtype_for(name)` or `dtype` (None: keep the stored dtype)."""
        import jax

        def target_dtype(name: str) -> Any:
            return dtype_for(name) if dtype_for is not None else dtype

        shardings: dict[str, Any] = {}

        def sharding_of(t: PlannedTensor) -> Any:
            if t.name not in shardings:
                shardings[t.name] = sharding_for(t.name, t.entry.shape) if sharding_for is not None else None
            return shardings[t.name]

        def work(files: _Files, readers: ThreadPoolExecutor, t: PlannedTensor) -> tuple[Any, int, int]:
            e, want = t.entry, target_dtype(t.name)
            sharding = sharding_of(t)
            t0 = time.perf_counter()
            if sharding is None or not e.shape:
                host = self._read_rows(files, readers, t, 0, e.shape[0]) if e.shape else \
                    self._read(files, readers, t.path, e.start, t.nbytes).view(e.dtype).reshape(())
                t1 = time.perf_counter()
                out = _put(host, sharding, want)
                out.block_until_ready()
                self._time(t0, t1)
                return out, t.nbytes, host.nbytes
            shape = e.shape
            by_key: dict[Any, tuple[np.ndarray | None, list[Any]]] = {}
            order: list[tuple[Any, Any]] = []
            nread = 0
            for device, index in sharding.addressable_devices_indices_map(shape).items():
                r0, r1, rest = _row_range(index, shape)
                key = (r0, r1, tuple(s.indices(d) for s, d in zip(rest, shape[1:], strict=True)))
                if key not in by_key:
                    rows = self._read_rows(files, readers, t, r0, r1)
                    nread += rows.nbytes
                    host = rows if _is_full(rest, shape) else np.ascontiguousarray(rows[(slice(None), *rest)])
                    by_key[key] = (host, [])
                order.append((device, key))
            t1 = time.perf_counter()
            singles, nsent = [], 0
            for device, key in order:
                host = by_key[key][0]
                singles.append(_put(host, device, want))
                nsent += host.nbytes
            out = jax.make_array_from_single_device_arrays(shape, sharding, singles)
            out.block_until_ready()
            self._time(t0, t1)
            return out, nread, nsent

        return self._run(work, lambda t: self._shard_bytes(t, sharding_of(t)), release_on_consume=False)

    def _time(self, t0: float, t1: float) -> None:
        t2 = time.perf_counter()
        self.stats.read_s += t1 - t0
        self.stats.transfer_s += t2 - t1


def _put(host: np.ndarray, where: Any, dtype: Any) -> Any:
    """Host array -> device (a Device, a Sharding, or None for the default device), cast on the device."""
    import jax

    x = jax.device_put(host, where)
    if dtype is not None and np.dtype(dtype) != host.dtype:
        x = _cast(x, np.dtype(dtype))
    return x


_CASTS: dict[Any, Any] = {}


def _cast(x: Any, dtype: np.dtype) -> Any:
    """Casts on the device where `x` lives (jitted per dtype; output sharding follows the input's)."""
    import jax

    fn = _CASTS.get(dtype)
    if fn is None:
        fn = _CASTS[dtype] = jax.jit(lambda a: a.astype(dtype))
    return fn(x)


# ---- whole models --------------------------------------------------------------------------------
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
    from rtp_jax.models.params import abstract_model, flat_param_shapes, load_state, nest

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
        # Tracing the model for its abstract state is pure Python (~0.2-0.5 s): overlap it with the reads.
        with ThreadPoolExecutor(1) as ex:
            abstract_fut = ex.submit(abstract_model, config, dtype)
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
                     seconds=s.seconds, peak_inflight_bytes=s.peak_inflight_bytes, format="safetensors")
    return out


def mesh_sharding_for(mesh: Any, model_config: Any, parallel_config: Any) -> ShardingFor:
    """`sharding_for` of the engine's partition rules on `mesh` (sharding.placement's table)."""
    from sharding.placement import param_sharding_fn

    fn = param_sharding_fn(mesh, model_config, parallel_config)
    return lambda name, shape: fn(name, len(shape))
