"""Which Triton tiling streams each batch-1 decode GEMM fastest from HBM? (XLA's own GEMM emitter)

    python3 bench/probe_gemm_configs.py --out $OUT [--shapes o_proj,qkv,down,gate_up,lm_head] [--budget-s 420]

XLA's autotuner times each candidate tiling on one weight matrix, which for q/k/v (48 MB) and o_proj
(32 MB) stays in the H200's 50 MB L2 between its timing runs, so it may pick a tiling that is fast from
L2 and slow from HBM, where a decode step reads every weight once. At batch 1 those GEMMs stream at
3.2-3.4 TB/s against lm_head's 4.25 (bench/notes_bench.md).

Per shape this times a chain of 32 layers of distinct weights (an RMSNorm fusion, then the GEMM, as in
the engine's decode program; the weights in the engine's layouts) compiled as XLA autotunes it, with
autotuning off, and with each tiling of a grid forced by the `xla_gpu_override_gemm_autotuner` compiler
option. Every tiling runs in a fresh process: XLA keeps autotuning results per fusion for the life of the
process (and in the persistent compilation cache's autotune folder, which this probe does not use), so a
second compile of the same chain reuses the first one's tiling and ignores the option; the first version
of this probe did that and measured one executable 60 times. To show that a tiling took effect, each
row records a digest of the chain's output bits and the fusion configs of the compiled program. A short
table last; JSON under --out.
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


def candidates_textproto(configs: list[str]) -> str:
    """TritonGemmConfigsProto text of `cfg_text` tilings: an `xla_gpu_gemm_autotuner_override_file`."""
    return "".join("config { " + c.replace(";", " ").replace(":", ": ") + " }\n" for c in configs)


def grid() -> list[dict[str, Any]]:
    """Tilings in the order they are tried (a run cut by its budget keeps the first ones): split-K 1 and 4
    over block_n x block_k, then split-K 2 and 8 for three tile shapes, then stages and TMA around one."""
    base = dict(block_m=16, num_stages=3, num_warps=4, num_ctas=1)
    out = [dict(base, block_n=n, block_k=k, split_k=s) for s in (1, 4) for n in (32, 64, 128)
           for k in (128, 256, 512)]
    out += [dict(base, block_n=n, block_k=k, split_k=s) for s in (2, 8) for n, k in ((32, 128), (64, 256),
                                                                                      (128, 128))]
    mid = dict(base, block_n=64, block_k=256, split_k=4)
    out += [dict(mid, num_stages=4), dict(mid, num_stages=5), dict(mid, num_warps=8),
            dict(mid, is_tma_allowed=True)]
    return out


_CHILD = r"""
import hashlib, json, re, statistics, sys, time
import jax, jax.numpy as jnp, numpy as np
from jax import lax
sys.path.insert(0, sys.argv[1] + "/bench")
from probe_gemm_configs import SHAPES
name, shapes, opts, tokens = sys.argv[2], sys.argv[3].split(","), json.loads(sys.argv[4]), int(sys.argv[5])
layers_override = int(sys.argv[6])
def chain(eq, k_dim):
    def run(x, ws):
        for w in ws:  # unrolled, distinct weights: every layer reads its weights from HBM
            xf = x.astype(jnp.float32)
            h = (xf * lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + 1e-6)).astype(x.dtype)
            y = jnp.einsum(eq, h, w).reshape(tokens, -1)
            y = y[:, :k_dim] if y.shape[1] >= k_dim else jnp.pad(y, ((0, 0), (0, k_dim - y.shape[1])))
            x = y.astype(x.dtype) + x
        return x
    return run
def timed(fn, x, ws):
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
for shape in shapes:
    wshape, eq, layers = SHAPES[shape]
    layers = layers_override or layers
    k_dim = wshape[-1]
    r = {"name": name, "shape": shape, "options": opts}
    try:
        ws = [(jax.random.normal(kw, wshape, jnp.float32) * 0.02).astype(jnp.bfloat16)
              for kw in jax.random.split(jax.random.PRNGKey(0), layers)]
        x = jax.random.normal(jax.random.PRNGKey(1), (tokens, k_dim), jnp.float32).astype(jnp.bfloat16)
        t0 = time.perf_counter()
        fn = jax.jit(chain(eq, k_dim)).lower(x, ws).compile(compiler_options=opts or None)
        r["compile_s"] = time.perf_counter() - t0
        text = fn.as_text()
        found = re.findall(r'"fusion_backend_config":(\{.*?\}\})', text)
        r["fusion_configs"] = sorted({m[:300] for m in found})
        r["out_digest"] = hashlib.sha1(np.asarray(fn(x, ws).astype(jnp.float32)).tobytes()).hexdigest()[:12]
        s = timed(fn, x, ws) / layers
        r["us"], r["TBps"] = s * 1e6, ws[0].size * 2 / s / 1e12
        del ws
    except Exception as e:
        r["error"] = repr(e)[:400]
    print("ROW " + json.dumps(r), flush=True)
