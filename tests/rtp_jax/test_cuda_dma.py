"""`CudaHostDma`'s use of the CUDA driver, checked against a recording stand-in for `libcuda`: which calls
may release the GIL (those that can block) and which keep it (those that return at once), and that copy
events are reused."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from rtp_jax.loader.cuda_dma import CudaHostDma

# The driver calls that can take milliseconds (pinning, unpinning, waiting, the first context retain).
BLOCKING = {"cuDevicePrimaryCtxRetain", "cuMemHostRegister_v2", "cuMemHostUnregister", "cuEventSynchronize"}


class _Call:
    def __init__(self, log: list[str], name: str, result: int) -> None:
        self._log, self._name, self._result = log, name, result
        self.argtypes: Any = None

    def __call__(self, *args: Any) -> int:
        self._log.append(self._name)
        return self._result


class RecordingDriver:
    """Answers every driver call with CUDA_SUCCESS (or `fail`'s code for the names in it) and records it."""

    def __init__(self, fail: dict[str, int] | None = None) -> None:
        self.calls: list[str] = []
        self._fail = fail or {}

    def __getattr__(self, name: str) -> _Call:
        call = _Call(self.calls, name, self._fail.get(name, 0))
        setattr(self, name, call)
        return call

    def answer(self, name: str, result: int) -> None:
        """From now on `name` returns `result`."""
        self._fail[name] = result
        getattr(self, name)._result = result


def _dma() -> tuple[CudaHostDma, RecordingDriver, RecordingDriver]:
    lib, quick = RecordingDriver(), RecordingDriver()
    return CudaHostDma(lib, quick), lib, quick


def test_only_calls_that_can_block_release_the_gil():
    """Registering, copying a chunk, waiting for it and unregistering: the blocking calls go through the
    GIL-releasing handle, and a chunk's copy costs exactly one of them (its wait), so a ring thread does not
    queue for the GIL behind Python-running threads after every driver call."""
    dma, lib, quick = _dma()
    device = SimpleNamespace(id=0)
    dma.register(4096, 1 << 20)
    dma.wait(dma.copy_async(device, [(1 << 30, 4096, 8192)], lane=0))
    lib.calls.clear()
    quick.calls.clear()
    quick.answer("cuEventQuery", 600)  # CUDA_ERROR_NOT_READY: the copy is still running
    dma.wait(dma.copy_async(device, [(1 << 30, 4096, 8192), (2 << 30, 12288, 8192)], lane=0))
    assert lib.calls == ["cuEventSynchronize"]
    assert quick.calls.count("cuMemcpyHtoDAsync_v2") == 2 and "cuEventRecord" in quick.calls
    assert not BLOCKING & set(quick.calls)
    dma.unregister(4096)
    assert lib.calls[-1] == "cuMemHostUnregister"


def test_a_finished_copy_is_waited_for_without_releasing_the_gil():
    """When the event says the copy is done, the wait makes no blocking call at all."""
    dma, lib, quick = _dma()
    device = SimpleNamespace(id=0)
    dma.wait(dma.copy_async(device, [(1 << 30, 4096, 64)], lane=0))
    assert "cuEventQuery" in quick.calls and "cuEventSynchronize" not in lib.calls


def test_completed_events_are_reused():
    """Events go back to a per-device free list once waited for: a second chunk creates none."""
    dma, _, quick = _dma()
    device = SimpleNamespace(id=0)
    dma.wait(dma.copy_async(device, [(1 << 30, 4096, 64)]))
    quick.calls.clear()
    dma.wait(dma.copy_async(device, [(1 << 30, 4096, 64)], lane=1))
    assert "cuEventCreate" not in quick.calls


def test_a_failed_copy_names_the_driver_call():
    """A driver error surfaces as a RuntimeError naming the call that failed."""
    lib, quick = RecordingDriver(), RecordingDriver(fail={"cuMemcpyHtoDAsync_v2": 1})
    dma = CudaHostDma(lib, quick)
    with pytest.raises(RuntimeError, match="cuMemcpyHtoDAsync failed"):
        dma.copy_async(SimpleNamespace(id=0), [(1 << 30, 4096, 64)])
