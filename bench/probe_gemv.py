"""Can fused decode GEMVs (kernels_pallas/decode_gemv.py) beat XLA's GEMM + small kernels at batch 1?

    python3 bench/probe_gemv.py --out $OUT            # Llama-3-8B layer shapes on a GPU
    python3 bench/probe_gemv.py --small --interpret   # tiny shapes in the Pallas interpreter (CPU smoke run)

A batch-1 decode step on an H200 spends ~3.84 ms in GEMMs (94% of the memory roofline's time) and ~0.67 ms
in ~15 small kernels per layer around them (bench/notes_bench.md, 2026-12-01, fourth session). This probe
times, on the layer's shapes and over 4 layers' distinct weights per program (weights from HBM, not L2):
  per GEMM    XLA (the model's ops: RMSNorm, einsum, silu * up, residual add) vs `norm_gemv` with each
              tuning of a small grid (block_n, block_k, num_warps, num_stages), at 4 rows (the decode bucket)
  mlp block   o_proj + residual -> RMSNorm -> gate/up -> silu * up -> down + residual: XLA vs three
              fused kernels with the best tunings, at 1, 4 and 8 rows
Every kernel result is compared with XLA's (max abs difference) before it is timed. Prints a table last;
writes probe_gemv.json under --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from attention import timed  # noqa: E402

from kernels_pallas.decode_gemv import norm_gemv, norm_gemv_reference  # noqa: E402

LAYERS = 4
EPS = 1e-5
# name -> (N, K, gate/up pair, RMSNorm prologue, residual epilogue)
OPS_8B = {"qkv": (6144, 4096, False, True, False), "o_proj": (4096, 4096, False, False, True),
          "gate_up": (14336, 4096, True, True, False), "down": (4096, 14336, False, False, True)}
OPS_SMALL = {"qkv": (384, 256, False, True, False), "o_proj": (256, 256, False, False, True),
             "gate_up": (512, 256, True, True, False), "down": (256, 512, False, False, True)}


def tunings(quick: bool) -> list[dict[str, int]]:
    grid = itertools.product((16, 32, 64), (256, 512), (4, 8), (3, 4))
    out = [dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns) for bn, bk, nw, ns in grid]
    return out[:3] if quick else out


def make_layers(op: tuple[int, int, bool, bool, bool], rows: int, key: jax.Array) -> list[dict[str, Any]]:
    n, k, pair, _, _ = op
    sets = []
    for i in range(LAYERS):
        k1, k2, k3, k4 = jax.random.split(jax.random.fold_in(key, i), 4)
        sets.append({
            "x": jax.random.normal(k1, (rows, k), jnp.float32).astype(jnp.bfloat16),
            "w": (0.02 * jax.random.normal(k2, (2, n, k) if pair else (n, k))).astype(jnp.bfloat16),
            "norm_weight": (1 + 0.1 * jax.random.normal(k3, (k,), jnp.float32)).astype(jnp.bfloat16),
            "residual": jax.random.normal(k4, (rows, n), jnp.float32).astype(jnp.bfloat16),
        })
    return sets


def op_fn(op: tuple[int, int, bool, bool, bool], fused: dict[str, int] | None, interpret: bool) -> Any:
    _, _, _, use_norm, use_res = op

    def fn(x: jax.Array, w: jax.Array, norm_weight: jax.Array, residual: jax.Array) -> jax.Array:
        kw = dict(norm_weight=norm_weight if use_norm else None, residual=residual if use_res else None,
                  eps=EPS)
        if fused is None:
            return norm_gemv_reference(x, w, **kw)
        return norm_gemv(x, w, interpret=interpret, **fused, **kw)

    return fn


def weight_bytes(op: tuple[int, int, bool, bool, bool]) -> int:
    n, k, pair, _, _ = op
    return n * k * 2 * (2 if pair else 1)


def probe_op(name: str, op: tuple[int, int, bool, bool, bool], rows: int, quick: bool, interpret: bool,
             log: Any) -> dict[str, Any]:
    sets = [tuple(s[a] for a in ("x", "w", "norm_weight", "residual"))
            for s in make_layers(op, rows, jax.random.key(0))]
    xla_s, want = timed(op_fn(op, None, interpret), sets)
    res: dict[str, Any] = {"op": name, "rows": rows, "xla_us": xla_s * 1e6,
                           "xla_TBps": weight_bytes(op) / xla_s / 1e12, "tunings": []}
    log(f"{name} rows={rows}: XLA {xla_s * 1e6:.1f} us ({res['xla_TBps']:.2f} TB/s)")
    for cfg in tunings(quick):
        if op[0] % cfg["block_n"] or op[1] % cfg["block_k"]:
            continue
        try:
            sec, got = timed(op_fn(op, cfg, interpret), sets)
        except Exception as e:  # noqa: BLE001 - a tuning the lowering refuses is a result too
            res["tunings"].append(dict(cfg=cfg, error=f"{type(e).__name__}: {str(e)[:200]}"))
            continue
        diff = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
        res["tunings"].append(dict(cfg=cfg, us=sec * 1e6, TBps=weight_bytes(op) / sec / 1e12,
                                   max_abs_diff=diff))
        log(f"  {cfg}: {sec * 1e6:.1f} us ({weight_bytes(op) / sec / 1e12:.2f} TB/s), max|diff| {diff:.3g}")
    ok = [t for t in res["tunings"] if "us" in t and t["max_abs_diff"] < 0.1]
    res["best"] = min(ok, key=lambda t: t["us"]) if ok else None
    return res


def mlp_block(h: jax.Array, x: jax.Array, wo: jax.Array, nw: jax.Array, wgu: jax.Array, wd: jax.Array,
              best: dict[str, dict[str, int]] | None, interpret: bool) -> jax.Array:
    """x + o(h) -> x2; x2 + down(silu(gate) * up of RMSNorm(x2)): the layer after attention."""
    if best is None:
        x2 = norm_gemv_reference(h, wo, residual=x)
        return norm_gemv_reference(norm_gemv_reference(x2, wgu, norm_weight=nw, eps=EPS), wd, residual=x2)
    x2 = norm_gemv(h, wo, residual=x, interpret=interpret, **best["o_proj"])
    act = norm_gemv(x2, wgu, norm_weight=nw, eps=EPS, interpret=interpret, **best["gate_up"])
    return norm_gemv(act, wd, residual=x2, interpret=interpret, **best["down"])


def probe_block(ops: dict[str, Any], best: dict[str, dict[str, int]], rows: int, interpret: bool,
                log: Any) -> dict[str, Any]:
    d, i = ops["o_proj"][0], ops["gate_up"][0]
    sets = []
    for layer in range(LAYERS):
        ks = jax.random.split(jax.random.key(100 + layer), 6)
        bf = jnp.bfloat16
        sets.append((jax.random.normal(ks[0], (rows, d)).astype(bf),
                     jax.random.normal(ks[1], (rows, d)).astype(bf),
                     (0.02 * jax.random.normal(ks[2], (d, d))).astype(bf),
                     (1 + 0.1 * jax.random.normal(ks[3], (d,))).astype(bf),
                     (0.02 * jax.random.normal(ks[4], (2, i, d))).astype(bf),
                     (0.02 * jax.random.normal(ks[5], (d, i))).astype(bf)))
    xla_s, want = timed(lambda *a: mlp_block(*a, None, interpret), sets)
    fused_s, got = timed(lambda *a: mlp_block(*a, best, interpret), sets)
    diff = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
    out = {"rows": rows, "xla_us": xla_s * 1e6, "fused_us": fused_s * 1e6, "max_abs_diff": diff}
    log(f"mlp block rows={rows}: XLA {xla_s * 1e6:.1f} us, fused {fused_s * 1e6:.1f} us, "
        f"max|diff| {diff:.3g}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    p.add_argument("--interpret", action="store_true", help="Pallas interpreter (CPU)")
    p.add_argument("--quick", action="store_true", help="three tunings per GEMM")
    p.add_argument("--rows", default="1,4,8", help="batch rows of the mlp-block comparison")
    ns = p.parse_args()
    ops = OPS_SMALL if ns.small else OPS_8B
    report: dict[str, Any] = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "ops": [],
                              "blocks": []}
    for name, op in ops.items():
        report["ops"].append(probe_op(name, op, 4, ns.quick, ns.interpret, print))
    best = {r["op"]: r["best"]["cfg"] for r in report["ops"] if r["best"] is not None}
    if all(n in best for n in ("o_proj", "gate_up", "down")):
        for rows in map(int, ns.rows.split(",")):
            report["blocks"].append(probe_block(ops, best, rows, ns.interpret, print))
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe_gemv.json").write_text(json.dumps(report, indent=1))
    print("\n| GEMM (4 rows) | XLA us (TB/s) | best fused us (TB/s) | tuning |\n|---|---|---|---|")
    for r in report["ops"]:
        b = r["best"]
        fused = f"{b['us']:.1f} ({b['TBps']:.2f})" if b else "none valid"
        print(f"| {r['op']} | {r['xla_us']:.1f} ({r['xla_TBps']:.2f}) | {fused} | {b['cfg'] if b else ''} |")
    if report["blocks"]:
        print("\n| mlp block rows | XLA us | fused us | max abs diff |\n|---|---|---|---|")
        for b in report["blocks"]:
            print(f"| {b['rows']} | {b['xla_us']:.1f} | {b['fused_us']:.1f} | {b['max_abs_diff']:.3g} |")


if __name__ == "__main__":
    main()
