"""The abstract (shape-only) state of a model for the fast loader, built without a JAX trace: with
`ShapeOnlyRngs` the model's init helpers return shapes, so `load_model_state` gets it in a fraction of
`nnx.eval_shape`'s time."""

from __future__ import annotations

from typing import Any

from rtp_jax.models.llama import ShapeOnlyRngs


def abstract_state(config: Any, dtype: Any) -> tuple[Any, Any]:
    """`rtp_jax.models.params.abstract_model` (graphdef, shape-only state), the model built with
    `ShapeOnlyRngs` (falls back to the original where a model needs a real `nnx.Rngs`).

    History (8B Llama): `nnx.eval_shape` with `nnx.Rngs` took 0.78 s on a CPU-only box (each counter bump
    of the traced Rngs built an error message walking the whole trace); `ShapeOnlyRngs` under eval_shape
    0.13-0.19 s on the H200 host; no trace at all (this) 0.069 s there."""
    import jax
    from flax import nnx

    from rtp_jax.models import get_model_class
    from rtp_jax.models.params import abstract_model

    cls = get_model_class(config.architecture)
    try:
        graphdef, state = nnx.split(cls(config, dtype=dtype, rngs=ShapeOnlyRngs()))
    except (AttributeError, TypeError):
        return abstract_model(config, dtype)
    # A leaf a model made without the init helpers is a real (small) array: keep only its shape.
    return graphdef, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
