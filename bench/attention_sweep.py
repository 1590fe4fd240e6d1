"""Focused GPU sweep of the ragged paged attention knobs (one device call; complements attention.py).

For each standard case (decode grid rows, prefill 2k/4k): check every variant against the pure-JAX
reference on the timed call's own output, time it (median of `iters` after 2 warm-ups, rotating input
copies past L2), and time JAX's built-in decode kernel / cuDNN at the same shapes in the same process.

    python bench/attention_sweep.py [--only decode,prefill] [--budget-s 380] [--out DIR]

Writes DIR/attention_sweep.json (every variant) and prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import attention as A  # noqa: E402  (bench/attention.py: cases, inputs, built-in and cuDNN callers)

T0 = time.time()


def decode_variants(base: dict[str, Any]) -> list[dict[str, Any]]:
    """The default, then one or two knobs moved (run 2 of 2026-11-25: around single_loop + row_gather)."""
    k = base["num_splits"]
    out = [base, dict(base, num_splits=2 * k), dict(base, num_splits=4 * k),
           dict(base, heads_inner=not base["heads_inner"]), dict(base, pages_per_block=4),
           dict(base, pages_per_block=4, num_stages=3), dict(base, pages_per_block=4, num_splits=2 * k),
           dict(base, num_warps=8), dict(base, num_stages=3), dict(base, single_loop=False)]
    return [v for i, v in enumerate(out) if v not in out[:i]]


def prefill_variants(base: dict[str, Any]) -> list[dict[str, Any]]:
    """The default, then tile shapes around it, then the default without heavy_first / row_gather."""
    out = [base]
    for bq, p, w, st in [(32, 8, 8, 4), (32, 16, 8, 2), (64, 4, 8, 2), (32, 4, 4, 3), (16, 8, 4, 3),
                         (32, 8, 4, 3), (16, 4, 4, 3), (32, 8, 8, 3)]:
        out.append(dict(base, block_q=bq, pages_per_block=p, num_warps=w, num_stages=st))
    out += [dict(base, heavy_first=False), dict(base, row_gather=False)]
    return [v for i, v in enumerate(out) if v not in out[:i]]


def run_case(case: A.Case, budget_s: float, prefill_grid: list[dict[str, Any]] | None = None) -> None:
    """Time every variant of `case` (prefill_grid overrides the prefill sweep) into case.results."""
    copies = int(min(8, max(1, math.ceil(4 * A.L2_BYTES / max(case.kv_bytes, 1)))))
    sets, case.meta = A.make_inputs(case, seed=len(case.name), copies=copies)
    r = case.results
    r.update(kv_bytes=case.kv_bytes, flops=case.flops, copies=copies, variants=[])
    q, k, v = sets[0]
    ref = np.asarray(jax.jit(A.reference(case))(q, k, v), np.float32)
    t = sum(case.q_lens)
    base = A.default_tuning(t, len(case.q_lens), A.H_Q // A.H_KV, max(case.kv_lens), A.H_KV)
    grid = decode_variants(base) if case.kind == "decode" else (prefill_grid or prefill_variants(base))
    for cfg in grid:
        if time.time() - T0 > budget_s:
            r["variants"].append(dict(cfg=cfg, error="skipped: time budget"))
            continue
        try:
            sec, out = A.timed(A.ours(case, **cfg), sets)
            err = A.relative_error(np.asarray(out, np.float32), ref)
        except Exception as e:  # a tuning point that does not compile is recorded, not fatal
            r["variants"].append(dict(cfg=cfg, error=f"{type(e).__name__}: {str(e)[:300]}"))
            print("  FAIL", cfg, type(e).__name__, str(e)[:200], flush=True)
            continue
        r["variants"].append(dict(cfg=cfg, seconds=sec, rel_err=err))
        print(f"  {sec*1e6:8.1f} us err {err:.1e} {short(cfg)}", flush=True)
    if case.kind == "decode":
        bsets = [(q_, k_.transpose(2, 0, 1, 3), v_.transpose(2, 0, 1, 3)) for q_, k_, v_ in sets]
        pages = -(-max(case.kv_lens) // A.BS)
        ks = 8 if case.q_lens == [1] else (1 if len(case.q_lens) >= 256 else 4)
        cfg = dict(k_splits=ks, pages_per_compute_block=min(8 if ks > 1 or pages > 16 else 16, pages // ks),
                   block_h=16)
        try:
            sec, out = A.timed(A.builtin(case, cfg), bsets)
            err = A.relative_error(np.asarray(out, np.float32), ref)
            r["jax_builtin"] = dict(cfg=cfg, seconds=sec, rel_err=err)
        except Exception as e:
            r["jax_builtin"] = dict(cfg=cfg, error=f"{type(e).__name__}: {str(e)[:300]}")
        del bsets
    elif len(case.q_lens) == 1 and case.q_lens[0] == case.kv_lens[0]:
        n = case.q_lens[0]

        def cudnn(q, k, v):
            kk = k.reshape(-1, A.H_KV, A.D)[:n][None]  # dense causal of the same shape, no paging
            return jax.nn.dot_product_attention(q[None], kk, v.reshape(-1, A.H_KV, A.D)[:n][None],
                                                is_causal=True, implementation="cudnn")

        try:
            r["cudnn_s"] = A.timed(cudnn, sets)[0]
        except Exception as e:
            r["cudnn_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    ok = [x for x in r["variants"] if "seconds" in x]
    r["default"] = r["variants"][0]
    r["best"] = min(ok, key=lambda x: x["seconds"]) if ok else None
    r["max_rel_err"] = max((x["rel_err"] for x in ok), default=float("nan"))
    del sets


def short(cfg: dict[str, Any]) -> str:
    names = dict(block_q="bq", pages_per_block="p", num_splits="k", num_warps="w", num_stages="st",
                 heads_inner="hi", single_loop="sl", row_gather="rg", heavy_first="hf")
    return " ".join(f"{a}{int(cfg[k])}" for k, a in names.items() if k in cfg)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="prefill,decode")
    ap.add_argument("--budget-s", type=float, default=380.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    args = ap.parse_args()
    kinds = args.only.split(",")
    sizes = (4096, 2048) if "prefill" in kinds else ()
    pre = [A.Case("prefill", f"prefill {n} fresh", [n], [n]) for n in sizes]
    dec = A.decode_cases(quick=True) if "decode" in kinds else []
    cases = pre[:1] + dec + pre[1:]  # the 2k prefill reuses the 4k case's three fastest configs
    for c in cases:
        print(f"== {c.name} (t={time.time()-T0:.0f}s)", flush=True)
        grid = None
        if c.name == "prefill 2048 fresh" and pre[0].results.get("variants"):
            ok = sorted((x for x in pre[0].results["variants"] if "seconds" in x), key=lambda x: x["seconds"])
            base = A.default_tuning(2048, 1, A.H_Q // A.H_KV, 2048, A.H_KV)
            grid = [base] + [x["cfg"] for x in ok[:3] if x["cfg"] != base]
        try:
            run_case(c, args.budget_s, grid)
        except Exception as e:
            c.results["error"] = f"{type(e).__name__}: {str(e)[:500]}"
            print("  CASE FAILED", c.results["error"], flush=True)
        with open(os.path.join(args.out, "attention_sweep.json"), "w") as f:
            info = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, command=" ".join(sys.argv),
                        cases=[dict(kind=c.kind, name=c.name, **c.results) for c in cases if c.results])
            json.dump(info, f, indent=1, default=str)
    print("\n| case | default us | best us | best cfg | TB/s | TFLOP/s | builtin us | cuDNN us | max err |")
    for c in cases:
        r = c.results
        if not r.get("best"):
            print(f"| {c.name} | FAILED |")
            continue
        b, d = r["best"], r["default"].get("seconds", float("nan"))
        jb = r.get("jax_builtin", {}).get("seconds")
        print(f"| {c.name} | {d*1e6:.1f} | {b['seconds']*1e6:.1f} | {short(b['cfg'])} | "
              f"{c.kv_bytes/b['seconds']/1e12:.2f} | {c.flops/b['seconds']/1e12:.0f} | "
              f"{jb*1e6 if jb else float('nan'):.1f} | {r.get('cudnn_s', float('nan'))*1e6:.1f} | "
              f"{r['max_rel_err']:.1e} |")


if __name__ == "__main__":
    main()
