"""Builds a model's parameter state from HF-named tensors, without a random-init pass.

The model's NNX paths spell HF names (`model.layers.0.self_attn.q_proj.weight`), so the mapping is
`".".join(path)`. Each tensor is cast and placed on its device(s) as it arrives, so the host holds
one tensor at a time, never a second copy of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rtp_jax.config import ModelConfig
from rtp_jax.models import get_model_class

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


def _nest(flat: dict[str, Any]) -> dict[Any, Any]:
    root: dict[Any, Any] = {}
    for name, value in flat.items():
        node = root
        parts = [int(p) if p.isdigit() else p for p in name.split(".")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return root


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
    for name, array in weights:
        if name.endswith(_IGNORED_SUFFIXES) or (cfg.tie_word_embeddings and name == "lm_head.weight"):
            continue
        if name not in expected:
            raise ValueError(f"checkpoint tensor {name!r} does not belong to a {cfg.architecture} model")
        want = expected[name]
        if tuple(array.shape) != tuple(want.shape):
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(array.shape)}, "
                             f"expected {tuple(want.shape)} from the model config")
        loaded[name] = place(name, np.asarray(array).astype(want.dtype, copy=False))
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")
    nnx.replace_by_pure_dict(state, _nest(loaded))
    return graphdef, state


def random_state(cfg: ModelConfig, dtype: jnp.dtype, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    """Random weights (std 0.02), initialised on device in one jitted call (benchmarks, GPU tests)."""
    cls = get_model_class(cfg.architecture)
    graphdef, _ = abstract_model(cfg, dtype)

    @jax.jit
    def init(key: jax.Array) -> nnx.State:
        return nnx.state(cls(cfg, dtype=dtype, rngs=nnx.Rngs(key)))

    return graphdef, init(jax.random.key(seed))
