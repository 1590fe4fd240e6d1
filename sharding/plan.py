"""`plan()`: what a layout costs per device, before any device is touched (notebook-friendly).

    from sharding import plan
    p = plan(model_config, ParallelConfig(tensor_parallel_size=4), dtype="bfloat16", batch_tokens=64)
    p.weight_bytes_per_device, p.kv_bytes_per_token_per_device, p.collective_bytes_per_step

Collective volumes are per decode step of `batch_tokens` tokens, in bytes sent per device
(ring all-reduce: 2 (n-1)/n of the buffer; all-gather: (n-1)/n of the result).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from jax.sharding import PartitionSpec

from rtp_jax.config import ModelConfig, ParallelConfig
from sharding.mesh import AXES, mesh_shape, validate
from sharding.rules import kv_cache_spec, param_specs, param_stage, shard_shape

_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


def hf_param_shapes(mc: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of every parameter: HF names, MoE experts stacked [E, out, in] (as in
    models/moe.py), a dense MLP's gate and up projections fused [2, I, D] and q/k/v fused
    [kv_heads, group + 2, head_dim, D] (models/fused.py)."""
    d, hd, v = mc.hidden_size, mc.head_dim, mc.vocab_size
    q = mc.num_heads * hd
    qkv = (mc.num_kv_heads, mc.num_heads // mc.num_kv_heads + 2, hd)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not mc.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    for i in range(mc.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                   p + "self_attn.qkv_proj.weight": (*qkv, d), p + "self_attn.o_proj.weight": (d, q)}
        if mc.attention_bias:
            shapes[p + "self_attn.qkv_proj.bias"] = qkv
        if mc.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
        if mc.is_moe:
            e, m = mc.num_experts, mc.expert_intermediate_size
            shapes |= {p + "mlp.gate.weight": (e, d), p + "mlp.experts.gate_proj": (e, m, d),
                       p + "mlp.experts.up_proj": (e, m, d), p + "mlp.experts.down_proj": (e, d, m)}
        else:
            m = mc.intermediate_size
            shapes |= {p + "mlp.gate_up_proj.weight": (2, m, d),
                       p + "mlp.down_proj.weight": (d, m)}
    return shapes


@dataclass(frozen=True)
class Collective:
    what: str
    kind: str  # "all-reduce" | "all-gather" | "send"
    axes: tuple[str, ...]
    count: int  # per decode step
    bytes_per_device: int  # per occurrence


@dataclass(frozen=True)
class ShardingPlan:
    mesh: dict[str, int]
    dtype: str
    specs: dict[str, PartitionSpec]
    shard_shapes: dict[str, tuple[int, ...]]
    weight_bytes_total: int
    weight_bytes_per_device: int  # the most loaded device (stages can differ)
    kv_spec: PartitionSpec
    kv_bytes_per_token_per_device: int
    kv_tokens: int
    batch_tokens: int
    collectives: tuple[Collective, ...] = field(default=())

    @property
    def kv_bytes_per_device(self) -> int:
        return self.kv_bytes_per_token_per_device * self.kv_tokens

    @property
    def collective_bytes_per_step(self) -> int:
        return sum(c.count * c.bytes_per_device for c in self.collectives)

    def __str__(self) -> str:
        mesh = " x ".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [
            f"mesh {mesh} ({math.prod(self.mesh.values())} devices), {self.dtype}",
            f"weights: {_fmt(self.weight_bytes_total)} total, "
            f"{_fmt(self.weight_bytes_per_device)} per device",
            f"kv cache {tuple(self.kv_spec)}: {_fmt(self.kv_bytes_per_token_per_device)} per token "
            f"per device, {_fmt(self.kv_bytes_per_device)} for {self.kv_tokens} tokens",
            f"collectives per decode step of {self.batch_tokens} tokens "
            f"({_fmt(self.collective_bytes_per_step)} sent per device):",
        ]
        lines += [f"  {c.count:4d} x {c.kind:10s} over {'x'.join(c.axes):6s} "
                  f"{_fmt(c.bytes_per_device):>10s}  {c.what}" for c in self.collectives] or ["  none"]
        return "\n".join(lines)


def _fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _all_reduce(n: int, nbytes: int) -> int:
    return 2 * (n - 1) * nbytes // n


def collectives(mc: ModelConfig, pc: ParallelConfig, itemsize: int, batch_tokens: int) -> list[Collective]:
    """What XLA and the MoE/pipeline code send per decode step (per device, per occurrence)."""
    tp, pp, ep = pc.tensor_parallel_size, pc.pipeline_parallel_size, pc.expert_parallel_size
    act = batch_tokens * mc.hidden_size * itemsize
    out: list[Collective] = []
    if tp > 1:
        reduce_act = _all_reduce(tp, act)
        out.append(Collective("embedding (vocab split)", "all-reduce", ("tp",), 1, reduce_act))
        out.append(Collective("attention o_proj", "all-reduce", ("tp",), mc.num_layers, reduce_act))
        if mc.num_kv_heads % tp:  # fused q/k/v split on the hidden dim (sharding/rules.py)
            qkv = batch_tokens * (mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim * itemsize
            out.append(Collective("attention qkv_proj (hidden split)", "all-reduce", ("tp",), mc.num_layers,
                                  _all_reduce(tp, qkv)))
        if not mc.is_moe:
            out.append(Collective("mlp down_proj", "all-reduce", ("tp",), mc.num_layers, reduce_act))
        logits = batch_tokens * mc.vocab_size * 4
        out.append(Collective("logits (vocab split, f32)", "all-gather", ("tp",), 1, (tp - 1) * logits // tp))
    if mc.is_moe and ep * tp > 1:
        axes = tuple(a for a, n in (("ep", ep), ("tp", tp)) if n > 1)
        out.append(Collective("moe combine (f32)", "all-reduce", axes, mc.num_layers,
                              _all_reduce(ep * tp, batch_tokens * mc.hidden_size * 4)))
    if pp > 1:
        out.append(Collective("stage boundary activations", "send", ("pp",), pp - 1, act))
    return out


def plan(mc: ModelConfig, pc: ParallelConfig, *, dtype: str = "bfloat16", batch_tokens: int = 1,
         kv_tokens: int | None = None, verbose: bool = True) -> ShardingPlan:
    """Per-device weight and KV-cache bytes and per-step collective traffic of a layout; prints it
    when `verbose`. Raises ValueError when the layout does not fit the model."""
    validate(mc, pc)
    itemsize = _ITEMSIZE[dtype]
    shapes = hf_param_shapes(mc)
    specs = param_specs(shapes, mc, pc)
    sizes = dict(zip(AXES, mesh_shape(pc), strict=True))
    shard_shapes = {n: shard_shape(shapes[n], specs[n], sizes) for n in shapes}
    per_stage = [0] * pc.pipeline_parallel_size
    for name, shp in shard_shapes.items():
        per_stage[param_stage(name, mc.num_layers, pc.pipeline_parallel_size)] += int(np.prod(shp)) * itemsize
    if mc.tie_word_embeddings and pc.pipeline_parallel_size > 1:  # the last stage keeps a copy for lm_head
        per_stage[-1] += int(np.prod(shard_shapes["model.embed_tokens.weight"])) * itemsize
    kv_spec = kv_cache_spec(mc, pc)
    kv_heads = shard_shape((1, 1, mc.num_kv_heads, mc.head_dim), kv_spec, sizes)[2]
    layers = mc.num_layers // pc.pipeline_parallel_size
    result = ShardingPlan(
        mesh=sizes, dtype=dtype, specs=specs, shard_shapes=shard_shapes,
        weight_bytes_total=sum(int(np.prod(s)) for s in shapes.values()) * itemsize,
        weight_bytes_per_device=max(per_stage), kv_spec=kv_spec,
        kv_bytes_per_token_per_device=2 * layers * kv_heads * mc.head_dim * itemsize,
        kv_tokens=kv_tokens if kv_tokens is not None else mc.max_position_embeddings,
        batch_tokens=batch_tokens,
        collectives=tuple(collectives(mc, pc, itemsize, batch_tokens)),
    )
    if verbose:
        print(result)
    return result
