"""Engine changes undone for A/B probes (bench/probe_startup.py, bench/probe_decode_variants.py)."""

from __future__ import annotations


def lower_kernel_per_program() -> None:
    """The Mosaic GPU decode kernel lowered inside every program that uses it (as before 2026-12-01),
    instead of once per signature as an export (`kernels_pallas.paged_decode_mgpu._lowered_once`)."""
    import kernels_pallas.paged_decode_mgpu as mgpu

    mgpu._lowered_once = lambda signature, static, platform: mgpu.InlineKernel(static)


def decode_gemv(mode: str, tilings_json: str | None = None, max_rows: int = 8) -> None:
    """The model's q/k/v, o_proj, gate/up and down GEMMs of programs with at most `max_rows` token rows
    served by bench/probe_gemv_pdl.py's Mosaic GPU `gemv` instead of XLA's dot (one device only; other
    shapes and meshes keep XLA). `mode`: "gemv" (no PDL), "gemv_pdl" (weights requested before waiting
    on the previous kernel) or "gemv_pdl_early" (and `launch_dependents` right after the wait).
    `tilings_json`: a probe_gemv_pdl JSON; per weight shape the fastest tiling of this mode there,
    else (64, 256, 4, 2, 0) with the splits reduced until they divide K. On the CPU the kernel runs in the
    Mosaic GPU interpreter (jax >= 0.11), for a smoke test of this patch."""
    import json

    import jax
    import jax.numpy as jnp
    from probe_gemv_pdl import SHAPES, Tiling, exported, gemv, tiling_kwargs

    import rtp_jax.models.llama as llama

    pdl, early = {"gemv": (False, False), "gemv_pdl": (True, False), "gemv_pdl_early": (True, True)}[mode]
    suffix = ("_pdl" if pdl else "") + ("_early" if early else "")
    best: dict[tuple[int, int], Tiling] = {}
    if tilings_json:
        timed: dict[tuple[int, int], list[tuple[float, Tiling]]] = {}
        for row in json.loads(open(tilings_json).read())["rows"]:
            name = row["variant"]
            if "us" not in row or not name.startswith("gemv(") or not name.endswith(")" + suffix):
                continue
            tiling = tuple(int(v) for v in name[5:name.index(")")].split(","))
            if row.get("max_rel_err", 1.0) < 1e-2:
                timed.setdefault(SHAPES[row["shape"]], []).append((row["us"], tiling))  # type: ignore[arg-type]
        best = {shape: min(rows)[1] for shape, rows in timed.items()}
    cpu = jax.default_backend() == "cpu"
    seen: set[tuple[int, ...]] = set()

    def tiling_for(n: int, k: int) -> Tiling | None:
        tn, tk, st, sp, per_sm = best.get((n, k), (64, 256, 4, 2, 0))
        while sp > 1 and k % (sp * tk):
            sp //= 2
        return (tn, tk, st, sp, per_sm) if n % tn == 0 and k % (sp * tk) == 0 else None

    def matmul(x: jax.Array, w: jax.Array) -> jax.Array | None:
        """x: [T, K] @ w: [N, K]^T -> [T, N] in x's dtype, or None where the kernel does not apply."""
        n, k = w.shape
        tiling = tiling_for(n, k)
        if (tiling is None or x.ndim != 2 or x.shape[0] > max_rows or x.dtype != jnp.bfloat16
                or w.dtype != jnp.bfloat16 or jax.device_count() != 1):
            return None
        if (x.shape[0], n, k) not in seen:  # at trace time: which GEMMs the kernel serves
            seen.add((x.shape[0], n, k))
            print(f"decode_gemv: T={x.shape[0]} N={n} K={k} tiling {tiling}", flush=True)
        if cpu:
            y = gemv(x, w, interpret=True, **{**tiling_kwargs(tiling), "ctas": 0})
        else:
            y = exported(tiling, pdl, tuple(x.shape), tuple(w.shape), early_launch=early).call(x, w)
        return y.astype(x.dtype)

    linear_call, qkv_project, gate_up_call = (llama.Linear.__call__, llama.QKVProj.project,
                                              llama.GateUpProj.__call__)

    def linear(self: llama.Linear, x: jax.Array) -> jax.Array:
        y = matmul(x, self.weight[...])
        if y is None:
            return linear_call(self, x)
        return y + self.bias[...] if self.bias is not None else y

    def qkv(self: llama.QKVProj, x: jax.Array) -> jax.Array:
        kv, group2, hd, d = self.weight.shape
        y = matmul(x, self.weight[...].reshape(kv * group2 * hd, d))
        if y is None:
            return qkv_project(self, x)
        h = y.reshape(x.shape[0], kv, group2, hd)
        return h + self.bias[...] if self.bias is not None else h

    def gate_up(self: llama.GateUpProj, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        two, i, d = self.weight.shape
        y = matmul(x, self.weight[...].reshape(two * i, d))
        if y is None:
            return gate_up_call(self, x)
        h = y.reshape(x.shape[0], two, i)
        return h[:, 0], h[:, 1]

    llama.Linear.__call__ = linear  # type: ignore[method-assign]
    llama.QKVProj.project = qkv  # type: ignore[method-assign]
    llama.GateUpProj.__call__ = gate_up  # type: ignore[method-assign]
    print(f"decode_gemv {mode}: tilings {best or 'default'}", flush=True)


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


def bucketed_block_tables() -> None:
    """Block tables padded to a power of two of the batch's longest context (as for the reference
    backend) with the Pallas backends too, so the decode attention's tuning (split count) follows the
    context bucket instead of max_model_len, at the price of one decode program per bucket."""
    import rtp_jax.engine.core as core

    class Runner(core.ModelRunner):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            kwargs["bucket_block_tables"] = True
            super().__init__(*args, **kwargs)

    core.ModelRunner = Runner  # type: ignore[misc]


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
