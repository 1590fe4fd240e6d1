"""Converted, already-placed weights saved with orbax-checkpoint, for fast restarts.

    save_state(state, "/ckpt/state")                      # nnx.State or {name: array}; sharded arrays ok
    state = restore_state(abstract_state, "/ckpt/state")  # leaves: ShapeDtypeStruct(+ sharding) or arrays
    save_model_dir(state, "/models/Llama-3-8B", "/ckpt")  # config.json + tokenizer files + state/
    graphdef, state = restore_model_state("/ckpt", config, jnp.bfloat16, sharding_for=fn)

A model directory in this format is `config.json` (plus the tokenizer files, copied) and the orbax
checkpoint in `state/`; `is_orbax_checkpoint(path)` recognises it, and the loader accepts it as a model
path. Parameters are stored flat under their HF names ("model.layers.0.self_attn.q_proj.weight"), so
the same `sharding_for(name, shape)` callback places them on restore; each process reads only the
shards its devices hold (orbax/tensorstore do that from the target shardings).

All calls into orbax live in this file (its API moves between releases).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

STATE_DIR = "state"
FORMAT_FILE = "rtp_jax_format.json"
# Files copied beside the checkpoint so the directory also serves as the tokenizer path.
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")


def _ocp() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("orbax checkpoints need `pip install orbax-checkpoint`") from e
    return ocp


def is_orbax_checkpoint(path: str | Path) -> bool:
    """True for a model directory written by `save_model_dir` (config.json + an orbax `state/`)."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and (p / STATE_DIR).is_dir()


def _flat(tree: Any) -> dict[str, Any]:
    """nnx.State / nested dict -> {dotted name: leaf}."""
    try:
        from flax import nnx

        if isinstance(tree, nnx.State):
            tree = nnx.to_pure_dict(tree)
    except ImportError:  # pragma: no cover
        pass
    out: dict[str, Any] = {}

    def walk(d: Any, prefix: tuple[str, ...]) -> None:
        if isinstance(d, dict):
            for k, v in d.items():
                walk(v, (*prefix, str(k)))
        else:
            out[".".join(prefix)] = d

    walk(tree, ())
    return out


def save_state(state: Any, directory: str | Path, *, force: bool = True) -> Path:
    """Saves an nnx.State (or a nested / flat dict of arrays) to `directory` as one orbax checkpoint,
    flat under dotted names. Sharded arrays are written shard by shard by the processes holding them.
    Blocks until the checkpoint is complete."""
    ocp = _ocp()
    directory = Path(directory).absolute()
    flat = _flat(state)
    ckptr = ocp.StandardCheckpointer()
    try:
        ckptr.save(directory, flat, force=force)
        ckptr.wait_until_finished()
    finally:
        ckptr.close()
    return directory


def _abstract_leaf(x: Any) -> Any:
    import jax

    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    sharding = getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def restore_state(abstract_state: Any, directory: str | Path) -> Any:
    """Restores a checkpoint written by `save_state` into the structure of `abstract_state`.

    `abstract_state`: an nnx.State or nested dict whose leaves are `jax.ShapeDtypeStruct` (with the
    target sharding; none means the default device) or arrays; returns the same kind of object
    with restored arrays. Shapes must match the checkpoint; dtypes are cast to the target's."""
    import jax

    ocp = _ocp()
    directory = Path(directory).absolute()
    flat_target = _flat(abstract_state)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def target(x: Any) -> Any:
        a = _abstract_leaf(x)
        return a if a.sharding is not None else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=default)

    abstract = {k: target(v) for k, v in flat_target.items()}
    ckptr = ocp.StandardCheckpointer()
    try:
        restored = ckptr.restore(directory, abstract)
    finally:
        ckptr.close()
    return _unflatten_like(abstract_state, restored)


def _unflatten_like(template: Any, flat: dict[str, Any]) -> Any:
    from rtp_jax.models.params import nest

    try:
        from flax import nnx

        if isinstance(template, nnx.State):
            out = _copy_tree(template)
            nnx.replace_by_pure_dict(out, nest(flat))
            return out
    except ImportError:  # pragma: no cover
        pass
    if isinstance(template, dict) and set(template) == set(flat):  # a flat {name: leaf} target
        return dict(flat)
    return nest(flat)


def _copy_tree(state: Any) -> Any:
    import jax

    return jax.tree.map(lambda x: x, state)  # fresh containers: replace_by_pure_dict mutates


def checkpoint_metadata(directory: str | Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)} of a `save_state` checkpoint, read from its metadata only."""
    ocp = _ocp()
    ckptr = ocp.StandardCheckpointer()
    try:
        meta = ckptr.metadata(Path(directory).absolute())
    finally:
        ckptr.close()
    tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta
    if hasattr(tree, "tree"):
        tree = tree.tree
    return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in _flat(dict(tree)).items()}


def save_model_dir(state: Any, source: str | Path | None, directory: str | Path,
                   config: dict[str, Any] | None = None) -> Path:
    """Writes a model directory: the orbax checkpoint of `state` under `state/`, plus config.json and
    tokenizer files copied from `source` (an HF directory) or `config` (a config.json dict)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if source is not None:
        src = Path(source)
        if not src.is_dir():
            raise ValueError(f"save_model_dir: source {str(src)!r} must be an HF directory (for config.json)")
        for name in _SIDE_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, directory / name)
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config, indent=2))
    if not (directory / "config.json").is_file():
        raise ValueError("save_model_dir needs a source directory with config.json, or `config`")
    save_state(state, directory / STATE_DIR)
    (directory / FORMAT_FILE).write_text(json.dumps({"format": "orbax", "layout": "flat-hf-names"}))
    return directory


def restore_model_state(path: str | Path, config: Any, dtype: Any,
                        sharding_for: Callable[[str, tuple[int, ...]], Any] | None = None) -> tuple[Any, Any]:
    """(graphdef, nnx.State) of `config`'s model restored from a `save_model_dir` directory, each
    parameter placed in `sharding_for(name, shape)` (None: the default device) and cast to `dtype`."""
    import jax

    from rtp_jax.models.params import abstract_model, flat_param_shapes

    graphdef, abstract = abstract_model(config, dtype)
    shapes = flat_param_shapes(abstract)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {}
    for name, a in shapes.items():
        s = sharding_for(name, tuple(a.shape)) if sharding_for is not None else None
        target[name] = jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s or default)
    flat = restore_state(target, Path(path) / STATE_DIR)
    from flax import nnx

    from rtp_jax.models.params import nest

    nnx.replace_by_pure_dict(abstract, nest(flat))
    return graphdef, abstract


def iter_orbax_weights(path: str | Path, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """(name, numpy array) of every parameter of a `save_model_dir` directory, for callers that take
    the plain (name, array) stream (`iter_weights`). It restores to the host in one pass (one host
    copy of the weights, dropped tensor by tensor as they are consumed); `restore_model_state` restores
    straight onto devices and is the fast path."""
    ocp = _ocp()
    directory = (Path(path) / STATE_DIR).absolute()
    meta = checkpoint_metadata(directory)
    args = {k: ocp.RestoreArgs(restore_type=np.ndarray) for k in meta}
    ckptr = ocp.PyTreeCheckpointer()
    try:
        restored = ckptr.restore(directory, args=ocp.args.PyTreeRestore(restore_args=args))
    finally:
        ckptr.close()
    for name in list(restored):
        arr = np.asarray(restored.pop(name))
        yield name, arr if dtype is None else arr.astype(dtype, copy=False)
