"""Reading a safetensors checkpoint from disk: the plan (`PlannedTensor`s in file-offset order), `pread_into`
(loops over short reads) and `_Files`, the descriptors and mmaps shared by the loader's workers."""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtp_jax.loader.safetensors_io import TensorEntry, checkpoint_files, read_header

_MAX_PREAD = 1 << 30  # Linux caps one read at ~2 GiB; stay well under


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
