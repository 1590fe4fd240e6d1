"""The one place that knows how each JAX version spells the Pallas GPU lowerings.

The ragged kernels (Triton lowering) import `tl_dot`, `masked_load`, `masked_store` and call
`gpu_lowering(...)` for the `pallas_call` keyword arguments; the Hopper decode kernel (Mosaic GPU) gets its
modules from `mosaic_gpu_modules()`. Nothing else in `kernels_pallas` names a lowering module, so a JAX
upgrade (the Triton lowering is deprecated from 0.11) touches this file alone.
"""

from __future__ import annotations

from typing import Any

import jax

try:  # jax 0.10 / 0.11: the Triton lowering lives here (deprecated from 0.11, still shipped).
    from jax.experimental.pallas import triton as _pltriton
except ImportError:  # pragma: no cover - a future JAX without the Triton lowering
    _pltriton = None

LOWERINGS = ("triton",)


def mosaic_gpu_modules() -> tuple[Any, Any]:
    """(pallas, pallas.mosaic_gpu) for the Hopper kernels; needs `plgpu.kernel` and, for interpret mode
    on the CPU, the Mosaic GPU interpreter (jax >= 0.11)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return pl, plgpu


def mosaic_gpu_available() -> bool:
    """Whether this JAX has the Pallas Mosaic GPU API the Hopper kernels use (`plgpu.kernel`, wgmma)."""
    try:
        _, plgpu = mosaic_gpu_modules()
    except ImportError:  # pragma: no cover
        return False
    return all(hasattr(plgpu, n) for n in ("kernel", "wgmma", "copy_gmem_to_smem", "Barrier"))


def mosaic_gpu_interpretable() -> bool:
    """Whether this JAX can run Mosaic GPU kernels on the CPU (`InterpretGPUParams`, jax >= 0.11)."""
    try:
        _, plgpu = mosaic_gpu_modules()
    except ImportError:  # pragma: no cover
        return False
    return hasattr(plgpu, "InterpretGPUParams")


def gpu_lowering(lowering: str, *, num_warps: int, num_stages: int) -> dict[str, Any]:
    """`pallas_call` keyword arguments selecting the GPU lowering and its launch knobs.

    The ragged kernels are written in the pointer-style Pallas dialect (masked gathers of KV pages),
    which only the Triton lowering compiles; the Mosaic GPU kernel is a separate TMA/warpgroup program
    (paged_decode_mgpu.py), so "mosaic" is refused here rather than failing deep in lowering.
    """
    if lowering == "triton":
        if _pltriton is None:
            raise RuntimeError(f"jax {jax.__version__} has no Pallas Triton lowering")
        return {"compiler_params": _pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)}
    raise ValueError(f"unknown or unsupported lowering {lowering!r}; choose one of {LOWERINGS}")


def tl_dot(a: jax.Array, b: jax.Array, *, trans_b: bool = False) -> jax.Array:
    """Tensor-core matmul inside a kernel, fp32 result (bf16 or fp32 operands)."""
    return _pltriton.dot(a, b, trans_b=trans_b)


def masked_load(ref: Any, mask: jax.Array, other: float = 0.0) -> jax.Array:
    """Load `ref` (a view) where `mask` holds, `other` elsewhere; masked lanes touch no memory."""
    return _pltriton.load(ref, mask=mask, other=other)


def masked_store(ref: Any, val: jax.Array, mask: jax.Array) -> None:
    """Store `val` into `ref` (a view) where `mask` holds; other lanes are left untouched."""
    _pltriton.store(ref, val, mask=mask)
