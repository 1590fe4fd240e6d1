"""Checkpoint tensors the model keeps fused, so one GEMM reads what HF stores as two or three.

- A dense MLP's `gate_proj` and `up_proj` ([I, D] each) become `mlp.gate_up_proj.weight` [2, I, D]
  (gate first). At batch 1 one GEMM reads both at 4.0 TB/s where two read 3.7 (H200, notes_bench.md).
- An attention layer's `q_proj`, `k_proj`, `v_proj` become `self_attn.qkv_proj.weight`
  [kv_heads, group + 2, head_dim, D] (biases [kv_heads, group + 2, head_dim]): per KV head, its `group`
  query heads (HF's GQA order: query head h reads KV head h // group), then its K and its V head. Left
  apart, XLA merges the three GEMMs itself by concatenating the weights on every step (a 50 MB copy per
  layer of Llama-3-8B, ~26 us on an H200) or by a slower Triton fusion. Grouped by KV head, the fused
  weight splits on tensor parallelism along its first axis exactly as q (by heads) and k/v (by KV heads)
  did.

`fuse_stream` turns a stream of (checkpoint name, array) into the model's names: each part waits (on its
device, or on the host) until its siblings arrive, then they are combined by the caller's `combine` and
dropped, so at most one layer's parts are held twice, never the model's. `fuse_parts` is the combination
itself, for numpy arrays or jax arrays alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

# checkpoint part -> (prefix, part, suffix); the fused parameter is f"{prefix}.{fused}.{suffix}"
_PARTS: tuple[tuple[re.Pattern[str], str, tuple[str, ...]], ...] = (
    (re.compile(r"(model\.layers\.\d+\.mlp)\.(gate|up)_proj\.(weight)"), "gate_up_proj", ("gate", "up")),
    (re.compile(r"(model\.layers\.\d+\.self_attn)\.(q|k|v)_proj\.(weight|bias)"), "qkv_proj",
     ("q", "k", "v")),
)

Combine = Callable[[str, list[Any]], Any]


def fused_name(checkpoint_name: str) -> tuple[str, int] | None:
    """(the model's parameter, index of this part among its parts) for a fused part, else None."""
    for pattern, fused, parts in _PARTS:
        m = pattern.fullmatch(checkpoint_name)
        if m:
            return f"{m[1]}.{fused}.{m[3]}", parts.index(m[2])
    return None


def fusion_kind(fused: str) -> str:
    """"qkv_proj" or "gate_up_proj": the fusion of a fused parameter name (or of the kind itself), so
    per-layer names share one combining program."""
    return "qkv_proj" if "qkv_proj" in fused else "gate_up_proj"


def _num_parts(fused: str) -> int:
    return 3 if fusion_kind(fused) == "qkv_proj" else 2


def fused_shape(fused: str, part_shapes: Sequence[tuple[int, ...]], head_dim: int) -> tuple[int, ...]:
    """Shape of the fused parameter from its parts' shapes; raises ValueError naming the parameter when
    the parts do not fit together."""
    shapes = [tuple(s) for s in part_shapes]
    if fusion_kind(fused) != "qkv_proj":
        if len(set(shapes)) != 1:
            raise ValueError(f"{fused!r}: gate and up projections differ in shape: {shapes}")
        return (len(shapes), *shapes[0])
    (q, *q_rest), (k, *k_rest), (v, *v_rest) = shapes
    if not (k == v and q_rest == k_rest == v_rest and k % head_dim == 0 and q % k == 0 and k > 0):
        raise ValueError(f"{fused!r}: q/k/v projections of shapes {shapes} do not fit head_dim {head_dim} "
                         "(k and v alike, q rows a multiple of k rows, k rows a multiple of head_dim)")
    kv_heads = k // head_dim
    return (kv_heads, q // k + 2, head_dim, *q_rest)


def fuse_parts(fused: str, parts: Sequence[Any], head_dim: int, xp: Any = np) -> Any:
    """The fused parameter from its parts (numpy with xp=np, jax arrays with xp=jax.numpy)."""
    shape = fused_shape(fused, [tuple(p.shape) for p in parts], head_dim)
    if fusion_kind(fused) != "qkv_proj":
        return xp.stack(list(parts))
    kv_heads, _, _, *rest = shape
    q, k, v = (p.reshape(kv_heads, -1, head_dim, *rest) for p in parts)
    return xp.concatenate([q, k, v], axis=1)


def fuse_stream(named: Iterable[tuple[str, Any]], combine: Combine) -> Iterator[tuple[str, Any]]:
    """(checkpoint name, array) -> (model name, array): parts are held until their set is complete,
    then `combine(model_name, parts)` (parts in the fused order) gives the fused parameter. Raises on a
    part that appears twice or lacks a sibling."""
    pending: dict[str, dict[int, tuple[str, Any]]] = {}
    for name, array in named:
        target = fused_name(name)
        if target is None:
            yield name, array
            continue
        fused, index = target
        have = pending.setdefault(fused, {})
        if index in have:
            raise ValueError(f"checkpoint tensor {name!r} appears twice")
        have[index] = (name, array)
        if len(have) == _num_parts(fused):
            parts = [have[i][1] for i in range(len(have))]
            del pending[fused], have
            yield fused, combine(fused, parts)
    for fused, have in pending.items():
        names = [n for n, _ in have.values()]
        raise ValueError(f"checkpoint has {names} but not all of the tensors {fused!r} is made of "
                         "(gate_proj and up_proj, or q_proj, k_proj and v_proj)")
