"""Partition rules as data: parameter path (regex) -> logical axes -> mesh axes.

Two tables keep the rules readable and the mesh decisions in one place:
  PARAM_RULES  HF-style parameter path -> one logical axis name (or None) per array dimension
  logical_axes(model, parallel) -> {logical axis: mesh axis or None}
so "kv heads are replicated when there are fewer than tp" is one entry, not a special case per tensor.

Linear weights keep HF's [out, in] layout: column-parallel (q/k/v, gate/up) splits the out dim on tp
(dim 1 of the fused [2, I, D] gate/up, dim 0 (KV heads) of the fused
[kv_heads, group + 2, head_dim, D] q/k/v), row-parallel (o, down) splits dim 1 and XLA inserts the
all-reduce. MoE experts are stacked [E, out, in] and split on "ep" along E (and on "tp" along the
expert's intermediate size).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from jax.sharding import PartitionSpec

from rtp_jax.config import ModelConfig, ParallelConfig

Rule = tuple[str, tuple[str | None, ...]]

# First match wins; paths are `".".join(nnx path)`, i.e. HF names (experts stacked, see models/moe.py).
PARAM_RULES: tuple[Rule, ...] = (
    (r"model\.embed_tokens\.weight", ("vocab", None)),
    (r"lm_head\.weight", ("vocab", None)),
    # [kv_heads, group + 2, head_dim, D]: split by KV head (with its query heads), else on D (see below)
    (r".*\.self_attn\.qkv_proj\.weight", ("qkv_groups", None, None, "qkv_in")),
    (r".*\.self_attn\.qkv_proj\.bias", ("qkv_groups", None, None)),
    # the checkpoint's q/k/v, as the loader places them before they are fused: split alike
    (r".*\.self_attn\.[qkv]_proj\.weight", ("qkv_groups", "qkv_in")),
    (r".*\.self_attn\.[qkv]_proj\.bias", ("qkv_groups",)),
    (r".*\.self_attn\.o_proj\.weight", (None, "heads")),
    (r".*\.mlp\.gate_up_proj\.weight", (None, "mlp", None)),  # [2, I, D]: gate and up, split alike
    (r".*\.mlp\.(gate|up)_proj\.weight", ("mlp", None)),  # the checkpoint's halves, as the loader places them
    (r".*\.mlp\.down_proj\.weight", (None, "mlp")),
    (r".*\.mlp\.gate\.weight", (None, None)),  # router: tiny, every device routes every token
    (r".*\.mlp\.experts\.(gate|up)_proj", ("experts", "expert_mlp", None)),
    (r".*\.mlp\.experts\.down_proj", ("experts", None, "expert_mlp")),
    (r".*", ()),  # norms and anything else: replicated
)

# KV cache per layer: [num_blocks, block_size, kv_heads, head_dim].
KV_CACHE_AXES: tuple[str | None, ...] = (None, None, "kv_heads", None)


def logical_axes(mc: ModelConfig, pc: ParallelConfig) -> dict[str, str | None]:
    """Where each logical axis lives on the mesh for this model and layout."""
    tp = pc.tensor_parallel_size
    kv_split = mc.num_kv_heads % tp == 0
    return {
        "vocab": "tp",
        "heads": "tp",
        "kv_heads": "tp" if kv_split else None,  # fewer kv heads than tp: replicate the cache
        # Fused q/k/v go by KV head groups; where those cannot split, the weight splits on its input
        # dim instead (partial sums, one all-reduce per layer) rather than sit whole on every device.
        "qkv_groups": "tp" if kv_split else None,
        "qkv_in": None if kv_split else "tp",
        "mlp": "tp",
        "experts": "ep",
        "expert_mlp": "tp",
    }


def _to_spec(axes: Sequence[str | None], mapping: Mapping[str, str | None], ndim: int) -> PartitionSpec:
    if axes and len(axes) != ndim:
        raise ValueError(f"rule has {len(axes)} axes for an array of rank {ndim}")
    return PartitionSpec(*(None if a is None else mapping[a] for a in axes))


def param_spec(name: str, ndim: int, mapping: Mapping[str, str | None],
               rules: Sequence[Rule] = PARAM_RULES) -> PartitionSpec:
    for pattern, axes in rules:
        if re.fullmatch(pattern, name):
            return _to_spec(axes, mapping, ndim)
    raise ValueError(f"no partition rule matches {name!r}")


def param_specs(shapes: Mapping[str, Sequence[int]], mc: ModelConfig, pc: ParallelConfig,
                rules: Sequence[Rule] = PARAM_RULES) -> dict[str, PartitionSpec]:
    """name -> PartitionSpec for every parameter in `shapes`."""
    mapping = logical_axes(mc, pc)
    return {name: param_spec(name, len(shape), mapping, rules) for name, shape in shapes.items()}


def kv_cache_spec(mc: ModelConfig, pc: ParallelConfig) -> PartitionSpec:
    return _to_spec(KV_CACHE_AXES, logical_axes(mc, pc), 4)


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def param_stage(name: str, num_layers: int, pp: int) -> int:
    """Pipeline stage that owns a parameter: its layer's stage; the embedding on the first stage;
    the final norm and lm_head on the last."""
    m = _LAYER.match(name)
    if m:
        return int(m[1]) // (num_layers // pp)
    return 0 if name.startswith("model.embed_tokens") else pp - 1


def shard_shape(shape: Sequence[int], spec: PartitionSpec, axis_sizes: Mapping[str, int]) -> tuple[int, ...]:
    """Per-device shape of an array of `shape` under `spec`."""
    out = []
    for i, dim in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        div = 1
        for n in names:
            div *= axis_sizes.get(n, 1)
        out.append(dim // div)
    return tuple(out)
