"""The abstract (shape-only) state of a model for the fast loader, traced without `nnx.Rngs`'s per-draw
overhead (`ShapeOnlyRngs`), so `load_model_state` can build it while the checkpoint is being read."""

from __future__ import annotations

from typing import Any

from rtp_jax.models.llama import ShapeOnlyRngs


def abstract_state(config: Any, dtype: Any) -> tuple[Any, Any]:
    """`rtp_jax.models.params.abstract_model` (graphdef, shape-only state), traced with `ShapeOnlyRngs`
    (falls back to the original where a model needs a real `nnx.Rngs`).

    `nnx.Rngs` bumps a counter that is a tracer under `nnx.eval_shape`, and each bump builds a jax error
    message by walking the whole trace (flax checks `getattr(tracer, "sharding", None)`), quadratic in the
    model size: 0.75 s of 0.78 s for an 8B Llama on a CPU-only box, 0.13 s without it; zeros instead of
    random draws took it to ~0.14 s on the H200 host (0.19 s before)."""
    from flax import nnx

    from rtp_jax.models import get_model_class
    from rtp_jax.models.params import abstract_model

    cls = get_model_class(config.architecture)
    try:
        return nnx.split(nnx.eval_shape(lambda: cls(config, dtype=dtype, rngs=ShapeOnlyRngs())))
    except (AttributeError, TypeError):
        return abstract_model(config, dtype)
