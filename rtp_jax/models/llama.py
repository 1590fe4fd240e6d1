"""Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3) as Flax NNX modules.

Attribute names follow HF's parameter names (`model.layers.0.self_attn.o_proj.weight`), and linear
weights keep HF's [out, in] layout, so loading a checkpoint is a rename, not a conversion, except where
HF's tensors are fused (models/fused.py: q/k/v into `qkv_proj`, gate/up into `gate_up_proj`).
Family differences are config flags: `attention_bias` (Qwen2), `qk_norm` (Qwen3),
`sliding_window` (Mistral), `tie_word_embeddings`, `rope_scaling`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from rtp_jax.config import ModelConfig
from rtp_jax.models.attention import (
    AttentionFn,
    AttentionMetadata,
    decode_qkv_splits,
    fused_decoder,
    kv_writer,
    rms_norm,
)
from rtp_jax.models.residual import (
    Hidden,
    Pending,
    add_norm_hidden,
    add_norm_of,
    residual_splits,
    split_k_partials,
    sum_partials,
)
from rtp_jax.models.rope import apply_rope, rope_tables

KVCache = tuple[jax.Array, jax.Array]  # (k, v), each [num_blocks, block_size, kv_heads, head_dim]


Weight = jax.Array | jax.ShapeDtypeStruct


class Module(nnx.Module, pytree=False):
    """Base of the model's modules: a graph node for `nnx.split` / `nnx.merge` (how the engine and the
    loader use them), not also a JAX pytree. As pytrees (flax's default) every attribute set while
    building a module is checked for stray arrays by walking it with `jax.tree.leaves`, more than half of
    an 8B Llama's build (0.066 -> 0.029 s on a CPU box with Python 3.12 and flax 0.12.10), which the fast
    loader waits for before its copies start. Subclasses inherit that (flax's class keyword alone is not
    inherited)."""

    def __init_subclass__(cls, *, pytree: bool = False, **kwargs: Any) -> None:
        super().__init_subclass__(pytree=pytree, **kwargs)


class ShapeOnlyRngs:
    """Stands in for `nnx.Rngs` when a model is built only for its structure and shapes (the fast loader's
    abstract state): the init helpers below then return `jax.ShapeDtypeStruct` leaves, so building the
    model runs no JAX op and needs no trace (`nnx.eval_shape` spent ~0.13 s on an 8B Llama, half of it
    tracing). A module that draws from it directly fails with AttributeError, and `abstract_state` then
    falls back to `nnx.eval_shape` with a real `nnx.Rngs`."""


def init_weight(rngs: nnx.Rngs | ShapeOnlyRngs, shape: tuple[int, ...], dtype: jnp.dtype) -> Weight:
    """N(0, 0.02) in `dtype` (its shape only under `ShapeOnlyRngs`)."""
    if isinstance(rngs, ShapeOnlyRngs):  # not an attribute test: nnx.Rngs answers any attribute name
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
    return (0.02 * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def init_constant(rngs: nnx.Rngs | ShapeOnlyRngs | None, shape: tuple[int, ...], dtype: jnp.dtype,
                  value: float) -> Weight:
    """`value` everywhere (norm weights, biases; its shape only under `ShapeOnlyRngs`)."""
    if isinstance(rngs, ShapeOnlyRngs):
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
    return jnp.full(shape, value, dtype)


def join_weights(parts: list[Weight], axis: int, *, stack: bool = False) -> Weight:
    """`jnp.concatenate(parts, axis)` (`jnp.stack` with `stack`) of `init_weight` results, shapes only
    when they are shapes."""
    if not all(isinstance(p, jax.ShapeDtypeStruct) for p in parts):
        return jnp.stack(parts, axis) if stack else jnp.concatenate(parts, axis)
    shape = list(parts[0].shape)
    if stack:
        shape.insert(axis, len(parts))
    else:
        shape[axis] = sum(p.shape[axis] for p in parts)
    return jax.ShapeDtypeStruct(tuple(shape), parts[0].dtype)


class Linear(Module):
    """y = x @ weight.T (+ bias); weight: [out, in] as stored by HF."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype: jnp.dtype,
                 rngs: nnx.Rngs) -> None:
        self.weight = nnx.Param(init_weight(rngs, (out_features, in_features), dtype))
        self.bias = nnx.Param(init_constant(rngs, (out_features,), dtype, 0.0)) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("ti,oi->to", x, self.weight[...])
        return y + self.bias[...] if self.bias is not None else y

    def partials(self, x: jax.Array, splits: int) -> jax.Array:
        """x: [T, in] -> float32 [S, T, out]: `__call__` as S split-K partial sums, one batched GEMM over S
        slices of `in`, for a consumer that sums them itself (models/residual.py)."""
        if self.bias is not None:
            raise ValueError("Linear.partials: a layer with a bias has no split-K partials here")
        return split_k_partials(x, self.weight[...], splits)


