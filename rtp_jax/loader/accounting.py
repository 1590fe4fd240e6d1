"""The accounting of one loader pass: `ByteBudget` bounds the host bytes in flight (and records their
peak), `LoadStats` records what the pass moved and how long it took. Kept apart from the pipeline so the
counters can be read and tested without it."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


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
    # per job: (start, read done, transfer done), perf_counter seconds
    job_times: list[tuple[float, float, float]] = field(default_factory=list)

    @property
    def gbps(self) -> float:
        return self.bytes_read / self.seconds / 1e9 if self.seconds else 0.0


def covered_s(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by at least one of the [start, end) intervals (their union's length)."""
    total, cur_start, cur_end = 0.0, None, None
    for a, b in sorted(intervals):
        if cur_end is None or a > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = a, b
        else:
            cur_end = max(cur_end, b)
    return total + (cur_end - cur_start if cur_end is not None else 0.0)


def phase_summary(stats: LoadStats, t0: float) -> dict[str, float]:
    """Where a pass's wall time went: seconds during which some job was reading (`read_busy_s`) or
    transferring (`transfer_busy_s`), the mean number of jobs doing each, and when the first job started
    and the last one finished after `t0`."""
    jobs = stats.job_times
    if not jobs:
        return {}
    reads = [(a, b) for a, b, _ in jobs]
    sends = [(b, c) for _, b, c in jobs]
    read_busy, send_busy = covered_s(reads), covered_s(sends)
    return {
        "read_busy_s": read_busy, "transfer_busy_s": send_busy,
        "mean_reading": sum(b - a for a, b in reads) / read_busy if read_busy else 0.0,
        "mean_transferring": sum(b - a for a, b in sends) / send_busy if send_busy else 0.0,
        "first_job_start_s": min(a for a, _, _ in jobs) - t0,
        "last_job_end_s": max(c for _, _, c in jobs) - t0,
    }
