"""GPU benchmark of the Pallas ragged paged attention kernel (kernels_pallas).

For each case (decode grid, mixed batches, prefill chunks): check the compiled kernel against the
pure-JAX reference, then time (median after warm-up) our kernel over a small tuning sweep, the
reference under XLA, JAX's own Pallas `paged_attention` (decode, tuned) and cuDNN flash attention
(prefill, dense causal of the same shape). Bytes and FLOPs are reported against the machine's
measured copy bandwidth and bf16 matmul rate.

    python bench/attention.py [--only decode,mixed,prefill] [--quick] [--out DIR]

Writes DIR/attention.json and DIR/attention.md (DIR defaults to $OUT or bench/results) and prints a
short table last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kernels_pallas import ragged_paged_attention, ragged_paged_attention_reference  # noqa: E402
from kernels_pallas._lowering import mosaic_gpu_available  # noqa: E402
from kernels_pallas.paged_decode_mgpu import paged_decode_attention, supports  # noqa: E402
from kernels_pallas.ragged_paged_attention import default_tuning  # noqa: E402
from kernels_pallas.testing import relative_error  # noqa: E402

H_Q, H_KV, D, BS = 32, 8, 128, 16
DTYPE = jnp.bfloat16
L2_BYTES = 50 * 2**20


@dataclass
class Case:
    """One benchmarked batch: per-sequence query and context lengths."""

    kind: str  # decode | mixed | prefill
    name: str
    q_lens: list[int]
    kv_lens: list[int]
    results: dict[str, Any] = field(default_factory=dict)
    block_size: int = BS
    table_tokens: int = 0  # block-table width in tokens (the engine's: max_model_len); 0: the longest context

    @property
    def kv_bytes(self) -> int:
        """Fewest bytes: each sequence's K and V read once (q/out are < 1% for decode)."""
        return sum(self.kv_lens) * H_KV * D * 2 * 2

    @property
    def flops(self) -> int:
        """2 matmuls x 2 flops per visible (query, key) pair per head."""
        lens = zip(self.q_lens, self.kv_lens, strict=True)
        pairs = sum(sum(kl - ql + 1 + i for i in range(ql)) for ql, kl in lens)
        return 4 * pairs * H_Q * D


def decode_cases(quick: bool) -> list[Case]:
    grid = [(64, 4096), (256, 512), (8, 32768), (64, 1024), (1, 4096)]
    if not quick:
        extra = [(s, c) for s in (1, 8, 64, 256) for c in (512, 4096, 32768)]
        grid += [g for g in extra if g not in grid]
    return [Case("decode", f"decode {s}x{c}", [1] * s, [c] * s) for s, c in grid]


def mixed_cases() -> list[Case]:
    return [
        Case("mixed", "mixed 64 dec@4k + 512 chunk@2k", [1] * 64 + [512], [4096] * 64 + [2048]),
        Case("mixed", "mixed 128 dec@1k + 4x256 chunks@1k", [1] * 128 + [256] * 4, [1024] * 132),
    ]


def prefill_cases(quick: bool) -> list[Case]:
    sizes = [512, 2048, 4096, 8192] if quick else [512, 1024, 2048, 4096, 8192]
    cases = [Case("prefill", f"prefill {n} fresh", [n], [n]) for n in sizes]
    if not quick:
        cases.append(Case("prefill", "prefill 4096 chunk@8k", [4096], [8192]))
        cases.append(Case("prefill", "prefill 4x1024 chunks@2k", [1024] * 4, [2048] * 4))
    return cases


