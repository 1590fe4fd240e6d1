"""Does one GEMM over stacked gate/up (or q/k/v) weights beat separate GEMMs under XLA on this GPU?

    python3 bench/probe_mlp.py --out $OUT            # Llama-3-8B shapes, tokens 1..2048
    python3 bench/probe_mlp.py --small               # tiny shapes (a CPU smoke run)

The bs1 decode profile (bench/notes_bench.md, 2026-11-30) shows XLA merging q/k/v into one GEMM on its
own but running gate and up as two GEMMs (3.6-3.9 TB/s where down reaches 4.0). Before the model's
parameters change shape, this measures the candidates on the real shapes, each over 4 layers' distinct
weights in one program (so weights come from HBM, not L2), median of 10:
  mlp_separate  down(silu(x Wg^T) * (x Wu^T))       as the model does now
  mlp_stacked   Wgu: [2, I, D], one einsum -> [T, 2, I]
  mlp_concat    Wgu: [2I, D], one einsum, then split
  qkv_separate / qkv_concat   the attention input projections, the same way
Each variant is checked against the separate one (max abs difference) before it is timed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import timed  # noqa: E402

LAYERS = 4  # distinct weight sets per timed program


def mlp_separate(x: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array) -> jax.Array:
    g = jnp.einsum("td,id->ti", x, wg)
    u = jnp.einsum("td,id->ti", x, wu)
    return jnp.einsum("ti,di->td", jax.nn.silu(g) * u, wd)


def mlp_stacked(x: jax.Array, wgu: jax.Array, wd: jax.Array) -> jax.Array:
    h = jnp.einsum("td,gid->tgi", x, wgu)  # wgu: [2, I, D]
    return jnp.einsum("ti,di->td", jax.nn.silu(h[:, 0]) * h[:, 1], wd)


def mlp_concat(x: jax.Array, wgu: jax.Array, wd: jax.Array) -> jax.Array:
    h = jnp.einsum("td,od->to", x, wgu)  # wgu: [2I, D], gate rows first
    g, u = jnp.split(h, 2, axis=1)
    return jnp.einsum("ti,di->td", jax.nn.silu(g) * u, wd)


def qkv_separate(x: jax.Array, wq: jax.Array, wk: jax.Array, wv: jax.Array) -> jax.Array:
    return jnp.concatenate([jnp.einsum("td,od->to", x, w) for w in (wq, wk, wv)], axis=1)


def qkv_concat(x: jax.Array, wqkv: jax.Array) -> jax.Array:
    return jnp.einsum("td,od->to", x, wqkv)


def run(d: int, inter: int, q_out: int, kv_out: int, tokens: list[int], dtype: Any) -> list[dict[str, Any]]:
    key = jax.random.key(0)

    def w(k: int, *shape: int) -> jax.Array:
        return (0.02 * jax.random.normal(jax.random.fold_in(key, k), shape, jnp.float32)).astype(dtype)

    layers = [dict(wg=w(10 * i, inter, d), wu=w(10 * i + 1, inter, d), wd=w(10 * i + 2, d, inter),
                   wq=w(10 * i + 3, q_out, d), wk=w(10 * i + 4, kv_out, d), wv=w(10 * i + 5, kv_out, d))
              for i in range(LAYERS)]
    for lw in layers:
        lw["wgu_stacked"] = jnp.stack([lw["wg"], lw["wu"]])
        lw["wgu_concat"] = jnp.concatenate([lw["wg"], lw["wu"]])
        lw["wqkv"] = jnp.concatenate([lw["wq"], lw["wk"], lw["wv"]])
    itemsize = jnp.dtype(dtype).itemsize
    mlp_bytes = 3 * inter * d * itemsize
    qkv_bytes = (q_out + 2 * kv_out) * d * itemsize
    rows = []
    for t in tokens:
        # One input per layer, as in the model: a shared x would let XLA merge GEMMs across layers.
        per_layer = [(w(1000 * t + i, t, d), lw) for i, lw in enumerate(layers)]
        cases = {
            "mlp_separate": (mlp_separate, [(x, lw["wg"], lw["wu"], lw["wd"]) for x, lw in per_layer],
                             mlp_bytes),
            "mlp_stacked": (mlp_stacked, [(x, lw["wgu_stacked"], lw["wd"]) for x, lw in per_layer],
                            mlp_bytes),
            "mlp_concat": (mlp_concat, [(x, lw["wgu_concat"], lw["wd"]) for x, lw in per_layer], mlp_bytes),
            "qkv_separate": (qkv_separate, [(x, lw["wq"], lw["wk"], lw["wv"]) for x, lw in per_layer],
                             qkv_bytes),
            "qkv_concat": (qkv_concat, [(x, lw["wqkv"]) for x, lw in per_layer], qkv_bytes),
        }
        ref: dict[str, np.ndarray] = {}
        for name, (fn, sets, nbytes) in cases.items():
            sec, out = timed(fn, sets)
            out = np.asarray(out, np.float32)
            family = name.split("_")[0]
            ref.setdefault(family, out)
            rows.append({"case": name, "tokens": t, "us": sec * 1e6, "weight_TBps": nbytes / sec / 1e12,
                         "max_abs_diff_vs_separate": float(np.max(np.abs(out - ref[family])))})
            print(f"{name:13s} T={t:5d} {sec * 1e6:9.1f} us  {nbytes / sec / 1e12:6.2f} TB/s  "
                  f"diff {rows[-1]['max_abs_diff_vs_separate']:.2e}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--small", action="store_true", help="tiny shapes for a CPU smoke run")
    p.add_argument("--tokens", default="1,8,64,256,2048")
    ns = p.parse_args()
    tokens = [int(t) for t in ns.tokens.split(",")]
    if ns.small:
        rows = run(64, 128, 64, 32, [1, 8], jnp.float32)
    else:
        rows = run(4096, 14336, 4096, 1024, tokens, jnp.bfloat16)
    if ns.out:
        Path(ns.out).mkdir(parents=True, exist_ok=True)
        info = {"devices": [str(dv.device_kind) for dv in jax.devices()], "jax": jax.__version__}
        (Path(ns.out) / "probe_mlp.json").write_text(json.dumps({**info, "rows": rows}, indent=1))
    print("\n| case | tokens | us | weight TB/s |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['tokens']} | {r['us']:.1f} | {r['weight_TBps']:.2f} |")


if __name__ == "__main__":
    main()
