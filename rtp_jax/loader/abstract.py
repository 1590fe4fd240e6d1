"""The abstract (shape-only) state of a model for the fast loader, traced without `nnx.Rngs`'s per-draw
overhead (`_KeyRngs`), so `load_model_state` can build it while the checkpoint is being read."""

from __future__ import annotations

from typing import Any


class _KeyRngs:
    """Stands in for `nnx.Rngs` while tracing a model for its shapes: `params()` is always the same key.

    Models only draw init keys (`rngs.params()`); `nnx.Rngs` bumps a counter that is a tracer under
    `nnx.eval_shape`, and each bump builds a jax error message by walking the whole trace (flax checks
    `getattr(tracer, "sharding", None)`), quadratic in the model size: 0.75 s of 0.78 s for an 8B Llama
    on a CPU-only box, 0.13 s without it. `shapes_only` makes `init_weight` trace zeros instead of random
    draws (values are never computed here)."""

    shapes_only = True

    def params(self) -> Any:
        import jax

        return jax.random.key(0)


def abstract_state(config: Any, dtype: Any) -> tuple[Any, Any]:
    """`rtp_jax.models.params.abstract_model` (graphdef, shape-only state), traced with `_KeyRngs`; falls
    back to the original where a model needs a real `nnx.Rngs`."""
    from flax import nnx

    from rtp_jax.models import get_model_class
    from rtp_jax.models.params import abstract_model

    cls = get_model_class(config.architecture)
    try:
        return nnx.split(nnx.eval_shape(lambda: cls(config, dtype=dtype, rngs=_KeyRngs())))
    except (AttributeError, TypeError):
        return abstract_model(config, dtype)
