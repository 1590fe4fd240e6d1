"""Engine changes undone for A/B probes (bench/probe_startup.py, bench/probe_decode_variants.py)."""

from __future__ import annotations


def lower_kernel_per_program() -> None:
    """The Mosaic GPU decode kernel lowered inside every program that uses it (as before 2026-12-01),
    instead of once per signature as an export (`kernels_pallas.paged_decode_mgpu._lowered_once`)."""
    import kernels_pallas.paged_decode_mgpu as mgpu

    mgpu._lowered_once = lambda signature, static, platform: mgpu.InlineKernel(static)
