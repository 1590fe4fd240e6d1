"""Reads HF safetensors checkpoints tensor by tensor, in on-disk order.

The format is an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}}` (offsets relative to the end of the
header), then the raw little-endian data. We parse it ourselves so tensors come out in the order
they lie in the file: one sequential sweep per file, which is what a disk (or a later parallel
reader that splits the sweep into ranges) reads fastest.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from rtp_jax.loader.paths import safetensors_files

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}

_MAX_HEADER = 100 * 1024 * 1024  # a header this large means a corrupt or foreign file


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's place in a safetensors file; `start`/`end` are absolute byte offsets."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: Path) -> list[TensorEntry]:
    """Parses the header of one safetensors file; returns its tensors sorted by data offset."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise ValueError(f"{path}: header length {n} is implausible; not a safetensors file?")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
    base = 8 + n
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']!r}")
        begin, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        entries.append(TensorEntry(name, dtype, tuple(info["shape"]), base + begin, base + end))
    entries.sort(key=lambda e: e.start)
    return entries


def read_tensor(f, entry: TensorEntry) -> np.ndarray:
    """Reads one tensor from an open binary file into a fresh array of its stored dtype and shape."""
    nbytes = entry.end - entry.start
    expected = int(np.prod(entry.shape, dtype=np.int64)) * entry.dtype.itemsize
    if nbytes != expected:
        raise ValueError(
            f"tensor {entry.name!r}: {nbytes} bytes on disk, but shape {entry.shape} needs {expected}"
        )
    buf = np.empty(nbytes, dtype=np.uint8)
    f.seek(entry.start)
    if f.readinto(memoryview(buf)) != nbytes:
        raise ValueError(f"tensor {entry.name!r}: file ends before its data does (truncated checkpoint?)")
    return buf.view(entry.dtype).reshape(entry.shape)


def checkpoint_files(directory: Path) -> list[Path]:
    """The files holding the weights: those named by model.safetensors.index.json, else all *.safetensors."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files = sorted({directory / v for v in weight_map.values()})
        missing = [str(p.name) for p in files if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{directory}: index names shard files that are missing: {missing}")
        return files
    files = safetensors_files(directory)
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors files")
    return files


def iter_safetensors(directory: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yields every (name, array) of a checkpoint directory, file by file, each file in offset order."""
    for path in checkpoint_files(directory):
        entries = read_header(path)
        with open(path, "rb", buffering=0) as f:
            for entry in entries:
                yield entry.name, read_tensor(f, entry)
