"""Engine changes undone for A/B probes (bench/probe_startup.py, bench/probe_decode_variants.py)."""

from __future__ import annotations


def lower_kernel_per_program() -> None:
    """The Mosaic GPU decode kernel lowered inside every program that uses it (as before 2026-12-01),
    instead of once per signature as an export (`kernels_pallas.paged_decode_mgpu._lowered_once`)."""
    import kernels_pallas.paged_decode_mgpu as mgpu

    mgpu._lowered_once = lambda signature, static, platform: mgpu.InlineKernel(static)


def decode_attention_tuning(**overrides: int | bool) -> None:
    """The Mosaic decode attention kernel with some of its tuning fixed in every program (`pages_per_tile`,
    `num_stages`, `num_splits`, `heads_inner`). The default tuning sees the block table's width
    (max_model_len), not the contexts: at batch 1 with a 4096-token max_model_len it picks 9 splits, of
    which a 128-384 token context fills 1-3, and the split merge runs as its own kernel; with 1 split the
    merge goes away and one block walks the 1-3 tiles."""
    import kernels_pallas.paged_decode_mgpu as mgpu

    default = mgpu.default_decode_tuning
    unknown = set(overrides) - {"pages_per_tile", "num_stages", "num_splits", "heads_inner"}
    if unknown:
        raise ValueError(f"unknown decode tuning keys {sorted(unknown)}")

    def tuning(num_seqs: int, num_kv_heads: int, block_size: int, max_context: int) -> dict:
        return {**default(num_seqs, num_kv_heads, block_size, max_context), **overrides}

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


def _decode_program_options(extra: dict, max_tokens: int) -> None:
    """`extra` XLA options for the step programs of at most `max_tokens` tokens (bs1 decode runs 4)."""
    import rtp_jax.engine.step as step

    default = step.compiler_options

    def options(num_tokens: int) -> dict:
        opts = default(num_tokens)
        return {**opts, **extra} if num_tokens <= max_tokens else opts

    step.compiler_options = options


def decode_gemm_candidates(configs: list[str], max_tokens: int = 16) -> None:
    """Decode programs compiled with XLA's autotuner choosing each Triton GEMM's tiling among `configs`
    only (`xla_gpu_gemm_autotuner_override_file`; textprotos as for `decode_gemm_config`): per-shape
    choices where no one tiling suits every decode GEMM."""
    import tempfile

    from probe_gemm_configs import candidates_textproto

    with tempfile.NamedTemporaryFile("w", suffix=".textproto", delete=False) as f:
        f.write(candidates_textproto(configs))
    _decode_program_options({"xla_gpu_gemm_autotuner_override_file": f.name}, max_tokens)


def decode_gemm_config(config: str, max_tokens: int = 16) -> None:
    """Decode programs compiled with every Triton GEMM forced to one tiling
    (`xla_gpu_override_gemm_autotuner`, an AutotuneResult.TritonGemmKey textproto such as
    "block_m:16;block_n:32;block_k:128;split_k:2;num_stages:3;num_warps:4;num_ctas:1") instead of the one
    XLA's autotuner times with the weights in L2 (bench/probe_gemm_configs.py)."""
    _decode_program_options({"xla_gpu_override_gemm_autotuner": config}, max_tokens)


