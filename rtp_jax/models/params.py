"""Builds a model's parameter state from HF-named tensors, without a random-init pass.

The model's NNX paths spell HF names (`model.layers.0.self_attn.o_proj.weight`), so the mapping
is `".".join(path)`, except for the tensors the model fuses (models/fused.py). Each tensor is cast
and placed on its device(s) as it arrives, so the host holds one tensor at a time, never a second copy
of the model.

MoE checkpoints store one tensor per expert (`model.layers.N.mlp.experts.E.gate_proj.weight`; Mixtral:
`model.layers.N.block_sparse_moe.experts.E.w1.weight`, w1/w3/w2 = gate/up/down); the model stacks
them [E, out, in] (`model.layers.N.mlp.experts.gate_proj`). `map_moe_name` maps a checkpoint name to
(our name, expert index or None, fused half or None); a layer's experts of one projection are
buffered on the host until all E arrived, then stacked and placed (one projection of one layer at a
time, never the model). transformers 5's fused `experts.gate_up_proj` [E, 2I, D] and stacked
`experts.down_proj` [E, D, I] are accepted too. A dense MLP's gate_proj and up_proj become one
[2, I, D] parameter and an attention layer's q/k/v_proj one `qkv_proj` (models/fused.py), combined when a
layer's parts are complete.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rtp_jax.config import ModelConfig
from rtp_jax.models import get_model_class
from rtp_jax.models.fused import fuse_parts, fuse_stream

# Checkpoint entries that carry no parameters of ours.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

Placer = Callable[[str, np.ndarray | jax.Array], jax.Array]


def abstract_model(cfg: ModelConfig, dtype: jnp.dtype) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph definition and shape-only state of the model (no memory allocated)."""
    cls = get_model_class(cfg.architecture)
    model = nnx.eval_shape(lambda: cls(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def flat_param_shapes(state: nnx.State) -> dict[str, jax.ShapeDtypeStruct]:
    """HF name -> abstract leaf of every parameter in `state`."""
    out: dict[str, jax.ShapeDtypeStruct] = {}

    def walk(d: dict[Any, Any], prefix: tuple[str, ...]) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, (*prefix, str(k)))
            else:
                out[".".join((*prefix, str(k)))] = v

    walk(nnx.to_pure_dict(state), ())
    return out


def nest(flat: dict[str, Any]) -> dict[Any, Any]:
    """{"a.0.b": x} -> {"a": {0: {"b": x}}} (NNX pure-dict form; digit keys become ints)."""
    root: dict[Any, Any] = {}
    for name, value in flat.items():
        node = root
        parts = [int(p) if p.isdigit() else p for p in name.split(".")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return root


_EXPERT = re.compile(r"(model\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight")
_STACKED = re.compile(r"(model\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)")
_EXPERT_PROJ = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj",
                "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def map_moe_name(name: str) -> tuple[str, int | None, str | None]:
    """Checkpoint name -> (our parameter name, expert index or None, "gate_up" when fused or None).

    Non-MoE names come back unchanged; Mixtral's `block_sparse_moe` becomes `mlp`.
    """
    m = _EXPERT.fullmatch(name)
    if m and m[3] in _EXPERT_PROJ:
        return f"{m[1]}.mlp.experts.{_EXPERT_PROJ[m[3]]}", int(m[2]), None
    m = _STACKED.fullmatch(name)
    if m:
        if m[2] == "gate_up_proj":
            return f"{m[1]}.mlp.experts.gate_proj", None, "gate_up"
        return f"{m[1]}.mlp.experts.down_proj", None, None
    return name.replace(".block_sparse_moe.gate.", ".mlp.gate."), None, None


def combine_parts(head_dim: int) -> Callable[[str, list[Any]], np.ndarray | jax.Array]:
    """`fuse_stream`'s combine: a fused parameter from its parts where they are: on the host, or on
    their device(s)."""

    def combine(name: str, parts: list[Any]) -> np.ndarray | jax.Array:
        if all(isinstance(p, np.ndarray) for p in parts):
            return fuse_parts(name, parts, head_dim)
        return fuse_parts(name, [jnp.asarray(p) for p in parts], head_dim, jnp)

    return combine


def default_placer(name: str, x: np.ndarray | jax.Array) -> jax.Array:
    del name
    return jax.device_put(x)


def load_state(
    cfg: ModelConfig,
    dtype: jnp.dtype,
    weights: Iterable[tuple[str, np.ndarray]],
    place: Placer = default_placer,
) -> tuple[nnx.GraphDef, nnx.State]:
    """Fills the model's state from (HF name, array) pairs; every parameter must be present once."""
    graphdef, state = abstract_model(cfg, dtype)
    expected = flat_param_shapes(state)
    loaded: dict[str, jax.Array] = {}
    experts: dict[str, dict[int, np.ndarray]] = {}  # our stacked name -> expert index -> [out, in]

    def put(name: str, array: np.ndarray, ckpt_name: str) -> None:
        want = expected[name]
        if tuple(array.shape) != tuple(want.shape):
            raise ValueError(f"checkpoint tensor {ckpt_name!r} has shape {tuple(array.shape)}, "
                             f"expected {tuple(want.shape)} from the model config")
        if isinstance(array, jax.Array):  # already on a device: cast there, never pull it back
            loaded[name] = place(name, array.astype(want.dtype))
        else:
            loaded[name] = place(name, np.asarray(array).astype(want.dtype, copy=False))

    def relevant() -> Iterator[tuple[str, np.ndarray | jax.Array]]:
        for ckpt_name, array in weights:
            tied_head = cfg.tie_word_embeddings and ckpt_name == "lm_head.weight"
            if not (ckpt_name.endswith(_IGNORED_SUFFIXES) or tied_head):
                yield ckpt_name, array

    for ckpt_name, array in fuse_stream(relevant(), combine_parts(cfg.head_dim)):
        name, expert, fused = map_moe_name(ckpt_name) if cfg.is_moe else (ckpt_name, None, None)
        if name not in expected:
            raise ValueError(f"checkpoint tensor {ckpt_name!r} does not belong to a {cfg.architecture} model")
        if fused == "gate_up":  # [E, 2I, D]: gate rows first, as transformers 5 chunks them
            gate, up = np.split(np.asarray(array), 2, axis=1)
            put(name, gate, ckpt_name)
            put(name.replace(".gate_proj", ".up_proj"), up, ckpt_name)
        elif expert is None:
            put(name, array, ckpt_name)
        else:
            per_expert = experts.setdefault(name, {})
            per_expert[expert] = np.asarray(array)
            if len(per_expert) == cfg.num_experts:
                put(name, np.stack([per_expert[e] for e in range(cfg.num_experts)]), ckpt_name)
                del experts[name]
    for name, per_expert in experts.items():
        raise ValueError(f"checkpoint has {len(per_expert)} of {cfg.num_experts} experts for {name!r}")
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")
    nnx.replace_by_pure_dict(state, nest(loaded))
    return graphdef, state


def place_state(state: nnx.State, place: Placer) -> nnx.State:
    """A copy of `state` with every parameter placed by `place(name, array)` (no transfer where an
    array already is where it should be); `state` itself is left as it was."""
    flat = {name: place(name, x) for name, x in _flat_values(nnx.to_pure_dict(state)).items()}
    out = jax.tree.map(lambda x: x, state)  # new containers: replace_by_pure_dict mutates
    nnx.replace_by_pure_dict(out, nest(flat))
    return out


def _flat_values(d: dict[Any, Any], prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat_values(v, (*prefix, str(k)))
        else:
            out[".".join((*prefix, str(k)))] = v
    return out


def random_state(cfg: ModelConfig, dtype: jnp.dtype, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    """Random weights as the modules initialise them (normal(0.02) matrices, unit norms, zero biases),
    made on the default device by two small jitted programs: one decoder layer, run once per layer with
    its own key, and the rest of the model (embeddings, final norm, lm_head). Building the whole model
    in one program took 66 s to compile for the Llama-3-8B shape on an H200 and ~25 s for a tiny
    32-layer model on a CPU; the layer program compiles once whatever the depth, and both are cached
    per (config, dtype)."""
    graphdef, state = abstract_model(cfg, dtype)
    init_rest, init_layer = _random_init_fns(cfg, jnp.dtype(dtype))
    key = jax.random.key(seed)
    pure = init_rest(jax.random.fold_in(key, cfg.num_layers))
    pure["model"]["layers"] = {i: init_layer(jax.random.fold_in(key, i)) for i in range(cfg.num_layers)}
    nnx.replace_by_pure_dict(state, pure)
    return graphdef, state


@functools.lru_cache(maxsize=8)
def _random_init_fns(cfg: ModelConfig, dtype: jnp.dtype) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(init of everything but the layers, init of one layer): key -> NNX pure dict of that part."""
    cls = get_model_class(cfg.architecture)
    layer_cls = type(nnx.eval_shape(lambda: cls(dataclasses.replace(cfg, num_layers=1), dtype=dtype,
                                                 rngs=nnx.Rngs(0))).model.layers[0])
    no_layers = dataclasses.replace(cfg, num_layers=0)

    def rest(key: jax.Array) -> dict[Any, Any]:
        return nnx.to_pure_dict(nnx.state(cls(no_layers, dtype=dtype, rngs=nnx.Rngs(key))))

    def layer(key: jax.Array) -> dict[Any, Any]:
        return nnx.to_pure_dict(nnx.state(layer_cls(cfg, dtype=dtype, rngs=nnx.Rngs(key))))

    return jax.jit(rest), jax.jit(layer)