class RMSNorm(Module):
    def __init__(self, dim: int, eps: float, *, dtype: jnp.dtype,
                 rngs: nnx.Rngs | ShapeOnlyRngs | None = None) -> None:
        self.weight = nnx.Param(init_constant(rngs, (dim,), dtype, 1.0))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


class Embedding(Module):
    def __init__(self, vocab: int, dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        self.weight = nnx.Param(init_weight(rngs, (vocab, dim), dtype))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0)

    def attend(self, h: jax.Array) -> jax.Array:
        """Tied lm_head: h: [N, D] -> float32 logits [N, V]."""
        return jnp.einsum("nd,vd->nv", h, self.weight[...], preferred_element_type=jnp.float32)


class QKVProj(Module):
    """HF's q_proj, k_proj and v_proj as one parameter, weight: [kv_heads, group + 2, head_dim, dim]
    (per KV head: its `group` query heads, its K head, its V head; see models/fused.py), bias likewise
    without `dim`: one GEMM, no per-step weight concatenation, split on KV heads under tp."""

    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        kv, hd, d = cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        group = cfg.num_heads // kv
        parts = [init_weight(rngs, (kv, n, hd, d), dtype) for n in (group, 1, 1)]
        self.weight = nnx.Param(join_weights(parts, axis=1))
        self.bias = nnx.Param(init_constant(rngs, (kv, group + 2, hd), dtype, 0.0)) if cfg.attention_bias \
            else None

    def project(self, x: jax.Array) -> jax.Array:
        """x: [T, dim] -> [T, kv_heads, group + 2, head_dim] (per KV head: its q heads, its k, its v)."""
        h = jnp.einsum("td,kghd->tkgh", x, self.weight[...])
        return h + self.bias[...] if self.bias is not None else h

    def project_partials(self, x: jax.Array, splits: int) -> jax.Array:
        """x: [T, dim] -> float32 [S, T, kv_heads, group + 2, head_dim]: `project` (no bias) as S split-K
        partial sums, one batched GEMM over S slices of `dim`, for a consumer that sums them itself
        (`attention.decode_qkv_splits`)."""
        return split_k_partials(x, self.weight[...], splits)

    @staticmethod
    def split(h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`project`'s output -> q [T, heads, head_dim], k and v [T, kv_heads, head_dim]."""
        t, kv, group2, hd = h.shape
        q = h[:, :, : group2 - 2].reshape(t, kv * (group2 - 2), hd)
        return q, h[:, :, group2 - 2], h[:, :, group2 - 1]

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x: [T, dim] -> q [T, heads, head_dim], k and v [T, kv_heads, head_dim]."""
        return self.split(self.project(x))


class Attention(Module):
    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        d, hd = cfg.hidden_size, cfg.head_dim
        self.qkv_proj = QKVProj(cfg, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(cfg.num_heads * hd, d, bias=False, dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype=dtype, rngs=rngs) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, dtype=dtype, rngs=rngs) if cfg.qk_norm else None
        self.cfg = cfg

    def __call__(self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array, kv: KVCache,
                 md: AttentionMetadata, attn_fn: AttentionFn, o_splits: int = 0) -> tuple[jax.Array, KVCache]:
        """x: [T, D] -> ([T, D], updated (k_cache, v_cache)); with `o_splits`, o_proj's float32 split-K
        partials [o_splits, T, D] instead of its output."""
        cfg, t = self.cfg, x.shape[0]
        fused = fused_decoder(attn_fn) if self.q_norm is None else None
        splits = 0 if self.qkv_proj.bias is not None else decode_qkv_splits(fused, t, md, x.shape[-1])
        h = self.qkv_proj.project_partials(x, splits) if splits else self.qkv_proj.project(x)
        done = None if fused is None else fused(
            h, positions, inv_freq, kv[0], kv[1], md, num_q_heads=cfg.num_heads, sm_scale=cfg.head_dim**-0.5,
            sliding_window=cfg.sliding_window, soft_cap=None)
        if done is not None:
            o, k_cache, v_cache = done
            return self._out(o.reshape(t, cfg.num_heads * cfg.head_dim), o_splits), (k_cache, v_cache)
        if splits:  # the fused path declined these shapes: the unsplit projection's values
            h = sum_partials(h, jnp.result_type(x, self.qkv_proj.weight[...]))
        q, k, v = self.qkv_proj.split(h)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        k_cache, v_cache = kv_writer(attn_fn)(kv[0], kv[1], k, v, md.slot_mapping)
        o = attn_fn(q, k_cache, v_cache, md, sm_scale=cfg.head_dim**-0.5,
                    sliding_window=cfg.sliding_window, soft_cap=None, new_kv=(k, v))
        return self._out(o.reshape(t, cfg.num_heads * cfg.head_dim), o_splits), (k_cache, v_cache)

    def _out(self, o: jax.Array, splits: int) -> jax.Array:
        return self.o_proj.partials(o, splits) if splits else self.o_proj(o)


class GateUpProj(Module):
    """HF's gate_proj and up_proj as one parameter, weight: [2, hidden, dim] (gate first; see
    models/fused.py): one GEMM reads both, faster than two at small batch."""

    def __init__(self, dim: int, hidden: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        self.weight = nnx.Param(join_weights([init_weight(rngs, (hidden, dim), dtype) for _ in range(2)], 0,
                                             stack=True))

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [T, dim] -> (gate, up), each [T, hidden]."""
        h = jnp.einsum("td,gid->tgi", x, self.weight[...])
        return h[:, 0], h[:, 1]


