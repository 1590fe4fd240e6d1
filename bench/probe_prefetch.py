"""Probe: does reading a GEMM's weights on a second CUDA stream, while the small kernels before it run,
make the GEMM itself faster (its weights then come from L2)?

At batch 1 a decode layer's GEMMs stream their weights at 3.35-4.2 TB/s while lm_head (1 GB) reaches
4.32: a small GEMM waits for its input before it reads any weight, and between GEMMs ~20 us of small
kernels per layer leave HBM idle. Here each of `--layers` layers (distinct weights, as in a decode step)
runs `--small` dependent one-fusion kernels (RMSNorm-like) on x: [T, D], then x @ W_l.T, W_l: [N, D] bf16.

Variants (one jitted program each, 32 layers, per-layer microseconds reported):
  serial       small kernels, then the GEMM
  prefetch     W_l (or its first `--fraction` of rows) reduced on `compute_on("gpu_stream:1")` from
               the moment the previous layer's output exists; the GEMM waits for that reduction
               (`lax.optimization_barrier` carries both orders)
  same_stream  the same reduction on the main stream (what it costs when nothing overlaps)
  small_only / gemm_only   the two parts alone
  gemm_twice   the GEMM run twice on the same weights, the second depending on the first: the second
               run's time (gemm_twice - gemm_only) bounds a GEMM whose weights sit in L2

    python3 bench/probe_prefetch.py --out $OUT          # GPU; --smoke: tiny shapes on the CPU
Writes probe_prefetch.json under --out; prints a table last.

Measured on the H200 (jax 0.11.2, bench/results/probe_prefetch.json, notes_bench.md 2026-12-01 seventh
session): a GEMM whose weights were just read is faster only where they fit in L2 (o_proj shape 7.1 vs
9.3 us, q/k/v 14.5 vs 16.3, gate/up slower), so a perfectly hidden prefetch would buy <= ~4 us per layer;
and the `prefetch` variant does not run there: XLA fails with "No ExecutionStreamId found for
call-start" for the stream-annotated call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(__file__))
from attention import timed  # noqa: E402


def small_kernel(x: jax.Array) -> jax.Array:
    """One reduction fusion: x: [T, D] bf16 -> RMS-normalized x (+ a constant, so no two fold)."""
    x32 = x.astype(jnp.float32)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6) + 1e-3
    return lax.optimization_barrier(y.astype(x.dtype))


def on_stream(fn: Callable[..., jax.Array], stream: int | None) -> Callable[..., jax.Array]:
    """`fn` jitted, and annotated to run on CUDA stream `stream` (None: the main stream)."""
    jitted = jax.jit(fn)
    if stream is None:
        return jitted
    from jax._src import compute_on as co
    from jax._src import core

    api = getattr(co, "compute_on2", None) or co.compute_on  # jax 0.10: compute_on2; 0.11: compute_on
    return api(jitted, compute_type=f"gpu_stream:{stream}", out_memory_spaces=core.MemorySpace.Device)


def after_read(x: jax.Array, seen: jax.Array) -> jax.Array:
    """x, made to depend on the read `seen` (+ 0 * a value of it: XLA folds no float product with 0,
    while an optimization barrier whose output goes unused is dropped with the read)."""
    return x + (seen[0] * 0).astype(x.dtype)


def touch(w: jax.Array) -> jax.Array:
    """Reads every byte of w: [N, D] -> [N] (row maxima), so its lines pass through L2."""
    return jnp.max(w, axis=1)


def fold(y: jax.Array, d: int) -> jax.Array:
    """y: [T, N] -> [T, d]: every column used (a slice of a dot may be pushed into the dot by XLA)."""
    n = y.shape[1]
    if n == d:
        return y
    k = -(-n // d)
    return jnp.pad(y, ((0, 0), (0, k * d - n))).reshape(y.shape[0], k, d).sum(1).astype(y.dtype)


def layer_fn(variant: str, n_small: int,
             fraction: float) -> Callable[[jax.Array, list[jax.Array]], jax.Array]:
    stream = 1 if variant == "prefetch" else None
    read = on_stream(touch, stream)

    def run(x: jax.Array, weights: list[jax.Array]) -> jax.Array:
        for w in weights:
            if variant in ("prefetch", "same_stream"):
                rows = max(1, int(w.shape[0] * fraction))
                w_start, _ = lax.optimization_barrier((w, x))  # not before the previous layer's output
                seen = read(w_start[:rows])
            if variant != "gemm_only":
                for _ in range(n_small):
                    x = small_kernel(x)
            if variant == "small_only":
                continue
            if variant in ("prefetch", "same_stream"):
                x = after_read(x, seen)  # the GEMM after the read
            y = fold(jnp.einsum("td,nd->tn", x, w), x.shape[1])
            if variant == "gemm_twice":
                y = fold(jnp.einsum("td,nd->tn", y, w), x.shape[1])
            x = y
        return x

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--rows", type=int, default=4, help="T, the decode rows")
    p.add_argument("--small", type=int, default=5, help="small kernels before each GEMM")
    p.add_argument("--shapes", default="4096x4096,6144x4096,28672x4096",
                   help="N x D of the weights (o_proj, q/k/v, gate/up)")
    p.add_argument("--fractions", default="1.0,0.5", help="share of W's rows read ahead (prefetch)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, CPU, no stream annotation")
    ns = p.parse_args()
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = jax.default_backend() == "gpu"
    shapes = [tuple(int(v) for v in s.split("x")) for s in ns.shapes.split(",")]
    layers = ns.layers
    if ns.smoke:
        shapes, layers = [(256, 128)], 4
    rows: list[dict[str, Any]] = []
    for n, d in shapes:
        key = jax.random.key(0)
        weights = [(0.02 * jax.random.normal(jax.random.fold_in(key, i), (n, d))).astype(jnp.bfloat16)
                   for i in range(layers)]
        x = jax.random.normal(jax.random.key(1), (ns.rows, d), jnp.float32).astype(jnp.bfloat16)
        ref = None
        variants = [("serial", 1.0), ("small_only", 1.0), ("gemm_only", 1.0), ("gemm_twice", 1.0),
                    ("same_stream", 1.0)]
        variants += [("prefetch", float(f)) for f in ns.fractions.split(",")] if gpu else []
        for variant, fraction in variants:
            fn = layer_fn(variant, ns.small, fraction)
            row: dict[str, Any] = {"shape": f"{n}x{d}", "variant": variant, "fraction": fraction,
                                   "weight_MB": n * d * 2 / 1e6}
            try:
                sec, res = timed(fn, [(x, weights)], iters=7)
                row["us_per_layer"] = sec / layers * 1e6
                if variant in ("serial", "prefetch", "same_stream"):
                    if ref is None:
                        ref = np.asarray(res, np.float32)
                    row["max_abs_diff_vs_serial"] = float(np.max(np.abs(np.asarray(res, np.float32) - ref)))
                if variant == "prefetch" and fraction == 1.0:
                    text = jax.jit(fn).lower(x, weights).compile().as_text() or ""
                    row["call_start"] = text.count("call-start")
                    (out / f"prefetch_{n}x{d}_hlo.txt").write_text(text)
            except Exception as e:  # noqa: BLE001 - a probe reports and goes on
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(row, flush=True)
            rows.append(row)
    meta = {"devices": [str(dv) for dv in jax.devices()], "jax": jax.__version__, "layers": layers,
            "rows": ns.rows, "small": ns.small}
    (out / "probe_prefetch.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print("\n| shape | variant | fraction | us/layer | GEMM us (minus small) |\n|---|---|---|---|---|")
    small = {r["shape"]: r.get("us_per_layer", float("nan")) for r in rows if r["variant"] == "small_only"}
    for r in rows:
        us = r.get("us_per_layer", float("nan"))
        print(f"| {r['shape']} | {r['variant']} | {r['fraction']} | {us:.1f} | "
              f"{us - small.get(r['shape'], 0.0):.1f} | {r.get('error', '')}")


if __name__ == "__main__":
    main()
