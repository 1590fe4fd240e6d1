"""Decode-layer GEMMs with our own split-K and one Pallas epilogue kernel vs XLA's graph (Llama-3-8B shapes).

    python3 bench/probe_splitk.py --out $OUT [--layers 32] [--shape tiny]

Each timed program runs `--layers` copies of the op with distinct weights (so nothing is served from L2)
and reports microseconds per layer (median of calls after warm-up):
  gemm   the GEMM alone: XLA's (`xla`, its split-K reduction included) vs `split_k_matmul` partials with
         S = 2..16, the weight either viewed as [N, S, K/S] (`view`) or stored [S, N, K/S] (`stored`)
  post   o_proj -> residual add -> RMSNorm -> gate/up -> silu*up -> down -> residual add -> RMSNorm
         (the next layer's input norm): XLA's graph vs split-K partials + `add_rmsnorm` kernels
  qkv    RMSNorm'd input -> q/k/v GEMM -> RoPE -> K/V cache write -> q padded to the decode kernel's
         rows: XLA's graph with the Pallas K/V write (the engine today) vs partials + `qkv_rope_write`
Outputs of each fused variant are compared with XLA's (max abs difference). Writes probe_splitk.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kernels_pallas.decode_epilogue import (  # noqa: E402
    add_rmsnorm,
    add_rmsnorm_reference,
    qkv_rope_write,
    qkv_rope_write_reference,
    rope_cos_sin,
    split_k_matmul,
)
from kernels_pallas.kv_write import paged_kv_write  # noqa: E402
from rtp_jax.models.attention import rms_norm  # noqa: E402
from rtp_jax.models.rope import apply_rope  # noqa: E402

SHAPES = {  # hidden, heads, kv_heads, head_dim, ffn
    "llama3-8b": (4096, 32, 8, 128, 14336),
    "tiny": (256, 8, 2, 32, 512),
}
BF16 = jnp.bfloat16


def timeit(fn: Any, args: tuple, iters: int, donate_first: int = 0, warm_s: float = 0.3,
           repeat_s: float = 0.03) -> float:
    """Median seconds per call of fn(*args) (with donate_first, the first outputs feed the next call).

    The GPU is kept busy for `warm_s` first (clocks ramp up after a compile's idle gap: short bursts read
    up to 3x slow, bench/attention.py), then each of `iters` repeats queues ~`repeat_s` of calls before
    one sync, so launch latency stays out of the figure.
    """
    state = {"args": args}

    def call() -> Any:
        out = fn(*state["args"])
        if donate_first:
            state["args"] = (*out[:donate_first], *state["args"][donate_first:])
        return out

    jax.block_until_ready(call())
    t0 = time.perf_counter()
    calls = 0
    while time.perf_counter() - t0 < warm_s or calls < 2:
        jax.block_until_ready(call())
        calls += 1
    n = max(1, int(repeat_s / ((time.perf_counter() - t0) / calls)))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        for _ in range(n):
            out = call()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def rand(key: int, shape: tuple[int, ...], dtype: Any = BF16, scale: float = 0.02) -> jax.Array:
    return (scale * jax.random.normal(jax.random.key(key), shape, jnp.float32)).astype(dtype)


def gemm_sweep(cfg: tuple, layers: int, n: int, interpret: bool) -> list[dict]:
    d, heads, kvh, hd, ffn = cfg
    g = heads // kvh
    kinds = {"qkv": ((kvh, g + 2, hd), d), "o": ((d,), heads * hd), "down": ((d,), ffn)}
    rows = []
    for kind, (out, k) in kinds.items():
        xs = rand(1, (layers, 1, k), scale=1.0)
        ws = [rand(100 + i, (*out, k)) for i in range(layers)]
        letters = "abc"[: len(out)]

        def xla(xs: jax.Array, ws: list, letters: str = letters) -> list:
            return [jnp.einsum(f"tk,{letters}k->t{letters}", xs[i], w) for i, w in enumerate(ws)]

        us = timeit(jax.jit(xla), (xs, ws), n) / layers * 1e6
        gbps = sum(w.nbytes for w in ws) / layers / (us * 1e-6) / 1e9
        rows.append({"part": "gemm", "kind": kind, "variant": "xla", "us": us, "GBps": gbps})
        print(f"gemm {kind} xla: {us:.1f} us ({gbps:.0f} GB/s)", flush=True)
        for s in (4, 8, 16):
            if k % s:
                continue
            stored = [jnp.moveaxis(w.reshape(*out, s, k // s), -2, 0) for w in ws]
            jax.block_until_ready(stored)

            def view(xs: jax.Array, ws: list, s: int = s, out: tuple = out, k: int = k) -> list:
                return [split_k_matmul(xs[i], jnp.moveaxis(w.reshape(*out, s, k // s), -2, 0))
                        for i, w in enumerate(ws)]

            def kept(xs: jax.Array, ws: list) -> list:
                return [split_k_matmul(xs[i], w) for i, w in enumerate(ws)]

            for name, fn, arg in (("view", view, ws), ("stored", kept, stored)):
                us = timeit(jax.jit(fn), (xs, arg), n) / layers * 1e6
                gbps = sum(w.nbytes for w in ws) / layers / (us * 1e-6) / 1e9
                rows.append({"part": "gemm", "kind": kind, "variant": f"{name}_s{s}", "us": us, "GBps": gbps})
                print(f"gemm {kind} {name} S={s}: {us:.1f} us ({gbps:.0f} GB/s)", flush=True)
            del stored
    return rows


def post_block(cfg: tuple, layers: int, n: int, t: int, interpret: bool) -> list[dict]:
    d, heads, kvh, hd, ffn = cfg
    eps = 1e-5
    o_in = rand(1, (layers, t, heads * hd), scale=1.0)
    res = rand(2, (layers, t, d), scale=1.0)
    wo = [rand(200 + i, (d, heads * hd)) for i in range(layers)]
    wgu = [rand(300 + i, (2, ffn, d)) for i in range(layers)]
    wd = [rand(400 + i, (d, ffn)) for i in range(layers)]
    g1 = [1.0 + rand(500 + i, (d,), scale=0.1) for i in range(layers)]
    g2 = [1.0 + rand(600 + i, (d,), scale=0.1) for i in range(layers)]

    def mlp_in(xn: jax.Array, wgu: jax.Array) -> jax.Array:
        h = jnp.einsum("td,gid->tgi", xn, wgu)
        return jax.nn.silu(h[:, 0]) * h[:, 1]

    def xla(o_in: jax.Array, res: jax.Array, p: tuple) -> list:
        outs = []
        for i in range(layers):
            x = res[i] + jnp.einsum("ti,oi->to", o_in[i], p[0][i])
            xn = rms_norm(x, p[3][i], eps)
            x = x + jnp.einsum("ti,oi->to", mlp_in(xn, p[1][i]), p[2][i])
            outs.append((x, rms_norm(x, p[4][i], eps)))
        return outs

    def fused(o_in: jax.Array, res: jax.Array, p: tuple, epilogue: Any) -> list:
        outs = []
        for i in range(layers):
            x, xn = epilogue(split_k_matmul(o_in[i], p[0][i]), res[i], p[3][i], eps)
            x, xn1 = epilogue(split_k_matmul(mlp_in(xn, p[1][i]), p[2][i]), x, p[4][i], eps)
            outs.append((x, xn1))
        return outs

    kernel = lambda *a: add_rmsnorm(*a, interpret=interpret)  # noqa: E731
    params = (wo, wgu, wd, g1, g2)
    want = jax.jit(xla)(o_in, res, params)
    us = timeit(jax.jit(xla), (o_in, res, params), n) / layers * 1e6
    rows = [{"part": "post", "T": t, "variant": "xla", "us": us}]
    print(f"post T={t} xla: {us:.1f} us", flush=True)
    for so, sd in ((4, 4), (8, 8), (4, 8)):
        stored = ([jnp.moveaxis(w.reshape(d, so, -1), 1, 0) for w in wo], wgu,
                  [jnp.moveaxis(w.reshape(d, sd, -1), 1, 0) for w in wd], g1, g2)
        for name, epi in (("kernel", kernel), ("xla_epilogue", add_rmsnorm_reference)):
            fn = jax.jit(lambda a, b, p, epi=epi: fused(a, b, p, epi))
            got = fn(o_in, res, stored)
            err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                      for pa, pb in zip(got, want, strict=True) for a, b in zip(pa, pb, strict=True))
            us = timeit(fn, (o_in, res, stored), n) / layers * 1e6
            rows.append({"part": "post", "T": t, "variant": f"{name}_o{so}_d{sd}", "us": us,
                         "max_abs_diff": err})
            print(f"post T={t} {name} S_o={so} S_down={sd}: {us:.1f} us (max|diff| vs xla {err:.3g})",
                  flush=True)
        del stored
    return rows


def qkv_block(cfg: tuple, layers: int, n: int, t: int, interpret: bool) -> list[dict]:
    d, heads, kvh, hd, ffn = cfg
    g = heads // kvh
    gp = -(-g // 8) * 8
    eps = 1e-5
    nb, bs = 512, 16
    x_in = rand(1, (layers, t, d), scale=1.0)
    wqkv = [rand(700 + i, (kvh, g + 2, hd, d)) for i in range(layers)]
    gn = [1.0 + rand(800 + i, (d,), scale=0.1) for i in range(layers)]
    inv = jnp.asarray(1.0 / (500000.0 ** (np.arange(0, hd, 2) / hd)), jnp.float32)
    pos = jnp.arange(100, 100 + t, dtype=jnp.int32)
    slots = jnp.asarray(np.random.default_rng(0).choice(nb * bs, t, replace=False), jnp.int32)

    def caches() -> list:
        return [(rand(900 + i, (nb, bs, kvh, hd), scale=1.0), rand(950 + i, (nb, bs, kvh, hd), scale=1.0))
                for i in range(layers)]

    def xla(kv: list, x_in: jax.Array, w: list, gn: list) -> tuple:
        new_kv, qs = [], []
        for i in range(layers):
            xn = rms_norm(x_in[i], gn[i], eps)
            h = jnp.einsum("td,kghd->tkgh", xn, w[i])
            q = h[:, :, :g].reshape(t, heads, hd)
            q, k = apply_rope(q, pos, inv), apply_rope(h[:, :, g], pos, inv)
            kc, vc = paged_kv_write(*kv[i], k, h[:, :, g + 1], slots, interpret=interpret)
            new_kv.append((kc, vc))
            qs.append(jnp.pad(q.reshape(t, kvh, g, hd), ((0, 0), (0, 0), (0, gp - g), (0, 0))))
        return new_kv, qs

    def fused(kv: list, x_in: jax.Array, w: list, gn: list, s: int, use_kernel: bool) -> tuple:
        cos, sin = rope_cos_sin(pos, inv)
        new_kv, qs = [], []
        for i in range(layers):
            parts = split_k_matmul(rms_norm(x_in[i], gn[i], eps), w[i])
            f = qkv_rope_write if use_kernel else qkv_rope_write_reference
            kw = {"interpret": interpret} if use_kernel else {}
            q, kc, vc = f(parts, cos, sin, *kv[i], slots, group_pad=gp, dtype=BF16, **kw)
            new_kv.append((kc, vc))
            qs.append(q)
        return new_kv, qs

    base = jax.jit(xla, donate_argnums=(0,))
    want_kv, want_q = base(caches(), x_in, wqkv, gn)
    want = [np.asarray(a, np.float32) for a in (want_q[0], want_kv[0][0][slots // bs, slots % bs],
                                                 want_kv[0][1][slots // bs, slots % bs])]
    del want_kv
    us = timeit(base, (caches(), x_in, wqkv, gn), n, donate_first=1) / layers * 1e6
    rows = [{"part": "qkv", "T": t, "variant": "xla", "us": us}]
    print(f"qkv T={t} xla (+ Pallas K/V write): {us:.1f} us", flush=True)
    for s in (4, 8):
        stored = [jnp.moveaxis(w.reshape(kvh, g + 2, hd, s, d // s), 3, 0) for w in wqkv]
        for use_kernel in (True, False):
            fn = jax.jit(lambda kv, a, w, gn, s=s, u=use_kernel: fused(kv, a, w, gn, s, u),
                         donate_argnums=(0,))
            kv, q = fn(caches(), x_in, stored, gn)
            got = [np.asarray(a, np.float32) for a in (q[0], kv[0][0][slots // bs, slots % bs],
                                                        kv[0][1][slots // bs, slots % bs])]
            del kv
            err = max(float(np.max(np.abs(a - b))) for a, b in zip(got, want, strict=True))
            us = timeit(fn, (caches(), x_in, stored, gn), n, donate_first=1) / layers * 1e6
            name = "kernel" if use_kernel else "xla_epilogue"
            rows.append({"part": "qkv", "T": t, "variant": f"{name}_s{s}", "us": us, "max_abs_diff": err})
            print(f"qkv T={t} {name} S={s}: {us:.1f} us (max|diff| vs xla {err:.3g})", flush=True)
        del stored
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--parts", default="gemm,post,qkv")
    ns = p.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)
    interpret = jax.default_backend() == "cpu"
    cfg = SHAPES[ns.shape]
    rows: list[dict] = []
    parts = ns.parts.split(",")
    res = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "shape": ns.shape,
           "layers": ns.layers, "rows": rows}

    big = jnp.zeros((1 << 29,) if not interpret else (1 << 16,), BF16)  # 1 GiB on the GPU
    sec = timeit(jax.jit(lambda a: a + 1), (big,), ns.repeats)
    res["copy_TBps"] = 2 * big.nbytes / sec / 1e12  # bytes read + written
    print(f"copy bandwidth (x + 1): {res['copy_TBps']:.2f} TB/s", flush=True)
    del big

    def save() -> None:
        (ns.out / "probe_splitk.json").write_text(json.dumps(res, indent=1))

    for t in (1, 8):
        if "post" in parts:
            rows += post_block(cfg, ns.layers, ns.repeats, t, interpret)
            save()
        if "qkv" in parts:
            rows += qkv_block(cfg, ns.layers, ns.repeats, t, interpret)
            save()
    if "gemm" in parts:
        rows += gemm_sweep(cfg, ns.layers, ns.repeats, interpret)
        save()
    print("\n| part | T | kind | variant | us/layer | max abs diff |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['part']} | {r.get('T', 1)} | {r.get('kind', '')} | {r['variant']} | {r['us']:.1f} | "
              f"{r.get('max_abs_diff', '')} |")


if __name__ == "__main__":
    main()
