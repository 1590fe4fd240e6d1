"""The CUDA driver calls of the loader's direct path (`loader.direct`), in one place: pinning read-only
host ranges (`cuMemHostRegister` with CU_MEMHOSTREGISTER_READ_ONLY, which PJRT's `dma_map` does not pass),
and asynchronous host-to-device copies on our own streams, completed through events. Through ctypes on
`libcuda.so.1`, in each device's primary context, which XLA uses too, so device addresses of XLA buffers
(`unsafe_buffer_pointer`) are valid here."""

from __future__ import annotations

import ctypes
import functools
import threading
from typing import Any

_READ_ONLY_REGISTER_ATTRIBUTE = 113  # CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED
_REGISTER_FLAGS = 0x08 | 0x01  # CU_MEMHOSTREGISTER_READ_ONLY | CU_MEMHOSTREGISTER_PORTABLE
_STREAM_NON_BLOCKING = 0x1
_EVENT_FLAGS = 0x1 | 0x2  # CU_EVENT_BLOCKING_SYNC | CU_EVENT_DISABLE_TIMING: a waiter sleeps, not spins
_NOT_READY = 600  # CUDA_ERROR_NOT_READY: cuEventQuery of an event whose work is still running
_COPY_STREAMS = 2  # per device: one copy engine per direction; two keeps it fed between submissions


