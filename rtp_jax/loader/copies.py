"""The fast loader's jobs that reach the devices without the staging slab, as whole tensors copied by the
CUDA driver into device buffers: from the pinned page cache (`loader.direct`, opt-in) or through the ring
of cache-resident pinned slots (`loader.ring`, the default where the driver is available). One object
chooses which tensors go which way, starts both, hands each job its result, and closes both; everything
else goes through the slab (`FastLoader.iter_device`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from rtp_jax.loader import direct as direct_mod
from rtp_jax.loader.direct import (
    DirectConfig,
    DirectCopier,
    HostDma,
    _byte_range,
    choose_direct,
    direct_job,
    direct_result,
    open_page_cache,
)
from rtp_jax.loader.reading import PlannedTensor
from rtp_jax.loader.ring import RingConfig, RingCopier
from rtp_jax.loader.shards import _is_full, _Job


def choose_ring(plan: list[PlannedTensor], reads: dict[str, dict[Any, Any]], exclude: set[str]) -> set[str]:
    """Names of the tensors the ring copies: in a file already in the page cache (a cold file reads
    faster through the slab's large parallel reads: 16 GB from disk took 11.2 s through the ring's 4 MiB
    chunks against 9.2 s for the disk's own parallel read on the H200 host), with bytes to copy and
    whole rows per shard in `reads` (a column slice needs a host copy first), not in `exclude`."""
    warm = {p for p in {t.path for t in plan} if direct_mod.file_resident(p)}
    return {t.name for t in plan if t.name not in exclude and t.nbytes > 0 and t.path in warm
            and all(_is_full(rest, t.entry.shape) for _, _, rest in reads[t.name].values())}


def open_ring(ring: bool | HostDma, config: RingConfig) -> RingCopier | None:
    """A ring with registered slots: through `ring` (a `HostDma`), or the CUDA driver's where every local
    device is a CUDA GPU (`ring=True`); None where there is none or registration fails."""
    if ring is False:
        return None
    from rtp_jax.loader.cuda_dma import host_dma

    dma = host_dma() if ring is True else ring
    if dma is None:
        return None
    try:
        return RingCopier(dma, config)
    except Exception:  # noqa: BLE001 - e.g. registration refused: the slab stages everything
        return None


class RingSetup:
    """The ring of one loader: `prepare()` sets it up in a background thread (pinning and registering
    release the GIL), `take()` hands it to one pass (set up then, without `prepare`; None with
    `ring=False` or where it cannot run), `close()` closes one prepared and never taken."""

    def __init__(self, ring: bool | HostDma, config: RingConfig) -> None:
        self._ring, self._config = ring, config
        self._future: Future[RingCopier | None] | None = None

    def prepare(self) -> None:
        if self._ring is False or self._future is not None:
            return
        future: Future[RingCopier | None] = Future()

        def run() -> None:
            try:
                future.set_result(open_ring(self._ring, self._config))
            except BaseException as e:  # noqa: BLE001 - handed to whoever takes it
                future.set_exception(e)

        self._future = future
        threading.Thread(target=run, name="rtp-ring-setup", daemon=True).start()

    def take(self) -> RingCopier | None:
        future, self._future = self._future, None
        return future.result() if future is not None else open_ring(self._ring, self._config)

    def close(self) -> None:
        if self._future is not None and (ring := self.take()) is not None:
            ring.close()


class DeviceCopies:
    """Which tensors of a plan go direct or through `ring` (an opened `RingCopier`, or None; this object
    closes it), each as a whole tensor (`whole(name)`: not cut into row pieces), and each such job's result
    (`result(job)`); `close()` ends both and records their stats."""

    def __init__(self, plan: list[PlannedTensor], reads: dict[str, dict[Any, Any]], direct: bool | HostDma,
                 direct_config: DirectConfig, ring: RingCopier | None) -> None:
        self.source = open_page_cache(plan, direct, direct_config)
        self.chosen = choose_direct(plan, self.source, reads, direct_config)
        self.ring = ring
        self.ringed = choose_ring(plan, reads, self.chosen) if self.ring is not None else set()
        self.copier: DirectCopier | None = None
        self._specs: dict[int, Any] = {}
        self._ring_ids: set[int] = set()

    def whole(self, name: str) -> bool:
        return name in self.chosen or name in self.ringed

    def start(self, jobs: list[_Job], sharding_of: Callable[[PlannedTensor], Any]) -> None:
        direct = [job for job in jobs if job.tensor.name in self.chosen]
        ringed = [job for job in jobs if job.tensor.name in self.ringed]
        self._specs = {id(job): direct_job(job, sharding_of(job.tensor)) for job in direct + ringed}
        self._ring_ids = {id(job) for job in ringed}
        if self.source is not None:
            for job in direct:
                for _, r0, r1, _ in job.ranges:
                    self.source.expect(job.tensor.path, *_byte_range(job.tensor, r0, r1))
            self.source.start()
            self.copier = DirectCopier(self.source, [self._specs[id(job)] for job in direct])
        if self.ring is not None:
            self.ring.start([self._specs[id(job)] for job in ringed])

    def takes(self, job: _Job) -> bool:
        return id(job) in self._specs

    def result(self, job: _Job, sharding: Any) -> tuple[Any, int] | None:
        """(array or piece, bytes sent) of a job this object `takes`, once copied; None when its direct
        copy could not be made (pinning failed: the host path reads it)."""
        spec = self._specs[id(job)]
        if id(job) in self._ring_ids:
            assert self.ring is not None
            return direct_result(job, sharding, self.ring.collect(spec))
        assert self.source is not None and self.copier is not None
        if job.tensor.path not in self.source:
            return None
        try:
            return direct_result(job, sharding, self.copier.collect(spec))
        except RuntimeError:  # pinning failed: this and later jobs take the host path
            if self.source.failed is None:
                raise
            return None

    def cancel(self) -> None:
        """Stops the ring: what it has not copied is cancelled (its waiters raise), so the loader's workers
        return at once after an early exit; once every job was collected it only joins its idle threads.
        Its slots are released by `close`."""
        if self.ring is not None:
            self.ring.cancel()

    def close(self, extra: dict[str, Any], release_in_background: bool, slab: bool) -> None:
        """Ends both once the loader's workers are done and records their stats in `extra` (whose
        "staging" names every route that carried bytes)."""
        if self.source is not None:
            self.source.stop()  # an early exit leaves the copier waiting for chunks nobody will pin
        if self.copier is not None:
            self.copier.close()
            extra.update(fill_wait_s=self.copier.fill_wait_s, submit_s=self.copier.submit_s)
        if self.source is not None:
            extra.update(self.source.stats())
            if release_in_background:  # unpinning 16 GB takes ~0.15 s
                threading.Thread(target=self.source.close, name="rtp-unpin-all", daemon=True).start()
            else:
                self.source.close()
        if self.ring is not None:
            extra.update(self.ring.stats())  # final: every job was collected, or cancelled and joined
            if release_in_background:  # unregistering and unmapping take ~10 ms
                threading.Thread(target=self.ring.close, name="rtp-ring-close", daemon=True).start()
            else:
                self.ring.close()
        routes = [name for name, obj in (("direct", self.source), ("ring", self.ring))
                  if obj is not None and obj.bytes]
        if routes:
            extra["staging"] = "+".join(routes + ([extra.get("staging", "none")] if slab else []))
