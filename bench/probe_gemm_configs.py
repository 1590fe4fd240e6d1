"""Which Triton tiling streams each batch-1 decode GEMM fastest from HBM? (XLA's own GEMM emitter)

    python3 bench/probe_gemm_configs.py --out $OUT [--shapes o_proj,qkv,down,gate_up,lm_head] [--budget-s 420]

XLA's autotuner times each candidate tiling on one weight matrix, which for q/k/v (48 MB) and o_proj
(32 MB) stays in the H200's 50 MB L2 between its timing runs, so it may pick a tiling that is fast from
L2 and slow from HBM, where a decode step reads every weight once. At batch 1 those GEMMs stream at
3.2-3.4 TB/s against lm_head's 4.25 (bench/notes_bench.md), and turning autotuning off cost nothing
(eighth session): the autotuner's picks buy nothing measurable.

Per shape this times a chain of 32 layers of distinct weights (an RMSNorm fusion, then the GEMM, as in
the engine's decode program; the weights in the engine's layouts) compiled (1) as XLA autotunes it,
(2) with autotuning off, (3) with each tiling of a grid forced by the `xla_gpu_override_gemm_autotuner`
compiler option: first a coarse grid (block_n x block_k x split_k), then variations (stages, warps, TMA)
of the best few. Each shape runs in a child process, restarted past a tiling that crashes it. Output
differences against the autotuned chain are recorded. A short table last; JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# (weight shape as the engine stores it, einsum, layers in the chain): [out..., in], contraction on `in`
SHAPES: dict[str, tuple[tuple[int, ...], str, int]] = {
    "o_proj": ((4096, 4096), "ti,oi->to", 32),
    "qkv": ((8, 6, 128, 4096), "td,kghd->tkgh", 32),
    "down": ((4096, 14336), "ti,oi->to", 32),
    "gate_up": ((2, 14336, 4096), "td,gid->tgi", 32),
    "lm_head": ((128256, 4096), "ti,oi->to", 2),
}
KEYS = ("block_m", "block_n", "block_k", "split_k", "num_stages", "num_warps", "num_ctas", "is_tma_allowed")


def cfg_text(c: dict[str, Any]) -> str:
    """AutotuneResult.TritonGemmKey textproto, ';'-separated (no spaces: usable in XLA_FLAGS too)."""
    return ";".join(f"{k}:{str(c[k]).lower()}" for k in KEYS if k in c)


def coarse_grid(k_dim: int) -> list[dict[str, Any]]:
    grid = []
    for split_k in (1, 2, 4, 8, 16):
        for block_k in (128, 256, 512):
            if k_dim % (split_k * block_k):
                continue
            for block_n in (32, 64, 128):
                grid.append(dict(block_m=16, block_n=block_n, block_k=block_k, split_k=split_k, num_stages=3,
                                 num_warps=4, num_ctas=1))
    return grid


def variations(c: dict[str, Any]) -> list[dict[str, Any]]:
    out = [dict(c, num_stages=s) for s in (2, 4, 5) if s != c["num_stages"]]
    out += [dict(c, num_warps=8), dict(c, is_tma_allowed=True), dict(c, num_stages=4, is_tma_allowed=True)]
    return out


_CHILD = r"""
import json, statistics, sys, time
import jax, jax.numpy as jnp
from jax import lax
sys.path.insert(0, sys.argv[1] + "/bench")
from probe_gemm_configs import SHAPES, coarse_grid, variations, cfg_text
shape_name, log, deadline, tokens = sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
wshape, eq, layers = SHAPES[shape_name]
done = {}
for line in open(log):
    r = json.loads(line)
    done[r["name"]] = r
def record(r):
    done[r["name"]] = r
    with open(log, "a") as f:
        f.write(json.dumps(r) + "\n")
key = jax.random.PRNGKey(0)
k_dim = wshape[-1]
ws = [(jax.random.normal(kw, wshape, jnp.float32) * 0.02).astype(jnp.bfloat16)
      for kw in jax.random.split(key, layers)]
x = jax.random.normal(jax.random.PRNGKey(1), (tokens, k_dim), jnp.float32).astype(jnp.bfloat16)
def run(x, ws):
    for w in ws:  # unrolled, distinct weights: every layer reads its weights from HBM
        h = (x.astype(jnp.float32) * lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), -1, keepdims=True)
                                               + 1e-6)).astype(x.dtype)
        y = jnp.einsum(eq, h, w).reshape(tokens, -1)
        y = y[:, :k_dim] if y.shape[1] >= k_dim else jnp.pad(y, ((0, 0), (0, k_dim - y.shape[1])))
        x = y.astype(x.dtype) + x
    return x