def gate_up_major() -> None:
    """gate/up's GEMM output laid out [2, T, hidden] (gate and up contiguous) instead of [T, 2, hidden], so
    XLA may fuse silu(gate) * up into the down GEMM's operand instead of running it as its own kernel."""
    import jax
    import jax.numpy as jnp

    import rtp_jax.models.llama as llama

    def call(self: llama.GateUpProj, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        h = jnp.einsum("td,gid->gti", x, self.weight[...])
        return h[0], h[1]

    llama.GateUpProj.__call__ = call  # type: ignore[method-assign]


def no_layer_norms() -> None:
    """Every RMSNorm of the model replaced by the identity: a timing bound, not a model (its tokens differ).
    It bounds what folding the norms into their neighbours could buy at batch 1 (the weight folded into the
    next GEMM, the row scale applied by the kernel that consumes the GEMM: rope_kv_write, silu * up): the
    two RMSNorm kernels per layer (~1.7 us each in the 415b25b trace) gone, nothing added elsewhere."""
    import jax

    import rtp_jax.models.llama as llama

    def identity(self: llama.RMSNorm, x: jax.Array) -> jax.Array:
        return x

    llama.RMSNorm.__call__ = identity  # type: ignore[method-assign]


def no_attention_kernel() -> None:
    """Decode layers that rope q and k and write K/V (kernels_pallas/rope_kv_write.py) but skip the Mosaic
    attention kernel and its split merge, handing o_proj the roped q instead: a timing bound, not a model (its
    tokens differ). It bounds what any cheaper decode attention could buy at batch 1 (the kernel is ~5 us
    per layer for a 128-384 token context whose K/V take well under 1 us to read)."""
    import jax

    import rtp_jax.models.attention as attention
    from kernels_pallas import rope_kv_write as rkw
    from kernels_pallas.paged_decode_mgpu import group_pad

    def fused(h: jax.Array, positions: jax.Array, inv_freq: jax.Array, k_cache: jax.Array,
              v_cache: jax.Array, md: attention.AttentionMetadata, *, num_q_heads: int, **_: object,
              ) -> tuple[jax.Array, jax.Array, jax.Array] | None:
        t, kv, _, head_dim = h.shape[-4:]
        if t != md.kv_lens.shape[0] or not rkw.supports(h, k_cache):
            return None
        group = num_q_heads // kv
        q4, k_cache, v_cache = rkw.rope_kv_write(h, positions, inv_freq, k_cache, v_cache, md.slot_mapping,
                                                 group_pad=group_pad(group))
        return q4[:, :, :group].reshape(t, num_q_heads, head_dim), k_cache, v_cache

    fused.takes_partials = True  # type: ignore[attr-defined]
    attention.rope_write_decode = fused


def weights_in_major(only: list[str] | None = None) -> None:
    """Every GEMM weight (ndim >= 2, all but the embedding table) held with its contraction axis (the last,
    `in`) most major in device memory: the engine's logical [out, in] shapes and code unchanged, the
    physical layout [in, out] (`jax.experimental.layout`; jit takes each argument's layout). The plain XLA
    step (bench/probe_plain_step.py) ran 0.9-1.4% faster at batch 1 with [in, out] weights; the engine with
    every GEMM weight moved ran 19% slower (H200, ff4f755: 191.4 vs 236.4 tok/s). `only`: path substrings
    (e.g. "o_proj", "lm_head") limiting which weights move."""
    import jax
    from jax.experimental.layout import Format, Layout

    import rtp_jax.engine.runner as runner

    init = runner.ModelRunner.__init__

    def relayout(path: tuple, leaf: jax.Array) -> jax.Array:
        name = jax.tree_util.keystr(path)
        if leaf.ndim < 2 or "embed_tokens" in name or "weight" not in name:
            return leaf
        if only is not None and not any(o in name for o in only):
            return leaf
        order = (leaf.ndim - 1, *range(leaf.ndim - 1))
        out = jax.device_put(leaf, Format(Layout(major_to_minor=order), leaf.sharding))
        leaf.delete()  # one weight's copy at a time on the device
        return out

    def patched(self: runner.ModelRunner, state: object, *a: object, **k: object) -> None:
        init(self, jax.tree_util.tree_map_with_path(relayout, state), *a, **k)
        moved = [x for x in self.state_leaves
                 if x.ndim >= 2 and x.format.layout.major_to_minor[0] == x.ndim - 1]
        print(f"weights_in_major: {len(moved)} of {len(self.state_leaves)} leaves, "
              f"{sum(x.nbytes for x in moved) / 1e9:.2f} GB held [in, out]", flush=True)

    runner.ModelRunner.__init__ = patched  # type: ignore[method-assign]