class MLP(Module):
    def __init__(self, dim: int, hidden: int, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        self.gate_up_proj = GateUpProj(dim, hidden, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(hidden, dim, bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, down_splits: int = 0) -> jax.Array:
        """x: [T, dim] -> [T, dim]; with `down_splits`, down_proj's float32 split-K partials
        [down_splits, T, dim] instead."""
        gate, up = self.gate_up_proj(x)
        a = jax.nn.silu(gate) * up
        return self.down_proj.partials(a, down_splits) if down_splits else self.down_proj(a)


def make_mlp(cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Module:
    """Dense SwiGLU, or the sparse MoE block when the config has experts."""
    if cfg.is_moe:
        from rtp_jax.models.moe import SparseMoeBlock

        return SparseMoeBlock(cfg, dtype=dtype, rngs=rngs)
    return MLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, rngs=rngs)


class DecoderLayer(Module):
    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = make_mlp(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x: Hidden, positions: jax.Array, inv_freq: jax.Array, kv: KVCache,
                 md: AttentionMetadata, attn_fn: AttentionFn) -> tuple[Hidden, KVCache]:
        """x: the residual stream [T, D] (or `Pending`, models/residual.py) -> (the stream after this layer,
        updated (k_cache, v_cache)). With an attention function offering `add_norm`, each residual add is
        done together with the norm that follows it, and the layer's output is left `Pending`."""
        add_norm = add_norm_of(attn_fn)
        if add_norm is None and not isinstance(x, Pending):  # XLA's adds and norms
            h, kv = self.self_attn(self.input_layernorm(x), positions, inv_freq, kv, md, attn_fn)
            x = x + h
            return x + self.mlp(self.post_attention_layernorm(x)), kv
        ln1, ln2 = self.input_layernorm, self.post_attention_layernorm
        x, h = add_norm_hidden(x, ln1.weight[...], ln1.eps, add_norm)
        t, attn = x.shape[0], self.self_attn
        o_splits = residual_splits(add_norm, t, md, attn.o_proj.weight.shape[1])
        o, kv = attn(h, positions, inv_freq, kv, md, attn_fn, o_splits)
        x, h = add_norm_hidden(Pending(x, o), ln2.weight[...], ln2.eps, add_norm)
        if isinstance(self.mlp, MLP):
            down = residual_splits(add_norm, t, md, self.mlp.down_proj.weight.shape[1])
            return Pending(x, self.mlp(h, down)), kv
        return Pending(x, self.mlp(h)), kv


LayerCall = Callable[[nnx.Module, Hidden, jax.Array, jax.Array, KVCache, AttentionMetadata],
                     tuple[Hidden, KVCache]]


def layer_caller(attn_fn: AttentionFn) -> LayerCall:
    """`call(layer, x, positions, inv_freq, kv, md)` == `layer(x, positions, inv_freq, kv, md, attn_fn)`,
    with all layers of one structure (nnx graphdef) traced and lowered once per program.

    Each layer becomes a call of one jitted function of its weights, which XLA inlines, so the compiled
    program is the unrolled one. An 8B Llama's forward traced and lowered in 0.06 s instead of 0.70 s on a
    CPU box; on the H200 host, start-up's tracing of its 5 programs went from 1.9 to 0.9 s (lowering, 4.2 s,
    did not change) with the same decode speed (bench/results/decode_87bc6e9.json).
    """
    jitted: dict[nnx.GraphDef, Callable[..., Any]] = {}

    def call(layer: nnx.Module, x: Hidden, positions: jax.Array, inv_freq: jax.Array, kv: KVCache,
             md: AttentionMetadata) -> tuple[Hidden, KVCache]:
        graphdef, state = nnx.split(layer)
        fn = jitted.get(graphdef)
        if fn is None:
            def run(state: nnx.State, x: Hidden, positions: jax.Array, inv_freq: jax.Array, kv: KVCache,
                    md: AttentionMetadata) -> tuple[Hidden, KVCache]:
                return nnx.merge(graphdef, state)(x, positions, inv_freq, kv, md, attn_fn)

            fn = jitted[graphdef] = jax.jit(run)
        return fn(state, x, positions, inv_freq, kv, md)

    return call


class LlamaModel(Module):
    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)


class LlamaForCausalLM(Module):
    """The whole decoder. `__call__` runs the layers; `compute_logits` runs lm_head where needed."""

    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        self.config = cfg
        self.model = LlamaModel(cfg, dtype=dtype, rngs=rngs)
        self.lm_head = (
            None if cfg.tie_word_embeddings
            else Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, rngs=rngs)
        )

    def __call__(self, input_ids: jax.Array, positions: jax.Array, kv_caches: list[KVCache],
                 md: AttentionMetadata, attn_fn: AttentionFn) -> tuple[jax.Array, list[KVCache]]:
        """input_ids, positions: int32[T] -> (final hidden states [T, D], updated per-layer caches).

        The layers are a Python loop, so XLA sees them unrolled: on the H100 this ran 2.8x faster per
        decode step than `lax.scan` over stacked weights, and each layer's cache stays its own buffer.
        Each layer is a call of one jitted function (`layer_caller`), traced once, not 32 times.
        """
        x = self.model.embed_tokens(input_ids)
        inv_freq = jnp.asarray(rope_tables(self.config))
        call = layer_caller(attn_fn)
        new_caches = []
        for layer, kv in zip(self.model.layers, kv_caches, strict=True):
            x, kv = call(layer, x, positions, inv_freq, kv, md)
            new_caches.append(kv)
        norm = self.model.norm
        return add_norm_hidden(x, norm.weight[...], norm.eps, add_norm_of(attn_fn))[1], new_caches

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """hidden: [N, D] -> float32 logits [N, V]."""
        if self.lm_head is None:
            return self.model.embed_tokens.attend(hidden)
        return jnp.einsum("nd,vd->nv", hidden, self.lm_head.weight[...],
                          preferred_element_type=jnp.float32)
