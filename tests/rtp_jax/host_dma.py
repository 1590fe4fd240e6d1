"""Host-memory stand-ins for the CUDA driver's `HostDma` (`rtp_jax.loader.direct`), which enforce the
driver's rules: registrations page-aligned and disjoint, every copy inside one live registration."""

from __future__ import annotations

import ctypes
import mmap
import threading


class HostMemoryDma:
    """`HostDma` over host memory: memmove into the (CPU backend's) device buffers, with the driver's
    rules checked. `fail_after`: registrations after this many raise (once a copy was made), as an
    unsupported mapping would."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.live: dict[int, int] = {}
        self.lock = threading.Lock()
        self.registrations = self.copies = 0
        self.fail_after = fail_after
        self.copied = threading.Event()

    def register(self, address: int, nbytes: int) -> None:
        assert address % mmap.PAGESIZE == 0 and nbytes > 0
        if self.fail_after is not None and self.registrations >= self.fail_after:
            self.copied.wait(10)  # fail only once some job has copied, so both paths get exercised
            raise RuntimeError("cuMemHostRegister failed: CUDA_ERROR_NOT_SUPPORTED (801)")
        with self.lock:
            assert all(address + nbytes <= a or a + n <= address for a, n in self.live.items()), "overlap"
            self.live[address] = nbytes
            self.registrations += 1

    def unregister(self, address: int) -> None:
        with self.lock:
            del self.live[address]

    def copy_async(self, device, copies, lane=None):
        for dst, src, n in copies:
            with self.lock:
                assert any(a <= src and src + n <= a + m for a, m in self.live.items()), "copy from unpinned"
                self.copies += 1
            ctypes.memmove(dst, src, n)
        self.copied.set()
        return len(copies)

    def wait(self, handle):
        assert handle > 0


class DeferredDma(HostMemoryDma):
    """Like `HostMemoryDma`, but a copy happens only when its handle is waited for (as a DMA still queued
    behind others would): a slot reused before its copy was waited for hands the device the wrong bytes,
    and a copy waited for after its source was unregistered fails."""

    def __init__(self) -> None:
        super().__init__()
        self.queued: dict[int, list[tuple[int, int, int]]] = {}
        self.next = 0

    def copy_async(self, device, copies, lane=None):
        with self.lock:
            self.next += 1
            self.queued[self.next] = list(copies)
            return self.next

    def wait(self, handle):
        with self.lock:
            copies = self.queued.pop(handle)
        super().copy_async(None, copies)
