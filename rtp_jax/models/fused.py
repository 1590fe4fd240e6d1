"""Checkpoint tensors the model keeps fused: a dense MLP's gate and up projections as one parameter.

HF checkpoints store `model.layers.N.mlp.gate_proj.weight` and `...up_proj.weight`, each [I, D]; the model
holds `model.layers.N.mlp.gate_up_proj.weight` [2, I, D] (gate first) and runs both as one GEMM, which at
batch 1 reads the weights at 4.0 TB/s where two GEMMs read 3.7 (H200, bench/notes_bench.md 2026-12-01).

`fuse_stream` turns a stream of (checkpoint name, array) into the model's names: each half waits (on its
device, or on the host) until its partner arrives, then both are stacked by the caller's `stack` and
dropped, so at most one layer's pair is held twice, never the model's.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_HALF = re.compile(r"(model\.layers\.\d+\.mlp)\.(gate|up)_proj\.weight")
HALVES = ("gate", "up")  # order along the fused parameter's first axis

Stack = Callable[[str, list[Any]], Any]


def fused_name(checkpoint_name: str) -> tuple[str, int] | None:
    """(the model's parameter, index along its first axis) for a fused half, else None."""
    m = _HALF.fullmatch(checkpoint_name)
    return (f"{m[1]}.gate_up_proj.weight", HALVES.index(m[2])) if m else None


def fuse_stream(named: Iterable[tuple[str, Any]], stack: Stack) -> Iterator[tuple[str, Any]]:
    """(checkpoint name, array) -> (model name, array): halves are held until their pair is complete,
    then `stack(model_name, [gate, up])` gives the fused parameter. Raises on a half without its pair."""
    pending: dict[str, dict[int, tuple[str, Any]]] = {}
    for name, array in named:
        target = fused_name(name)
        if target is None:
            yield name, array
            continue
        fused, index = target
        halves = pending.setdefault(fused, {})
        if index in halves:
            raise ValueError(f"checkpoint tensor {name!r} appears twice")
        halves[index] = (name, array)
        if len(halves) == len(HALVES):
            parts = [halves[i][1] for i in range(len(HALVES))]
            shapes = {tuple(p.shape) for p in parts}
            if len(shapes) != 1:
                raise ValueError(f"{fused!r}: gate and up projections differ in shape: "
                                 f"{[tuple(p.shape) for p in parts]}")
            del pending[fused], halves
            yield fused, stack(fused, parts)
    for fused, halves in pending.items():
        have = [n for n, _ in halves.values()]
        raise ValueError(f"checkpoint has {have} but not its partner ({fused!r} needs both gate_proj "
                         "and up_proj)")