lowered = jax.jit(run).lower(x, ws)
def timed(fn):
    fn(x, ws).block_until_ready()
    t_end = time.perf_counter() + 0.3  # clocks ramp after a compile
    while time.perf_counter() < t_end:
        fn(x, ws).block_until_ready()
    ts = []
    for _ in range(15):
        t0 = time.perf_counter()
        for _ in range(5):
            o = fn(x, ws)
        o.block_until_ready()
        ts.append((time.perf_counter() - t0) / 5)
    return statistics.median(ts)
ref = None
def measure(name, opts, cfg=None):
    global ref
    if name in done:
        return done[name]
    with open(log + ".trying", "w") as f:
        f.write(name)
    r = {"name": name, "shape": shape_name, "cfg": cfg}
    try:
        t0 = time.perf_counter()
        fn = lowered.compile(compiler_options=opts) if opts else lowered.compile()
        r["compile_s"] = time.perf_counter() - t0
        if name == "autotuned":
            import re
            r["picked"] = sorted(set(re.findall(r'"triton_gemm_config":\{[^}]*\}', fn.as_text())))
        out = fn(x, ws).astype(jnp.float32)
        if ref is None:
            ref = out
        r["rel_diff"] = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
        s = timed(fn) / layers
        r["us"] = s * 1e6
        r["TBps"] = ws[0].size * 2 / s / 1e12
    except Exception as e:
        r["error"] = repr(e)[:400]
    record(r)
    print(json.dumps(r), flush=True)
    return r
measure("autotuned", None)
measure("autotune_off", {"xla_gpu_autotune_level": 0})
for c in coarse_grid(k_dim):
    if time.time() > deadline:
        break
    measure("force " + cfg_text(c), {"xla_gpu_override_gemm_autotuner": cfg_text(c)}, c)
ok = sorted((r for r in done.values() if r.get("cfg") and "us" in r), key=lambda r: r["us"])
for best in ok[:3]:
    for c in variations(best["cfg"]):
        if time.time() > deadline:
            break
        measure("force " + cfg_text(c), {"xla_gpu_override_gemm_autotuner": cfg_text(c)}, c)
"""


def sweep(shape: str, out: Path, deadline: float, tokens: int) -> list[dict[str, Any]]:
    """Runs the child for `shape` until it finishes; a crash marks the tiling it was trying and restarts."""
    log = out / f"gemm_configs_{shape}.jsonl"
    log.touch()
    for _ in range(6):
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(ROOT), shape, str(log), str(deadline),
                               str(tokens)], env=dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'bench'}"))
        if proc.returncode == 0 or time.time() > deadline:
            break
        trying = Path(str(log) + ".trying")
        name = trying.read_text() if trying.exists() else "?"
        with log.open("a") as f:
            died = {"name": name, "shape": shape, "error": f"child died rc={proc.returncode}"}
            f.write(json.dumps(died) + "\n")
    rows: dict[str, dict[str, Any]] = {}
    for line in log.read_text().splitlines():
        r = json.loads(line)
        rows[r["name"]] = r
    return list(rows.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", type=int, default=4, help="rows of x (the engine's bs1 decode runs 4)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="whole sweep, split over the shapes")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = args.shapes.split(",")
    start = time.time()
    res: dict[str, Any] = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "tokens": args.tokens,
                           "git_sha": os.environ.get("RTP_GIT_SHA", ""), "rows": []}
    lines = ["| shape | variant | us per layer | TB/s | rel diff |", "|---|---|---|---|---|"]
    for i, shape in enumerate(shapes):
        deadline = start + args.budget_s * (i + 1) / len(shapes)
        rows = sweep(shape, out, deadline, args.tokens)
        res["rows"] += rows
        (out / "probe_gemm_configs.json").write_text(json.dumps(res, indent=1))
        timed = sorted((r for r in rows if "us" in r), key=lambda r: r["us"])
        forced = [r for r in timed if r["name"].startswith("force")]
        keep = [r for r in timed if not r["name"].startswith("force")] + forced[:4]
        for r in keep:
            lines.append(f"| {shape} | {r['name']} | {r['us']:.2f} | {r['TBps']:.2f} | {r['rel_diff']:.1e} |")
        errs = sum("error" in r for r in rows)
        lines.append(f"| {shape} | ({len(timed)} timed, {errs} failed) | | | |")
        for r in rows:
            if r["name"] == "autotuned":
                print(shape, "autotuned picked:", r.get("picked"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
