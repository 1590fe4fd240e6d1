"""What the fast loader reads for one tensor: the rows of axis 0 each local shard of a sharding covers
(shard keys, deduplicated across devices), and `_split_jobs`, which cuts those rows into the pipeline's
jobs (one per tensor, or row pieces of at most `split_bytes`). Pure host-side geometry, no I/O, no jax."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rtp_jax.loader.reading import PlannedTensor


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