def make_inputs(case: Case, seed: int, copies: int) -> tuple[list[tuple], tuple]:
    """`copies` independent (q, k_cache, v_cache) sets (so timing rotates past L2) + metadata."""
    rng = np.random.default_rng(seed)
    pages = [-(-kl // case.block_size) for kl in case.kv_lens]
    num_blocks = sum(pages) + 1
    perm = rng.permutation(num_blocks).astype(np.int32)
    tables = np.zeros((len(pages), max(max(pages), -(-case.table_tokens // case.block_size))), np.int32)
    off = 0
    for s, n in enumerate(pages):
        tables[s, :n] = perm[off : off + n]
        off += n
    qsl = np.concatenate([[0], np.cumsum(case.q_lens)]).astype(np.int32)
    meta = (jnp.asarray(case.kv_lens, jnp.int32), jnp.asarray(tables), jnp.asarray(qsl),
            jnp.int32(len(case.q_lens)))
    sets = []
    key = jax.random.key(seed)
    for _ in range(copies):
        key, kq, kk, kv = jax.random.split(key, 4)
        shape = (num_blocks, case.block_size, H_KV, D)
        sets.append((jax.random.normal(kq, (qsl[-1], H_Q, D), DTYPE),
                     jax.random.normal(kk, shape, DTYPE), jax.random.normal(kv, shape, DTYPE)))
    return sets, meta


def timed(fn: Callable, sets: list[tuple], iters: int = 10, warm_s: float = 0.3,
          repeat_s: float = 0.03) -> tuple[float, Any]:
    """(median seconds per call, output for sets[0]).

    One jit runs fn over every input set (launch gaps amortized). The GPU is first kept busy for `warm_s`
    (clocks ramp up after the idle gap of a compile: short bursts measured up to 3x slow), then each of
    `iters` repeats queues enough calls to last ~`repeat_s` before one sync, so launch latency and the
    host clock's resolution stay out of the per-call figure.
    """
    run = jax.jit(lambda all_sets: [fn(*s) for s in all_sets])
    out = jax.block_until_ready(run(sets))
    t0 = time.perf_counter()
    jax.block_until_ready(run(sets))
    once = time.perf_counter() - t0
    calls = 1
    while time.perf_counter() - t0 < warm_s:
        jax.block_until_ready(run(sets))
        calls += 1
    per_call = min(once, (time.perf_counter() - t0) / calls)
    n = max(1, min(1000, int(repeat_s / max(per_call, 1e-6))))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        for _ in range(n):
            res = run(sets)
        jax.block_until_ready(res)
        times.append((time.perf_counter() - t0) / n)
    return float(np.median(times)) / len(sets), out[0]


def time_calls(fn: Callable, sets: list[tuple], iters: int = 10) -> float:
    """Median seconds per call (see `timed`)."""
    return timed(fn, sets, iters)[0]


def measure_machine() -> dict[str, float]:
    """Copy bandwidth (read + write bytes) and bf16 matmul rate, measured here."""
    x = jax.random.normal(jax.random.key(0), (2**31 // 4,), jnp.float32)
    copy_s = time_calls(lambda a: a * 2, [(x,)], iters=20)  # read + write of 2 GiB, no L2 reuse
    a = jax.random.normal(jax.random.key(1), (8192, 8192), DTYPE)
    mm_s = time_calls(lambda a: a @ a, [(a,)], iters=20)
    return {"copy_bytes_per_s": 2 * x.nbytes / copy_s, "bf16_matmul_flops_per_s": 2 * 8192**3 / mm_s}


def ours(case: Case, **tuning: Any) -> Callable:
    kv_lens, tables, qsl, n = case.meta
    return lambda q, k, v: ragged_paged_attention(q, k, v, kv_lens, tables, qsl, n,
                                                  sm_scale=D**-0.5, **tuning)


def reference(case: Case) -> Callable:
    kv_lens, tables, qsl, n = case.meta
    per_token = tables.shape[1] * case.block_size * H_KV * D * 4 * 2
    chunk = max(1, min(32, 2**30 // per_token))
    return lambda q, k, v: ragged_paged_attention_reference(q, k, v, kv_lens, tables, qsl, n,
                                                            sm_scale=D**-0.5, tokens_per_chunk=chunk)


def per_head_on_head_major(case: Case, **tuning: Any) -> Callable:
    """Diagnostic: the per-head kernel on caches laid out [kv_heads, blocks, 16, D] (built-in's layout).

    Not an engine path (the cache layout is fixed); it separates the layout's cost from the kernel's.
    """
    from kernels_pallas._paged_common import merge_splits, sanitize_block_tables, tile_metadata
    from kernels_pallas.ragged_paged_attention import _per_head_attention

    kv_lens, tables, qsl, n = case.meta
    cfg = {k: v for k, v in tuning.items() if k != "fuse_heads"}

    def fn(q, k, v):  # k, v: [kv_heads, blocks, 16, D]
        t, bq = q.shape[0], cfg["block_q"]
        meta = tile_metadata(t, bq, kv_lens, qsl, n)
        tbl = sanitize_block_tables(tables, kv_lens, BS, cfg["pages_per_block"])
        q4 = q.reshape(t, H_KV, H_Q // H_KV, D)
        o, lse = _per_head_attention(meta, tbl, q4, k, v, sm_scale=D**-0.5, sliding_window=None,
                                     soft_cap=None, interpret=False, lowering="triton", kv_head_major=True,
                                     **cfg)
        return (o if lse is None else merge_splits(o, lse)).reshape(t, H_Q, D).astype(q.dtype)

    return fn


def tuning_sweep(case: Case, quick: bool) -> list[dict[str, Any]]:
    """Default tuning first, then variants around it (a handful with --quick, a grid without)."""
    t = sum(case.q_lens)
    base = default_tuning(t, len(case.q_lens), H_Q // H_KV, max(case.kv_lens), H_KV)
    if quick:
        old = dict(single_loop=False, row_gather=False, heavy_first=False)  # knobs before 2026-11-25
        if case.kind == "decode":
            legacy = per_head_decode_tuning(len(case.q_lens), max(case.kv_lens))
            grid = [dict(legacy, heads_inner=len(case.q_lens) >= 8, num_splits=base["num_splits"]),
                    dict(base, num_warps=8), dict(base, num_splits=2 * base["num_splits"])]
        elif case.kind == "mixed":
            grid = [dict(base, row_gather=True, heavy_first=True, num_stages=3), dict(base, row_gather=True)]
        else:
            grid = [dict(base, **old, block_q=16, pages_per_block=4, num_warps=4, num_stages=2)]
    elif case.kind == "decode":
        ctx_blocks = max(case.kv_lens) // (BS * 8)
        grid = [dict(base, num_splits=k, pages_per_block=p, num_warps=w, num_stages=st)
                for k, p, w, st in itertools.product((1, 2, 4, 8, 16), (8, 16), (4, 8), (2, 3))
                if k <= max(1, ctx_blocks) and H_KV * len(case.q_lens) * k <= 8192]
    elif case.kind == "mixed":
        grid = [dict(base, block_q=bq, num_splits=1, pages_per_block=p, num_warps=w, num_stages=st)
                for bq, p, w, st in itertools.product((4, 16, 32), (4, 8), (4, 8), (2, 3))]
    else:
        grid = [dict(base, block_q=bq, pages_per_block=p, num_warps=w, num_stages=st)
                for bq, p, w, st in itertools.product((16, 32), (4, 8), (4, 8), (2, 3))]
    return [base] + [g for i, g in enumerate(grid) if g != base and g not in grid[:i]]


def per_head_decode_tuning(num_seqs: int, max_context: int) -> dict[str, Any]:
    """The decode default before 2026-11-24 (split >= 1, head-outer grid), for comparison."""
    splits = int(min(max(1, max_context // 128), max(1, 264 // (H_KV * num_seqs)), 16))
    return dict(fuse_heads=False, block_q=16 // (H_Q // H_KV), pages_per_block=8, num_splits=splits,
                num_warps=4, num_stages=2, heads_inner=False, single_loop=False, row_gather=False,
                heavy_first=False)


def fused_heads_tuning(num_seqs: int, max_context: int) -> dict[str, Any]:
    """Opt-in fused-heads kernel with the split count that did best on H100 (~4-8 programs per SM)."""
    splits = int(min(max(1, max_context // 32), -(-8 * 132 // num_seqs), 256))
    return dict(fuse_heads=True, block_q=1, pages_per_block=1, num_splits=splits, num_warps=4,
                num_stages=2, heads_inner=False, single_loop=False, row_gather=False, heavy_first=False)


def builtin_variants(case: Case, quick: bool) -> list[dict[str, int]]:
    """JAX built-in configs: the full grid, or with --quick the ones that won before (results json)."""
    pages = -(-max(case.kv_lens) // BS)
    out = []
    grid = ((1, 8), (4, 8), (8, 16)) if quick else itertools.product((1, 2, 4, 8, 16), (4, 8, 16))
    for k, p in grid:
        if pages % k == 0 and (pages // k) % min(p, pages // k) == 0:
            out.append(dict(k_splits=k, pages_per_compute_block=p, block_h=16))
    return out


def builtin(case: Case, cfg: dict[str, int]) -> Callable:
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    kv_lens, tables, _, _ = case.meta

    def fn(q, k, v):  # JAX's layout is [kv_heads, pages, page_size, head_dim]
        return paged_attention(q * D**-0.5, k, v, tables, kv_lens, **cfg)

    return fn


def run_case(case: Case, machine: dict[str, float], quick: bool) -> None:
    copies = int(min(8, max(1, math.ceil(4 * L2_BYTES / max(case.kv_bytes, 1)))))
    sets, case.meta = make_inputs(case, seed=len(case.name), copies=copies)
    r = case.results
    r.update(kv_bytes=case.kv_bytes, flops=case.flops, copies=copies)
    q, k, v = sets[0]
    ref = np.asarray(jax.jit(reference(case))(q, k, v), np.float32)
    best = None
    r["variants"] = []
    for cfg in tuning_sweep(case, quick):
        try:
            out = np.asarray(jax.jit(ours(case, **cfg))(q, k, v), np.float32)
            err = relative_error(out, ref)
            sec = time_calls(ours(case, **cfg), sets)
        except Exception as e:  # a tuning point that does not compile is recorded, not fatal
            r["variants"].append(dict(cfg=cfg, error=f"{type(e).__name__}: {str(e)[:300]}"))
            continue
        r["variants"].append(dict(cfg=cfg, seconds=sec, rel_err=err))
        if best is None or sec < best["seconds"]:
            best = dict(cfg=cfg, seconds=sec, rel_err=err)
    r["default"] = r["variants"][0]
    r["best"] = best
    r["max_rel_err"] = max((v.get("rel_err", 0.0) for v in r["variants"]), default=float("nan"))
    r["reference_xla_s"] = time_calls(reference(case), sets[:1], iters=3)
    if case.kind == "decode":
        bsets = [(q[:, :, :], k.transpose(2, 0, 1, 3), v.transpose(2, 0, 1, 3)) for q, k, v in sets]
        bbest = None
        for cfg in builtin_variants(case, quick):
            try:
                sec = time_calls(builtin(case, cfg), bsets)
            except Exception as e:
                print("builtin failed", cfg, type(e).__name__, str(e)[:200])
                continue
            if bbest is None or sec < bbest["seconds"]:
                bbest = dict(cfg=cfg, seconds=sec)
        if bbest:
            out = np.asarray(jax.jit(builtin(case, bbest["cfg"]))(*bsets[0]), np.float32)
            bbest["rel_err"] = relative_error(out, ref)
        r["jax_builtin"] = bbest
        r["mosaic_decode"] = mosaic_decode_row(case, sets, ref)
        if quick and os.environ.get("LAYOUT_DIAGNOSTIC"):  # per-head kernel on the head-major layout
            cfg = dict(per_head_decode_tuning(len(case.q_lens), max(case.kv_lens)))
            cfg["num_splits"] *= 2
            try:
                out = np.asarray(jax.jit(per_head_on_head_major(case, **cfg))(*bsets[0]), np.float32)
                sec = time_calls(per_head_on_head_major(case, **cfg), bsets)
                r["per_head_head_major"] = dict(cfg=cfg, seconds=sec, rel_err=relative_error(out, ref))
            except Exception as e:
                r["per_head_head_major"] = dict(cfg=cfg, error=f"{type(e).__name__}: {str(e)[:300]}")
        del bsets
    if case.kind == "prefill" and len(case.q_lens) == 1 and case.q_lens[0] == case.kv_lens[0]:
        n = case.q_lens[0]

        def cudnn(q, k, v):
            kk = k.reshape(-1, H_KV, D)[:n][None]  # dense causal of the same shape, no paging
            return jax.nn.dot_product_attention(q[None], kk, v.reshape(-1, H_KV, D)[:n][None],
                                                is_causal=True, implementation="cudnn")

        try:
            r["cudnn_s"] = time_calls(cudnn, sets)
        except Exception as e:
            r["cudnn_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    for key in ("best",):
        if r.get(key):
            sec = r[key]["seconds"]
            r["tb_s"] = case.kv_bytes / sec / 1e12
            r["tflop_s"] = case.flops / sec / 1e12
    del sets


def mosaic_decode_row(case: Case, sets: list[tuple], ref: np.ndarray) -> dict[str, Any] | None:
    """The Mosaic GPU decode kernel at its default tuning (the engine's decode path on Hopper)."""
    q, k, _ = sets[0]
    if not (mosaic_gpu_available() and supports(q, k)):
        return None
    kv_lens, tables, _, _ = case.meta

    def fn(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return paged_decode_attention(q, k, v, kv_lens, tables, sm_scale=D**-0.5)

    try:
        sec, out = timed(fn, sets)
    except Exception as e:
        return dict(error=f"{type(e).__name__}: {str(e)[:300]}")
    return dict(seconds=sec, rel_err=relative_error(np.asarray(out, np.float32), ref))


def _per_head_best(r: dict[str, Any]) -> float | None:
    """Fastest timed variant of the per-head kernel (fuse_heads=False), seconds."""
    secs = [v["seconds"] for v in r.get("variants", []) if "seconds" in v and not v["cfg"].get("fuse_heads")]
    return min(secs, default=None)


def summary_rows(cases: list[Case], machine: dict[str, float]) -> list[str]:
    bw, fl = machine["copy_bytes_per_s"], machine["bf16_matmul_flops_per_s"]
    head = ("| case | ours default us | ours best us | best cfg | KV TB/s | %copy | TFLOP/s | %mm | "
            "per-head kernel best us | ref XLA us | JAX builtin us (TB/s) | cuDNN us (TFLOP/s) | "
            "Mosaic decode us (TB/s, %copy) | rel err |")
    rows = [head, "|" + "---|" * 14]
    for c in cases:
        r = c.results
        if not r.get("best"):
            rows.append(f"| {c.name} | FAILED | | | | | | | | | | | | |")
            continue
        b = r["best"]
        cfg = ",".join(f"{k[:6]}={int(v)}" for k, v in b["cfg"].items() if k != "lowering")
        jb = r.get("jax_builtin")
        jbs = f"{jb['seconds']*1e6:.1f} ({c.kv_bytes/jb['seconds']/1e12:.2f})" if jb else "-"
        cd = r.get("cudnn_s")
        cds = f"{cd*1e6:.1f} ({c.flops/cd/1e12:.0f})" if cd else "-"
        mg = r.get("mosaic_decode") or {}
        mgs = (f"{mg['seconds']*1e6:.1f} ({c.kv_bytes/mg['seconds']/1e12:.2f}, "
               f"{100*c.kv_bytes/mg['seconds']/bw:.0f}%)" if "seconds" in mg else mg.get("error", "-")[:40])
        err = max([r["max_rel_err"]] + ([mg["rel_err"]] if "rel_err" in mg else []))
        dflt = r["default"].get("seconds")
        ph = _per_head_best(r)
        phs = f"{ph*1e6:.1f} ({c.kv_bytes/ph/1e12:.2f})" if ph else "-"
        rows.append(
            f"| {c.name} | {dflt*1e6 if dflt else float('nan'):.1f} | {b['seconds']*1e6:.1f} | {cfg} | "
            f"{c.kv_bytes/b['seconds']/1e12:.2f} | {100*c.kv_bytes/b['seconds']/bw:.0f} | "
            f"{c.flops/b['seconds']/1e12:.1f} | "
            f"{100*c.flops/b['seconds']/fl:.0f} | {phs} | "
            f"{r.get('reference_xla_s', float('nan'))*1e6:.0f} | {jbs} | {cds} | {mgs} | {err:.1e} |"
        )
    return rows


def git_sha() -> str:
    if os.environ.get("GIT_SHA"):  # the device machine gets the tree without .git
        return os.environ["GIT_SHA"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="decode,mixed,prefill")
    ap.add_argument("--quick", action="store_true")
    default_out = os.environ.get("OUT", os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--out", default=default_out)
    args = ap.parse_args()
    kinds = args.only.split(",")
    machine = measure_machine()
    print(f"copy {machine['copy_bytes_per_s']/1e12:.2f} TB/s, "
          f"bf16 mm {machine['bf16_matmul_flops_per_s']/1e12:.0f} TFLOP/s", flush=True)
    cases = (decode_cases(args.quick) if "decode" in kinds else []) + (
        mixed_cases() if "mixed" in kinds else []) + (prefill_cases(args.quick) if "prefill" in kinds else [])
    for c in cases:
        t0 = time.time()
        try:
            run_case(c, machine, args.quick)
        except Exception as e:
            c.results["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        brief = {k: v for k, v in c.results.items() if k != "variants"}
        print(f"{c.name}: {time.time()-t0:.0f}s {json.dumps(brief, default=str)[:600]}", flush=True)
        write_outputs(args.out, cases, machine)  # after every case: a timeout keeps what was measured
    print("\n".join(summary_rows(cases, machine)))


def write_outputs(out_dir: str, cases: list[Case], machine: dict[str, float]) -> None:
    """DIR/attention.json (every variant) and DIR/attention.md (summary table) for the cases so far."""
    info = dict(
        device=str(jax.devices()[0].device_kind), jax=jax.__version__, python=platform.python_version(),
        git_sha=git_sha(), command=" ".join(sys.argv), machine=machine,
        shape=dict(num_q_heads=H_Q, num_kv_heads=H_KV, head_dim=D, block_size=BS, dtype="bfloat16"),
        cases=[dict(kind=c.kind, name=c.name, **c.results) for c in cases if c.results],
    )
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "attention.json"), "w") as f:
        json.dump(info, f, indent=1, default=str)
    head = (f"# Ragged paged attention on {info['device']}\n\njax {info['jax']}, python {info['python']}, "
            f"git {info['git_sha']}\n\ncommand: `{info['command']}`\n\nroofline: copy "
            f"{machine['copy_bytes_per_s']/1e12:.2f} TB/s (read+write), bf16 matmul "
            f"{machine['bf16_matmul_flops_per_s']/1e12:.0f} TFLOP/s; bf16, {H_Q} q heads, {H_KV} KV heads, "
            f"head_dim {D}, block {BS}\n\n")
    with open(os.path.join(out_dir, "attention.md"), "w") as f:
        f.write(head + "\n".join(summary_rows([c for c in cases if c.results], machine)) + "\n")


if __name__ == "__main__":
    main()