class CudaHostDma:
    """`HostDma` through the CUDA driver (ctypes), in each device's primary context, which XLA uses too.

    `lib` makes the calls that can block (pinning, unpinning, waiting for a copy) and releases the GIL
    around them, as `ctypes.CDLL` does. `quick` makes the calls that return within microseconds (setting
    the context, queueing a copy from pinned memory, recording an event) and keeps the GIL, as
    `ctypes.PyDLL` does: a released GIL is re-taken only after the thread holding it lets go, up to the
    interpreter's 5 ms switch interval when that thread runs Python (the abstract model's build, the
    loader's consumer), and the ring made five such calls per 8 MiB chunk. Defaults to `lib`."""

    def __init__(self, lib: Any, quick: Any = None) -> None:
        self._lib = lib
        self._quick = quick = lib if quick is None else quick
        c = ctypes
        quick.cuMemcpyHtoDAsync_v2.argtypes = [c.c_uint64, c.c_void_p, c.c_size_t, c.c_void_p]
        lib.cuMemHostRegister_v2.argtypes = [c.c_void_p, c.c_size_t, c.c_uint]
        lib.cuMemHostUnregister.argtypes = [c.c_void_p]
        self._contexts: dict[int, ctypes.c_void_p] = {}
        self._streams: dict[int, list[ctypes.c_void_p]] = {}
        self._lanes: dict[tuple[int, int], ctypes.c_void_p] = {}
        self._events: dict[int, list[ctypes.c_void_p]] = {}  # per device: completed events, for reuse
        self._turn = 0
        self._lock = threading.Lock()
        self._first = 0

    def _check(self, result: int, what: str) -> None:
        if result:
            name = ctypes.c_char_p()
            self._quick.cuGetErrorName(result, ctypes.byref(name))
            raise RuntimeError(f"{what} failed: {(name.value or b'?').decode()} ({result})")

    def _device(self, ordinal: int) -> ctypes.c_int:
        dev = ctypes.c_int()
        self._check(self._quick.cuDeviceGet(ctypes.byref(dev), ordinal), "cuDeviceGet")
        return dev

    def supports(self, ordinal: int) -> bool:
        value = ctypes.c_int()
        self._check(self._quick.cuDeviceGetAttribute(ctypes.byref(value), _READ_ONLY_REGISTER_ATTRIBUTE,
                                                   self._device(ordinal)), "cuDeviceGetAttribute")
        return bool(value.value)

    def _enter(self, ordinal: int) -> None:
        with self._lock:
            ctx = self._contexts.get(ordinal)
            if ctx is None:
                ctx = ctypes.c_void_p()
                self._check(self._lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), self._device(ordinal)),
                            "cuDevicePrimaryCtxRetain")
                self._contexts[ordinal] = ctx
        self._check(self._quick.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")

    def register(self, address: int, nbytes: int) -> None:
        self._enter(self._first)  # portable: one registration serves every device
        self._check(self._lib.cuMemHostRegister_v2(address, nbytes, _REGISTER_FLAGS), "cuMemHostRegister")

    def unregister(self, address: int) -> None:
        self._enter(self._first)
        self._check(self._lib.cuMemHostUnregister(address), "cuMemHostUnregister")

    def _new_stream(self) -> ctypes.c_void_p:
        stream = ctypes.c_void_p()
        self._check(self._quick.cuStreamCreate(ctypes.byref(stream), _STREAM_NON_BLOCKING), "cuStreamCreate")
        return stream

    def _stream(self, ordinal: int, lane: int | None) -> ctypes.c_void_p:
        """The caller's own stream for `lane` (copies of one lane run in order, beside other lanes'), or the
        next of the device's shared streams."""
        with self._lock:
            if lane is not None:
                stream = self._lanes.get((ordinal, lane))
                if stream is None:
                    stream = self._lanes[ordinal, lane] = self._new_stream()
                return stream
            streams = self._streams.get(ordinal)
            if streams is None:
                streams = self._streams[ordinal] = [self._new_stream() for _ in range(_COPY_STREAMS)]
            self._turn = (self._turn + 1) % len(streams)
            return streams[self._turn]

    def copy_async(self, device: Any, copies: list[tuple[int, int, int]], lane: int | None = None) -> Any:
        ordinal = _ordinal(device)
        self._enter(ordinal)
        stream = self._stream(ordinal, lane)
        for dst, src, n in copies:
            self._check(self._quick.cuMemcpyHtoDAsync_v2(dst, src, n, stream), "cuMemcpyHtoDAsync")
        with self._lock:
            free = self._events.get(ordinal)
            event = free.pop() if free else None
        if event is None:  # the ring copies ~2000 chunks per 16 GB load: events are reused, not remade
            event = ctypes.c_void_p()
            self._check(self._quick.cuEventCreate(ctypes.byref(event), _EVENT_FLAGS), "cuEventCreate")
        self._check(self._quick.cuEventRecord(event, stream), "cuEventRecord")
        return ordinal, event

    def wait(self, handle: Any) -> None:
        # A copy is usually done by the time its slot comes round again: asked first without releasing
        # the GIL. Otherwise blocking-sync events: the waiter sleeps in the driver until the copy is done
        # (ctypes releases the GIL), instead of spinning (a dozen spinning waiters starve the other
        # threads of CPU) or polling with sleeps (~0.1 ms late per wake-up: with 2 slots per ring thread
        # that stalls it).
        ordinal, event = handle
        self._enter(ordinal)
        try:
            status = self._quick.cuEventQuery(event)
            if status == _NOT_READY:
                status = self._lib.cuEventSynchronize(event)
            self._check(status, "cuEventSynchronize")
        except BaseException:
            self._quick.cuEventDestroy_v2(event)
            raise
        with self._lock:
            self._events.setdefault(ordinal, []).append(event)


def _ordinal(device: Any) -> int:
    hw = getattr(device, "local_hardware_id", None)
    return int(hw if hw is not None else device.id)


@functools.lru_cache(maxsize=1)
def host_dma() -> CudaHostDma | None:
    """The CUDA driver's `HostDma` when every local device is a CUDA GPU that can pin read-only host
    memory; None otherwise (then the loader keeps to its staging slab)."""
    import jax

    devices = jax.local_devices()
    if not devices or devices[0].platform != "gpu":
        return None
    if "cuda" not in str(getattr(devices[0].client, "platform_version", "")).lower():
        return None
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        if lib.cuInit(0):
            return None
        dma = CudaHostDma(lib, ctypes.PyDLL("libcuda.so.1"))
        if not all(dma.supports(_ordinal(d)) for d in devices):
            return None
        dma._first = _ordinal(devices[0])
        return dma
    except (OSError, AttributeError, RuntimeError):
        return None
