"""Engine changes undone for A/B probes (bench/probe_startup.py, bench/probe_decode_variants.py)."""

from __future__ import annotations


def lower_kernel_per_program() -> None:
    """The Mosaic GPU decode kernel lowered inside every program that uses it (as before 2026-12-01),
    instead of once per signature as an export (`kernels_pallas.paged_decode_mgpu._lowered_once`)."""
    import kernels_pallas.paged_decode_mgpu as mgpu

    mgpu._lowered_once = lambda signature, static, platform: mgpu.InlineKernel(static)


def decode_attention_splits(num_splits: int) -> None:
    """The Mosaic decode attention kernel with `num_splits` K splits in every program. The default tuning
    sees the block table's width (max_model_len), not the contexts: at batch 1 with a 4096-token
    max_model_len it picks 9 splits, of which a 128-384 token context fills 1-3, and the split merge
    runs as its own kernel; with 1 split the merge goes away and one block walks the 1-3 tiles."""
    import kernels_pallas.paged_decode_mgpu as mgpu

    default = mgpu.default_decode_tuning

    def tuning(num_seqs: int, num_kv_heads: int, block_size: int, max_context: int) -> dict:
        return {**default(num_seqs, num_kv_heads, block_size, max_context), "num_splits": num_splits}

    mgpu.default_decode_tuning = tuning


def unfused_decode() -> None:
    """Decode layers without the fused RoPE + K/V write path (`rtp_jax.models.attention.rope_write_decode`,
    on by default with the Mosaic decode kernel since 2026-12-01): XLA's q RoPE + pad and K/V stack
    fusions and the Pallas K/V write, as before."""
    import rtp_jax.engine.core as core
    from rtp_jax.models.attention import select_attention_backend

    def select(name: str = "auto", **tuning: object) -> object:
        backend = select_attention_backend(name, **tuning)
        if getattr(backend.decode, "fused_decode", None) is not None:
            backend.decode.fused_decode = None  # type: ignore[attr-defined]
        return backend

    core.select_attention_backend = select
