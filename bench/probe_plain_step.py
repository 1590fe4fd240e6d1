"""The issue's reference point on this GPU: a plain XLA decode step, layers unrolled, against the roofline.

    python3 bench/probe_plain_step.py --out $OUT [--variants oi1,io1,oi4,oi1_call,oi1_gemms] [--shape tiny]

Issue 6 says a plain XLA decode step with unrolled layers reads the weights at the full copy rate on an
H100, so the engine may add only attention's bytes and a few percent. This probe measures that plain step
on the machine at hand, beside the copy rate the roofline uses and XLA reading every weight once: if the
plain step lands where the engine does, the gap to the roofline is XLA's on this GPU, not the engine's.

The plain step is Llama in ~40 lines of jnp (no Pallas, no paging): RMSNorm, fused q/k/v, RoPE, K/V
written into a dense [layers, seq, kv_heads, head_dim] cache by dynamic_update_slice, attention as two
einsums over the whole cache with a mask, o_proj + residual, RMSNorm, fused gate/up, silu * up, down +
residual; final norm, lm_head, greedy argmax fed back as the next token. Random bf16 weights made on the
device. 256 steps from position 128, as the engine's batch-1 benchmark; the first 128 cache rows are zeros
(a prompt's bytes and mask, no prefill), and each step reads all 384 rows under its mask.
Its norm and RoPE are its own on purpose: the engine's (rtp_jax/models/attention.py `rms_norm`, rope.py
`apply_rope`) carry tuning for XLA, and this is the untuned reference.

Variants (name = layout, rows, mode):
  oi1       weights [out, in] (HF's, as the engine stores them), 1 row, 256 steps in one `fori_loop`
  io1       weights [in, out]
  oi4       4 rows per GEMM (the engine pads batch-1 decode to 4 sequence slots); row 0 is the sequence
  oi1_call  one jitted call per step from Python (cache donated): the host dispatch on top
  oi1_gemms a bound: the same step without norms, RoPE or attention (GEMMs, residual adds, silu * up)
With --gemm-chains, each GEMM shape is also timed alone per layout (a chain over the layers, 1 and 4 rows).
Prints a table last; writes probe_plain_step.json under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import timed  # noqa: E402  (bench/attention.py)

PROMPT, NEW = 128, 256


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SHAPES = {"llama3-8b": Shape(32, 4096, 32, 8, 14336, 128256), "tiny": Shape(2, 256, 4, 2, 512, 1024)}


@dataclass(frozen=True)
class Variant:
    name: str
    layout: str  # "oi": weight [out, in]; "io": [in, out]
    rows: int
    per_call: bool
    gemms_only: bool


def parse_variant(name: str) -> Variant:
    base, _, mode = name.partition("_")
    if base[:2] not in ("oi", "io") or not base[2:].isdigit() or mode not in ("", "call", "gemms"):
        raise ValueError(f"--variants: {name!r} is not <oi|io><rows>[_call|_gemms]")
    return Variant(name, base[:2], int(base[2:]), mode == "call", mode == "gemms")


def make_weights(s: Shape, layout: str, seed: int = 0) -> dict[str, Any]:
    """Random bf16 weights on the device, one jitted draw per matrix (no host copy of 16 GB)."""
    hd = s.head_dim

    def draw(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return jax.jit(lambda k: (0.02 * jax.random.normal(k, shape, jnp.float32)).astype(jnp.bfloat16))(key)

    def mat(key: jax.Array, out_f: int, in_f: int) -> jax.Array:
        return draw(key, (out_f, in_f) if layout == "oi" else (in_f, out_f))

    keys = iter(jax.random.split(jax.random.key(seed), 4 * s.layers + 2))
    layers = [{
        "qkv": mat(next(keys), (s.heads + 2 * s.kv_heads) * hd, s.hidden),
        "o": mat(next(keys), s.hidden, s.heads * hd),
        "gate_up": mat(next(keys), 2 * s.ffn, s.hidden),
        "down": mat(next(keys), s.hidden, s.ffn),
        "ln1": jnp.ones((s.hidden,), jnp.bfloat16), "ln2": jnp.ones((s.hidden,), jnp.bfloat16),
    } for _ in range(s.layers)]
    return {"layers": layers, "embed": draw(next(keys), (s.vocab, s.hidden)),
            "lm_head": mat(next(keys), s.vocab, s.hidden), "norm": jnp.ones((s.hidden,), jnp.bfloat16)}


def linear(x: jax.Array, w: jax.Array, layout: str) -> jax.Array:
    """x: [T, in] -> [T, out]."""
    return jnp.einsum("ti,oi->to", x, w) if layout == "oi" else x @ w


def rms_norm(x: jax.Array, w: jax.Array, eps: float = 1e-5) -> jax.Array:
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps)).astype(x.dtype) * w


def rope(x: jax.Array, pos: jax.Array) -> jax.Array:
    """x: [T, heads, head_dim] rotated by half (Llama's layout) at position pos."""
    hd = x.shape[-1]
    inv = 1.0 / (500000.0 ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    ang = pos.astype(jnp.float32) * inv
    cos, sin = jnp.concatenate([jnp.cos(ang)] * 2), jnp.concatenate([jnp.sin(ang)] * 2)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, -1)
    return (x.astype(jnp.float32) * cos + jnp.concatenate([-x2, x1], -1) * sin).astype(x.dtype)


def step(s: Shape, v: Variant, w: dict[str, Any], kc: jax.Array, vc: jax.Array, tok: jax.Array,
         pos: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One decode step. kc, vc: [layers, seq, kv_heads, head_dim]; tok: [] int32 -> (kc, vc, next tok)."""
    hd, group = s.head_dim, s.heads // s.kv_heads
    x = jnp.broadcast_to(jnp.take(w["embed"], tok, axis=0), (v.rows, s.hidden))
    seq = kc.shape[1]
    for i, lw in enumerate(w["layers"]):
        h = x if v.gemms_only else rms_norm(x, lw["ln1"])
        qkv = linear(h, lw["qkv"], v.layout)
        if v.gemms_only:
            attn = qkv[:, : s.heads * hd]
        else:
            q = rope(qkv[:, : s.heads * hd].reshape(v.rows, s.heads, hd), pos)
            k = rope(qkv[:, s.heads * hd: (s.heads + s.kv_heads) * hd].reshape(v.rows, s.kv_heads, hd), pos)
            val = qkv[:, (s.heads + s.kv_heads) * hd:].reshape(v.rows, s.kv_heads, hd)
            kc = jax.lax.dynamic_update_slice(kc, k[None, :1], (i, pos, 0, 0))
            vc = jax.lax.dynamic_update_slice(vc, val[None, :1], (i, pos, 0, 0))
            qg = q.reshape(v.rows, s.kv_heads, group, hd)
            sc = jnp.einsum("tkgd,skd->tkgs", qg, kc[i], preferred_element_type=jnp.float32) / math.sqrt(hd)
            sc = jnp.where(jnp.arange(seq) <= pos, sc, -jnp.inf)
            p = jax.nn.softmax(sc, axis=-1).astype(jnp.bfloat16)
            attn = jnp.einsum("tkgs,skd->tkgd", p, vc[i]).reshape(v.rows, s.heads * hd)
        x = x + linear(attn, lw["o"], v.layout)
        h = x if v.gemms_only else rms_norm(x, lw["ln2"])
        gu = linear(h, lw["gate_up"], v.layout)
        x = x + linear(jax.nn.silu(gu[:, : s.ffn]) * gu[:, s.ffn:], lw["down"], v.layout)
    logits = linear(rms_norm(x[:1], w["norm"]), w["lm_head"], v.layout)
    return kc, vc, jnp.argmax(logits[0]).astype(jnp.int32)


def run_variant(s: Shape, v: Variant, w: dict[str, Any], repeats: int) -> dict[str, Any]:
    seq = PROMPT + NEW
    kc = jnp.zeros((s.layers, seq, s.kv_heads, s.head_dim), jnp.bfloat16)
    vc = jnp.zeros_like(kc)
    one = jax.jit(lambda w, kc, vc, tok, pos: step(s, v, w, kc, vc, tok, pos), donate_argnums=(1, 2))

    def loop(w: Any, kc: jax.Array, vc: jax.Array, tok: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        def body(i: jax.Array, c: tuple) -> tuple:
            return step(s, v, w, c[0], c[1], c[2], PROMPT + i)
        return jax.lax.fori_loop(0, NEW, body, (kc, vc, tok))

    many = jax.jit(loop, donate_argnums=(1, 2))
    t0 = time.perf_counter()
    tok = jnp.int32(1)
    if v.per_call:
        kc, vc, tok = one(w, kc, vc, tok, jnp.int32(PROMPT))
    else:
        kc, vc, tok = many(w, kc, vc, tok)
    jax.block_until_ready(tok)
    compile_s = time.perf_counter() - t0
    times, toks = [], []
    for _ in range(repeats + 1):  # the first run after the compile warms the clocks; not kept
        t0 = time.perf_counter()
        if v.per_call:
            for i in range(NEW):
                kc, vc, tok = one(w, kc, vc, tok, jnp.int32(PROMPT + i))
        else:
            kc, vc, tok = many(w, kc, vc, tok)
        toks.append(int(tok))
        times.append((time.perf_counter() - t0) / NEW)
    step_s = statistics.median(times[1:])
    return {"variant": v.name, "step_ms": step_s * 1e3, "tok_s": 1 / step_s,
            "step_ms_all": [t * 1e3 for t in times[1:]], "compile_s": compile_s, "last_tokens": toks}


def gemm_chains(w: dict[str, Any], layout: str, rows: tuple[int, ...] = (1, 4)) -> list[dict[str, Any]]:
    """Each decode GEMM shape alone: a chain over the 32 layers' weights of that name (x_{l+1} from y_l, so
    each GEMM waits for the last as in a step; lm_head: 8 passes over its one 1 GB matrix), T rows; us per
    GEMM and the rate it streams its weight at, timed by bench/attention.py's `timed`."""
    out = []
    named = {k: [lw[k] for lw in w["layers"]] for k in ("qkv", "o", "gate_up", "down")}
    named["lm_head"] = [w["lm_head"]] * 8

    def chain(ms: list[jax.Array], x: jax.Array) -> jax.Array:
        k_in = x.shape[1]
        for m in ms:
            y = linear(x, m, layout)
            x = jnp.tile(y, (1, -(-k_in // y.shape[1])))[:, :k_in]
        return x

    for name, mats in named.items():
        k_in = mats[0].shape[1] if layout == "oi" else mats[0].shape[0]
        for t in rows:
            sec, _ = timed(chain, [(mats, jnp.ones((t, k_in), jnp.bfloat16))])
            us = sec / len(mats) * 1e6
            tbps = mats[0].nbytes / us / 1e6
            out.append({"layout": layout, "gemm": name, "rows": t, "us": us, "TBps": tbps})
            print(f"chain {layout} {name} T={t}: {us:.1f} us, {tbps:.2f} TB/s", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--variants", default="oi1,io1,oi4,oi1_call,oi1_gemms")
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gemm-chains", action="store_true", help="also time each GEMM shape alone per layout")
    ns = p.parse_args()
    from run_all import copy_bandwidth

    s = SHAPES[ns.shape]
    variants = [parse_variant(n) for n in ns.variants.split(",")]
    res: dict[str, Any] = {"device": str(jax.devices()[0]), "jax": jax.__version__, "shape": ns.shape,
                           "command": " ".join(sys.argv), "variants": [], "gemm_chains": []}
    res["copy_bw_TBps"] = copy_bandwidth()
    weights: dict[str, dict[str, Any]] = {}
    for v in variants:
        if v.layout not in weights:
            weights.clear()  # one layout's 16 GB at a time
            weights[v.layout] = make_weights(s, v.layout)
        w = weights[v.layout]
        layer_bytes = sum(x.nbytes for lw in w["layers"] for x in lw.values())
        kv_bytes = 2 * s.layers * s.kv_heads * s.head_dim * 2 * (PROMPT + NEW // 2)
        res["step_bytes"] = layer_bytes + w["lm_head"].nbytes + w["norm"].nbytes + kv_bytes
        res["roofline_tok_s"] = res["copy_bw_TBps"] * 1e12 / res["step_bytes"]
        if ns.gemm_chains and not any(c["layout"] == v.layout for c in res["gemm_chains"]):
            res["gemm_chains"] += gemm_chains(w, v.layout)
        r = run_variant(s, v, w, ns.repeats)
        r["pct_roofline"] = 100 * r["tok_s"] / res["roofline_tok_s"]
        res["variants"].append(r)
        print(f"{v.name}: {r['tok_s']:.1f} tok/s ({r['step_ms']:.3f} ms/step, {r['pct_roofline']:.1f}% of "
              f"{res['roofline_tok_s']:.1f}; compile {r['compile_s']:.1f} s)", flush=True)
        Path(ns.out, "probe_plain_step.json").write_text(json.dumps(res, indent=1))
    print(f"\ncopy {res['copy_bw_TBps']:.3f} TB/s, step bytes {res['step_bytes'] / 1e9:.3f} GB, "
          f"roofline {res['roofline_tok_s']:.1f} tok/s")
    print("| variant | tok/s | ms/step | % roofline |\n|---|---|---|---|")
    for r in res["variants"]:
        print(f"| {r['variant']} | {r['tok_s']:.1f} | {r['step_ms']:.3f} | {r['pct_roofline']:.1f} |")
    if res["gemm_chains"]:
        print("\n| GEMM | rows | oi us (TB/s) | io us (TB/s) |\n|---|---|---|---|")
        for c in (c for c in res["gemm_chains"] if c["layout"] == "oi"):
            cells = [f"{d['us']:.1f} ({d['TBps']:.2f})" for d in res["gemm_chains"]
                     if (d["gemm"], d["rows"]) == (c["gemm"], c["rows"])]
            print(f"| {c['gemm']} | {c['rows']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
