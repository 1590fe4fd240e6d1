"""Fast safetensors loading: parallel readers in file-offset order, a bounded pipeline, and each tensor
placed straight into its target sharding.

    loader = FastLoader(path, num_readers=16, max_inflight_bytes=384 << 20)
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

On a CUDA host `iter_device` copies each whole tensor straight into its device buffer, in 4 MiB chunks read
into a ring of small pinned slots that stay in the CPU's cache (`loader.ring`, `staging="ring"`, the
default): the DMA reads what the pread just wrote without a trip through DRAM. Elsewhere, and for shards
that need a host-side slice, it stages host bytes in one reused, pre-faulted slab (`StagingSlab`) that is
registered with the device runtime (`client.dma_map`), so a transfer is one DMA from it instead of a copy
into the runtime's own pinned buffer; a range of the slab is reused once its transfer is complete.
Tensors larger than `split_bytes` (32 MiB) are read and sent in row pieces, each its own job in the
pipeline, and joined on the device (one jitted concatenate + cast), so the slab can be small (384 MiB)
without a second host copy of any tensor. The slab is faulted in and registered one piece-sized segment at a
time in the background (~10 ms each on an H200), and jobs start as soon as the first segment is ready.

Sharded placement reads only what this process's devices hold: for each distinct shard index of
`sharding.addressable_devices_indices_map(shape)`, the rows of axis 0 it covers are read (exactly its
bytes when only axis 0 is split; the covering rows, then a slice, otherwise) and sent to the devices
that hold that shard; the global array is assembled with `jax.make_array_from_single_device_arrays`.

This module is the pipeline (`FastLoader`, `load_model_state`) and the public API; its parts live in
`reading` (plan, preads), `staging` (slab, mmap ranges), `shards` (shard rows, row-piece jobs),
`transfer` (device puts, piece joins, casts), `accounting` (budget, stats) and `abstract` (model
shapes). Their public names are re-exported here.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rtp_jax.loader.abstract import abstract_state
from rtp_jax.loader.accounting import ByteBudget, LoadStats, phase_summary
from rtp_jax.loader.copies import DeviceCopies, RingSetup
from rtp_jax.loader.direct import DirectConfig, HostDma
from rtp_jax.loader.reading import PlannedTensor, _Files, plan_checkpoint, pread_into
from rtp_jax.loader.ring import RingConfig
from rtp_jax.loader.shards import _is_full, _Job, _row_bytes, _shard_reads, _split_jobs
from rtp_jax.loader.staging import _PAGE, StagingSlab, _MappedRange
from rtp_jax.loader.transfer import (
    _aliases,
    _assemble,
    _cast,
    _key_devices,
    _put_piece,
    _transfer,
    fuse_on_devices,
)

__all__ = [
    "ByteBudget",
    "DirectConfig",
    "FastLoader",
    "LoadStats",
    "PlannedTensor",
    "RingConfig",
    "ShardingFor",
    "StagingSlab",
    "abstract_state",
    "load_model_state",
    "mesh_sharding_for",
    "plan_checkpoint",
    "pread_into",
]

ShardingFor = Callable[[str, tuple[int, ...]], Any]  # (name, shape) -> jax.sharding.Sharding | None


@dataclass(frozen=True)
class _Ctx:
    """What one pass's workers share: open files, the chunk-reader pool, and the staging slab being
    prepared in the background (`slab()`: the slab, whose `alloc` waits for a ready segment; with
    `whole`, None until every segment is ready)."""

    files: _Files
    readers: ThreadPoolExecutor
    staging_slab: StagingSlab | None = None
    prepared: Future[None] | None = None
    whole: bool = False

    def slab(self) -> StagingSlab | None:
        if self.staging_slab is None or not self.whole:
            return self.staging_slab
        f = self.prepared
        return self.staging_slab if f is not None and f.done() and f.exception() is None else None


class FastLoader:
    """Parallel, pipelined reader of one safetensors checkpoint directory (see the module docstring).

    num_readers: threads issuing chunk reads; num_workers: tensors in flight at once (each reads,
    transfers and waits in its own thread); chunk_bytes: read size of one chunk; max_inflight_bytes:
    host bytes read but not yet on the device (or, for `iter_host`, not yet consumed);
    use_mmap: view the files through mmap instead of copying them into buffers with preadv.
    staging (`iter_device` only): "ring" (default) copies each whole tensor into its device buffer in
    chunks through a small ring of pinned host slots that stay in the CPU cache (`loader.ring`; through
    `ring`, a `HostDma`, or with True the CUDA driver's where every local device is a CUDA GPU; 16 GB warm
    on the H200 host: see notes_bench.md), `ring_config` (`RingConfig`) its threads, slots and chunk size;
    tensors it cannot take (column-sliced shards; no driver, e.g. on a CPU) go through the slab. "slab"
    reads every job (a tensor, or a row piece of one) into one reused, pre-faulted host buffer of
    `max_inflight_bytes` (capped at the checkpoint's size) and transfers from there (a job larger than the
    slab takes a fresh buffer); split_bytes: tensors whose local shards hold more are sent in row pieces of
    at most this (0: never), joined on the device by `assemble` ("concat": one jitted concatenate; "dus":
    in-place updates of a zero buffer). "slab_async" sets the slab up in the background and sends jobs
    that start before it is ready, or are larger, from an mmap of their bytes; "none" reads each tensor
    into a fresh buffer (or views the mmap); dma_map: register the slab with the device runtime so
    transfers DMA straight from it (where the backend supports it).
    `skip(name)`: tensors to leave unread. release_in_background: the slab is unregistered and unmapped
    by a background thread once the pass is done, so the caller does not wait for it.
    direct (`iter_device` only, opt-in): files already in the page cache are pinned in place and copied by
    DMA (`loader.direct`; CUDA with read-only host registration), skipping the slab; True, or a `HostDma`.
    Off by default: slower than the slab on the H200 host (16 GB warm: 1.18 vs 0.70 s; notes_bench.md).
    `direct_config` (`DirectConfig`): pinning chunks, threads and window, and the share sent directly.
    """

    def __init__(self, path: str | Path, *, num_readers: int = 16, num_workers: int = 12,
                 chunk_bytes: int = 64 << 20, max_inflight_bytes: int = 384 << 20, use_mmap: bool = False,
                 staging: str = "ring", dma_map: bool = True, split_bytes: int = 32 << 20,
                 assemble: str = "concat", skip: Callable[[str], bool] | None = None,
                 release_in_background: bool = True, direct: bool | HostDma = False,
                 direct_config: DirectConfig | None = None, ring: bool | HostDma = True,
                 ring_config: RingConfig | None = None) -> None:
        if staging not in ("ring", "slab", "slab_async", "none"):
            raise ValueError(f"staging must be 'ring', 'slab', 'slab_async' or 'none', got {staging!r}")
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
        self.release_in_background = release_in_background
        self.direct = direct
        self.direct_config = direct_config or DirectConfig()
        self._ring = RingSetup(ring if staging == "ring" else False, ring_config or RingConfig())
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
        # The slab faults in and registers (~0.3 s per GiB) in the background, one segment at a time:
        # "slab" jobs wait for a ready segment, "slab_async" jobs take the mmap path until all are ready.
        setup = ThreadPoolExecutor(1, thread_name_prefix="rtp-slab")
        slab = make_slab() if make_slab is not None else None
        prepared = setup.submit(slab.prepare, self._dma_client()) if slab is not None else None
        stats.extra["setup_s"] = time.perf_counter() - t0
        ctx = _Ctx(files, readers, slab, prepared, whole=self.staging == "slab_async")
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
            if prepared is not None and prepared.exception() is not None:
                stats.extra["slab_error"] = repr(prepared.exception())
            if slab is not None:
                stats.extra.update(staging="slab+dma" if slab.dma_mapped else "slab", slab_bytes=slab.size,
                                   slab_peak_bytes=slab.peak, slab_setup_s=slab.setup_s,
                                   slab_first_segment_s=slab.first_segment_s)
                if self.release_in_background:  # unregistering and unmapping take ~50 ms per 256 MiB
                    threading.Thread(target=slab.close, name="rtp-slab-close", daemon=True).start()
                else:
                    slab.close()
            else:
                stats.extra["staging"] = "none"
            files.close()
            stats.seconds = time.perf_counter() - t0
            stats.peak_inflight_bytes = budget.peak
            stats.extra.update(phase_summary(stats, t0))

    def iter_host(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, numpy array of the stored dtype and shape), in plan order, read ahead in parallel.

        The consumer must be done with an array when it asks for the next one (its bytes go back to
        the budget then); arrays are fresh buffers (views of the mmap with `use_mmap`)."""

        def work(ctx: _Ctx, t: PlannedTensor) -> tuple[Any, int, int]:
            return self._read_rows(ctx, t, 0, t.entry.shape[0] if t.entry.shape else 1), t.nbytes, 0

        # Closed explicitly: an early exit must drain the workers now, not whenever the GC gets to it.
        runner = self._run(self.plan, work, lambda t: t.nbytes, release_on_consume=True)
        try:
            for t, array in runner:
                self.stats.num_tensors += 1
                yield t.name, array
        finally:
            runner.close()

    def _make_slab(self) -> StagingSlab | None:
        """The staging slab of `iter_device`, not yet prepared: `max_inflight_bytes`, capped at the
        page-rounded size of everything the plan reads, in segments of `split_bytes` (whole without)."""
        if not self.plan:
            return None
        total = sum(-(-max(1, t.nbytes) // _PAGE) * _PAGE for t in self.plan)
        return StagingSlab(min(self.max_inflight_bytes, total), populate_threads=min(8, self.num_readers),
                           segment_bytes=self.split_bytes, prepare=False)

    def _dma_client(self) -> Any:
        """The default backend to register the slab with (`dma_map`), or None (disabled, or a CPU)."""
        if not self.dma_map:
            return None
        import jax

        device = jax.local_devices()[0]
        return None if device.platform == "cpu" else device.client

    def prepare(self) -> None:
        """Sets `iter_device`'s staging ring up (slots faulted in and pinned, ~40-80 ms) in the background,
        beside the caller's work (`load_model_state` builds the abstract model meanwhile); `iter_device`
        takes it over and closes it (without `prepare` it sets the ring up itself)."""
        self._ring.prepare()

    def close(self) -> None:
        """Closes a ring `prepare` set up that no `iter_device` pass took (the caller failed before it)."""
        self._ring.close()

    def iter_device(self, sharding_for: ShardingFor | None = None, dtype: Any = None,
                    dtype_for: Callable[[str], Any] | None = None) -> Iterator[tuple[str, Any]]:
        """(name, jax.Array) in plan order, each placed in `sharding_for(name, shape)` (None: the default
        device) and cast on the device to `dtype_for(name)` or `dtype` (None: keep the stored dtype).

        Ring and direct tensors are copied whole into their device buffers (`loader.copies`). The others
        go through the slab: one whose local shards hold more than `split_bytes` is cut into row pieces
        (`_split_jobs`), each staged and sent on its own and joined on the device (`_join`); a job's host
        bytes live in the slab until its transfer is complete (a job larger than the slab takes a fresh
        buffer; with "slab_async", before the slab is ready or for larger jobs, an mmap of its bytes)."""

        def target_dtype(name: str) -> Any:
            return dtype_for(name) if dtype_for is not None else dtype

        shardings: dict[str, Any] = {}

        def sharding_of(t: PlannedTensor) -> Any:
            if t.name not in shardings:
                shardings[t.name] = sharding_for(t.name, t.entry.shape) if sharding_for is not None else None
            return shardings[t.name]

        t_copies = time.perf_counter()
        ring = self._ring.take()
        try:
            reads = {t.name: _shard_reads(t, sharding_of(t)) for t in self.plan}
            copies = DeviceCopies(self.plan, reads, self.direct, self.direct_config, ring)
            # Direct and ring jobs are whole tensors: no host bytes to bound, no pieces to join on the device.
            jobs = [job for t in self.plan
                    for job in _split_jobs(t, reads[t.name], 0 if copies.whole(t.name) else self.split_bytes)]
            copies.start(jobs, sharding_of)
        except BaseException:
            if ring is not None:  # e.g. `sharding_for` raised: the pinned slots go back now
                ring.close()
            raise
        copies_setup_s = time.perf_counter() - t_copies  # incl. waiting for `prepare`'s ring

        def cast_whole(job: _Job, out: Any) -> Any:
            """A whole tensor cast on its devices to the wanted dtype (pieces are cast once joined)."""
            want = target_dtype(job.tensor.name)
            if job.parts == 1 and want is not None and np.dtype(want) != out.dtype:
                out = _cast(out, np.dtype(want))
                out.block_until_ready()
            return out

        def work(ctx: _Ctx, job: _Job) -> tuple[Any, int, int]:
            t = job.tensor
            e, rb, sharding = t.entry, _row_bytes(t), sharding_of(t)
            if copies.takes(job):
                t0 = time.perf_counter()
                copied = copies.result(job, sharding)
                if copied is not None:
                    self._time(t0, t0)
                    return cast_whole(job, copied[0]), job.nbytes, copied[1]
            slab = ctx.slab()
            slab = slab if slab is not None and 0 < job.nbytes <= slab.max_alloc else None
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
            out = cast_whole(job, out)
            self._time(t0, t1)
            return out, job.nbytes, nsent

        parts: list[tuple[Any, int, dict[Any, Any]]] = []
        slab = self.staging != "none" and not all(copies.takes(job) for job in jobs)
        runner = self._run(jobs, work, lambda j: 0 if copies.takes(j) else j.nbytes, release_on_consume=False,
                           make_slab=self._make_slab if slab else None)
        try:
            for job, out in runner:
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
        finally:
            copies.cancel()  # an early exit: jobs the ring has not copied return at once
            runner.close()  # the workers are done with the page cache before it is unpinned
            copies.close(self.stats.extra, self.release_in_background, slab)
            self.stats.extra["copies_setup_s"] = copies_setup_s

    def _time(self, t0: float, t1: float) -> None:
        t2 = time.perf_counter()
        self.stats.read_s += t1 - t0
        self.stats.transfer_s += t2 - t1
        self.stats.job_times.append((t0, t1, t2))  # list.append is atomic under the GIL


def load_model_state(path: str | Path, config: Any, dtype: Any, *, sharding_for: ShardingFor | None = None,
                     stats: dict[str, Any] | None = None, abstract_in_thread: bool = False,
                     **loader_kw: Any) -> tuple[Any, Any]:
    """(graphdef, nnx.State) of a model from an HF safetensors directory or an orbax checkpoint directory.

    Dense models go through `FastLoader.iter_device` (each tensor placed by `sharding_for`, cast to
    `dtype` on the device); MoE checkpoints (per-expert tensors stacked on the host) stream through
    `FastLoader.iter_host` into `rtp_jax.models.params.load_state`, with `sharding_for` as its placer.
    `stats`, if given, receives the loader's LoadStats fields. abstract_in_thread: build the abstract model
    while the loader runs; the default builds it before the loader starts. On an H200 the order that ran
    second in a process won each time (warm 16 GB: in a thread 0.658 vs 0.699 s and 0.797 vs 0.844 s, before
    0.741 vs 0.764 s; bench/notes_bench.md), so neither is faster beyond the run-order effect.
    """
    import jax.numpy as jnp
    from flax import nnx

    from rtp_jax.loader.orbax_io import is_orbax_checkpoint, restore_model_state
    from rtp_jax.models.fused import fuse_stream, fused_shape
    from rtp_jax.models.params import flat_param_shapes, load_state, nest

    path = Path(path)
    dtype = jnp.dtype(dtype)
    entered = time.perf_counter()
    if is_orbax_checkpoint(path):
        t0 = time.perf_counter()
        out = restore_model_state(path, config, dtype, sharding_for=sharding_for)
        if stats is not None:
            stats.update(seconds=time.perf_counter() - t0, format="orbax")
        return out

    def skip(name: str) -> bool:
        tied_head = config.tie_word_embeddings and name == "lm_head.weight"
        return name.endswith("rotary_emb.inv_freq") or tied_head

    def combine(name: str, parts: list[Any]) -> Any:
        """A fused parameter from its parts, already on the devices: combined there, in its own sharding."""
        shape = fused_shape(name, [p.shape for p in parts], config.head_dim)
        sharding = sharding_for(name, shape) if sharding_for is not None else None
        return fuse_on_devices(name, parts, config.head_dim, sharding)

    loader = FastLoader(path, skip=skip, **loader_kw)
    marks = {"loader_built_s": time.perf_counter() - entered}  # where a load's time goes, from its start
    if not config.is_moe:
        loader.prepare()  # the ring's set-up overlaps the abstract model's
    if config.is_moe:
        import jax

        def place(name: str, x: Any) -> Any:
            s = sharding_for(name, tuple(np.shape(x))) if sharding_for is not None else None
            return jax.device_put(x, s)

        out = load_state(config, dtype, loader.iter_host(), place)
    else:
        # Building the abstract model is pure Python (~0.05 s), before the reads by default.
        with ThreadPoolExecutor(1) as ex, contextlib.closing(loader):
            t0 = time.perf_counter()
            abstract_fut = ex.submit(abstract_state, config, dtype)
            done_at: list[float] = []
            abstract_fut.add_done_callback(lambda _: done_at.append(time.perf_counter()))
            if not abstract_in_thread:
                abstract_fut.result()
            abstract_s = time.perf_counter() - t0  # how long the pipeline waited for it
            arrays = loader.iter_device(sharding_for=sharding_for, dtype=dtype)
            loaded: dict[str, Any] = dict(fuse_stream(arrays, combine))
            marks["tensors_done_s"] = time.perf_counter() - entered
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
        marks["state_done_s"] = time.perf_counter() - entered
        out = (graphdef, abstract)
    if stats is not None:
        s = loader.stats
        if not config.is_moe:
            stats["abstract_wait_s"] = abstract_s
            stats["abstract_done_s"] = done_at[0] - t0 if done_at else None
        stats.update(num_tensors=s.num_tensors, bytes=s.bytes_read, bytes_to_device=s.bytes_to_device,
                     seconds=s.seconds, peak_inflight_bytes=s.peak_inflight_bytes, format="safetensors",
                     **marks, **s.extra)
    return out


def mesh_sharding_for(mesh: Any, model_config: Any, parallel_config: Any) -> ShardingFor:
    """`sharding_for` of the engine's partition rules on `mesh` (sharding.placement's table)."""
    from sharding.placement import param_sharding_fn

    fn = param_sharding_fn(mesh, model_config, parallel_config)
    return lambda name, shape: fn(name, len(shape))