"""


def best_overall(rows: list[dict[str, Any]], shapes: list[str]) -> list[str]:
    """Forced tilings timed on every shape, fastest first by the time of one decoder layer's GEMMs (lm_head
    counted once per 32 layers); their textprotos."""
    per: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.get("name", "").startswith("force ") and "us" in r:
            per.setdefault(r["name"][6:], {})[r["shape"]] = r["us"]
    weight = {s: (1 / 32 if s == "lm_head" else 1.0) for s in shapes}
    full = {c: sum(t[s] * weight[s] for s in shapes) for c, t in per.items() if set(t) == set(shapes)}
    return sorted(full, key=full.__getitem__)


def run_config(name: str, opts: dict[str, Any], shapes: list[str], tokens: int, layers: int,
               timeout: float) -> list[dict[str, Any]]:
    """One fresh process timing every shape under `opts`; rows for the shapes it reached."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'bench'}", RTP_JAX_COMPILATION_CACHE="0")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cmd = [sys.executable, "-c", _CHILD, str(ROOT), name, ",".join(shapes), json.dumps(opts), str(tokens),
           str(layers)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(timeout, 1.0))
        out, rc = proc.stdout, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
    rows = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
    if rc != 0:
        rows.append({"name": name, "error": f"child rc={rc}"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--tokens", type=int, default=4, help="rows of x (the engine's bs1 decode runs 4)")
    ap.add_argument("--budget-s", type=float, default=420.0)
    ap.add_argument("--layers", type=int, default=0, help="layers per chain (0: 32, lm_head 2; CPU smoke: 1)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = args.shapes.split(",")
    deadline = time.time() + args.budget_s
    runs: list[tuple[str, dict[str, Any]]] = [("autotuned", {}),
                                              ("autotune_off", {"xla_gpu_autotune_level": 0})]
    runs += [("force " + cfg_text(c), {"xla_gpu_override_gemm_autotuner": cfg_text(c)}) for c in grid()]
    res: dict[str, Any] = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "tokens": args.tokens,
                           "git_sha": os.environ.get("RTP_GIT_SHA", ""), "rows": []}
    for name, opts in runs:
        if time.time() > deadline - args.budget_s / 8:  # the rest for the candidates run below
            break
        rows = run_config(name, opts, shapes, args.tokens, args.layers, deadline - time.time() + 5)
        res["rows"] += rows
        for r in rows:
            print(json.dumps({k: v for k, v in r.items() if k != "fusion_configs"}), flush=True)
        (out / "probe_gemm_configs.json").write_text(json.dumps(res, indent=1))
    best = best_overall(res["rows"], shapes)[:3]
    if best and time.time() < deadline:  # the autotuner choosing per fusion among the best few tilings
        cand = out / "gemm_candidates.textproto"
        cand.write_text(candidates_textproto(best))
        opts = {"xla_gpu_gemm_autotuner_override_file": str(cand)}
        rows = run_config("candidates " + " | ".join(best), opts, shapes, args.tokens, args.layers,
                          deadline - time.time() + 5)
        res["rows"] += rows
        (out / "probe_gemm_configs.json").write_text(json.dumps(res, indent=1))
    lines = ["| shape | variant | us per layer | TB/s | output digest |", "|---|---|---|---|---|"]
    for shape in shapes:
        timed = sorted((r for r in res["rows"] if r.get("shape") == shape and "us" in r),
                       key=lambda r: r["us"])
        forced = [r for r in timed if r["name"].startswith("force")]
        for r in [r for r in timed if not r["name"].startswith("force")] + forced[:4]:
            lines.append(f"| {shape} | {r['name']} | {r['us']:.2f} | {r['TBps']:.2f} | {r['out_digest']} |")
        digests = {r["out_digest"] for r in timed}
        lines.append(f"| {shape} | ({len(timed)} timed, {len(digests)} distinct outputs) | | | |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
