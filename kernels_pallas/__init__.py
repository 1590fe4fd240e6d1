"""Pallas kernels, each beside its pure-JAX reference."""

from kernels_pallas.ragged_paged_attention import (
    ragged_paged_attention,
    ragged_paged_attention_reference,
)

__all__ = ["ragged_paged_attention", "ragged_paged_attention_reference"]
