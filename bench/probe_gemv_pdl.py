"""Does a decode GEMM that prefetches its weights before waiting on the previous kernel beat XLA's?

    python3 bench/probe_gemv_pdl.py --out $OUT        # GPU (jax >= 0.11, Hopper)
    XLA_FLAGS=--xla_gpu_enable_pdl_launch=true python3 bench/probe_gemv_pdl.py --out $OUT --tag pdl_launch \
        --modes pdl,pdl_early

At batch 1 the engine's small GEMMs (q/k/v 50 MB, o_proj 33.5 MB per layer) stream at 3.3-3.6 TB/s
against 4.2 for lm_head: each waits for its input before it reads a byte of weight, then ramps up
(bench/notes_bench.md). Pallas Mosaic GPU kernels that call `plgpu.griddepcontrol_wait` are launched with
programmatic dependent launch (`mosaic_gpu.uses_pdl`), so such a kernel can issue its first weight copies
(which depend on nothing) before it waits for the previous kernel, and overlap its ramp with that
kernel's tail. `gemv` below: out[T, N] = x[T, K] @ w[N, K]^T for T <= 8 rows, one CTA per 64 output
columns (and per K split), weights [64, tile_k] and x [8, tile_k] copied by TMA into `stages` slots, one
wgmma [64, tile_k] x [tile_k, 8] per tile (the weights are wgmma's A operand, so 64 columns fill its M).

The probe checks it against `x @ w.T` and times, per shape (o_proj, q/k/v, down, gate/up at T=4), a
chain of 32 layers of distinct weights where each GEMM follows a small XLA fusion on its input (as in the
engine): XLA's dot, and this kernel over a few tilings without PDL, with PDL, and with PDL plus an early
`launch_dependents`; medians of the chain's time, a short table last, JSON under --out. The prefetch can
only overlap the previous kernel's work if that kernel lets its dependents launch early: XLA's own
kernels do so with `--xla_gpu_enable_pdl_launch=true` (second command). The engine-level A/B is
`bench/probe_decode_variants.py --variants base,gemv_pdl` (bench/probe_patches.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

T_PAD = 8  # wgmma's N: the token rows, padded


@functools.partial(jax.jit, static_argnames=("tile_n", "tile_k", "stages", "splits", "pdl", "early_launch",
                                             "ctas", "interpret"))
def gemv(x: jax.Array, w: jax.Array, *, tile_n: int = 64, tile_k: int = 256, stages: int = 4,
         splits: int = 1, pdl: bool = False, early_launch: bool = False, ctas: int = 0,
         interpret: bool = False) -> jax.Array:
    """x: [T, K] (T <= 8), w: [N, K] -> [T, N] float32 (bf16 operands, f32 accumulation).

    Work items: (K split, 64-column tile), N / tile_n * splits of them. ctas: 0 gives each item its own
    CTA; a positive count makes the kernel persistent: CTA c takes items c, c + ctas, ... and its copies
    run on across item boundaries, so no CTA idles in a last partial wave and no pipeline drains and
    refills between items (gate/up has 448 column tiles: 1.7 waves at two CTAs per SM).
    pdl: the first weight copies are issued before `griddepcontrol.wait` (x is the previous kernel's
    output; the weights are no kernel's). early_launch: `griddepcontrol.launch_dependents` right after
    that wait, so the next kernel can be launched (and prefetch its own weights) while this one streams;
    without it the next kernel launches only as this one's CTAs exit."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    t, k = x.shape
    n = w.shape[0]
    if t > T_PAD or n % tile_n or k % (splits * tile_k):
        raise ValueError(f"gemv: T={t} (<= {T_PAD}), N={n} (multiple of {tile_n}), K={k} (multiple of "
                         f"{splits * tile_k}) expected")
    xp = jnp.pad(x, ((0, T_PAD - t), (0, 0)))
    k_per = k // splits
    steps = k_per // tile_k  # per item
    col_tiles = n // tile_n
    items = col_tiles * splits
    grid = min(ctas, items) if ctas > 0 else items

    def kernel(x_ref: Any, w_ref: Any, o_ref: Any, w_smem: Any, x_smem: Any, o_smem: Any, w_full: Any,
               x_full: Any) -> None:
        cta = lax.axis_index("c")
        total = ((items - cta + grid - 1) // grid) * steps  # this CTA's tiles over all its items

        def where(g: Any) -> tuple[Any, Any, Any]:
            """(column tile, split, K step) of this CTA's g-th tile."""
            item = cta + (g // steps) * grid
            return item % col_tiles, item // col_tiles, g % steps

        def load_w(g: Any, slot: Any) -> None:
            col, split, i = where(g)
            src = w_ref.at[pl.ds(col * tile_n, tile_n), pl.ds(split * k_per + i * tile_k, tile_k)]
            plgpu.copy_gmem_to_smem(src, w_smem.at[slot], w_full.at[slot])

        def load_x(g: Any, slot: Any) -> None:
            _, split, i = where(g)
            plgpu.copy_gmem_to_smem(x_ref.at[:, pl.ds(split * k_per + i * tile_k, tile_k)], x_smem.at[slot],
                                    x_full.at[slot])

        for s in range(stages):  # the weights depend on no earlier kernel: ask for them first
            pl.when(s < total)(functools.partial(load_w, jnp.int32(s), s))
        if pdl and not interpret:  # (the interpreter has no rule for it; it only orders launches)
            plgpu.griddepcontrol_wait()  # x is the previous kernel's output
            if early_launch:
                plgpu.griddepcontrol_launch_dependents()
        for s in range(stages):
            pl.when(s < total)(functools.partial(load_x, jnp.int32(s), s))
        acc0 = plgpu.layout_cast(jnp.zeros((tile_n, T_PAD), jnp.float32), plgpu.Layout.WGMMA)

        def step(g: Any, acc: Any) -> Any:
            slot = lax.rem(g, stages)
            plgpu.barrier_wait(w_full.at[slot])
            plgpu.barrier_wait(x_full.at[slot])

            def scope(acc_ref: Any) -> Any:
                plgpu.wgmma(acc_ref, w_smem.at[slot], x_smem.at[slot].transpose((1, 0)))
                return acc_ref[...]

            acc = acc + pl.run_scoped(scope, plgpu.ACC((tile_n, T_PAD), jnp.float32))

            @pl.when(g + stages < total)
            def _refill() -> None:
                load_w(g + stages, slot)
                load_x(g + stages, slot)

            col, split, i = where(g)
            last = i == steps - 1

            @pl.when(last)
            def _store() -> None:
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous item's store has read it
                o_smem[...] = acc
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem, o_ref.at[split, pl.ds(col * tile_n, tile_n)])

            return acc * jnp.where(last, 0.0, 1.0).astype(jnp.float32)

        lax.fori_loop(0, total, step, acc0)
        plgpu.wait_smem_to_gmem(0)

    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    call = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((splits, n, T_PAD), jnp.float32),
        scratch_types=[
            plgpu.SMEM((stages, tile_n, tile_k), w.dtype, transforms=tiled),
            plgpu.SMEM((stages, T_PAD, tile_k), x.dtype, transforms=tiled),
            plgpu.SMEM((tile_n, T_PAD), jnp.float32),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
        ],
        grid=(grid,), grid_names=("c",),
        **({"interpret": plgpu.InterpretGPUParams()} if interpret else {}),
    )
    out = call(xp, w)
    return out.sum(axis=0).T[:t]


SHAPES = {"o_proj": (4096, 4096), "qkv": (6144, 4096), "down": (4096, 14336), "gate_up": (28672, 4096)}
Tiling = tuple[int, int, int, int, int]
# (tile_n, tile_k, stages, splits, per_sm): 64 columns per CTA; 3 stages of [64, 256] bf16 (96 KiB) leave
# room for two CTAs per SM, 4-6 for one; splits bring o_proj's and down_proj's 64 column tiles up to ~1-2
# CTAs per SM; per_sm > 0: persistent, per_sm CTAs per SM walking all the work items.
TILINGS: tuple[Tiling, ...] = ((64, 256, 4, 1, 0), (64, 256, 3, 2, 0), (64, 256, 4, 2, 0), (64, 128, 6, 2, 0),
                               (64, 256, 6, 4, 0), (64, 256, 4, 2, 1), (64, 256, 3, 2, 2))
# (pdl, early_launch) per tiling
MODES = ((False, False), (True, False), (True, True))
MODE_NAMES = {(False, False): "nopdl", (True, False): "pdl", (True, True): "pdl_early"}


def tiling_kwargs(tiling: Tiling) -> dict[str, int]:
    """`gemv`'s keyword arguments for a tiling on this machine's GPU (its SM count for persistent ones)."""
    tn, tk, st, sp, per_sm = tiling
    sms = int(getattr(jax.devices()[0], "core_count", 0) or 132)
    return dict(tile_n=tn, tile_k=tk, stages=st, splits=sp, ctas=per_sm * sms)


@functools.cache
def exported(tiling: Tiling, pdl: bool, x_shape: tuple[int, int], w_shape: tuple[int, int],
             platform: str = "cuda", early_launch: bool = False) -> Any:
    """`gemv` lowered once (a `jax.export.Exported`), so a 32-layer program does not lower it 32 times
    (~0.5 s each), as kernels_pallas/paged_decode_mgpu.py does for the decode kernel."""
    from jax import export

    fn = jax.jit(functools.partial(gemv, pdl=pdl, early_launch=early_launch, **tiling_kwargs(tiling)))
    avals = (jax.ShapeDtypeStruct(x_shape, jnp.bfloat16), jax.ShapeDtypeStruct(w_shape, jnp.bfloat16))
    return export.export(fn, platforms=(platform,))(*avals)


def chain(tiling: Tiling | None, pdl: bool, early_launch: bool) -> Any:
    """Layers of distinct weights: a small fusion on x (as the RMSNorm before each GEMM), then
    y = x @ w_l.T, fed forward as x + y (y cut or zero-padded to x's width)."""

    def layer(x: jax.Array, w: jax.Array) -> jax.Array:
        h = (x.astype(jnp.float32) * lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), -1,
                                                          keepdims=True) + 1e-6)).astype(x.dtype)
        if tiling is None:
            y = jnp.dot(h, w.T, preferred_element_type=jnp.float32)
        else:
            y = exported(tiling, pdl, tuple(h.shape), tuple(w.shape), early_launch=early_launch).call(h, w)
        k = x.shape[1]
        y = y[:, :k] if y.shape[1] >= k else jnp.pad(y, ((0, 0), (0, k - y.shape[1])))
        return y.astype(x.dtype) + x

    @jax.jit
    def run(x: jax.Array, ws: list[jax.Array]) -> jax.Array:
        for w in ws:  # unrolled, as the engine's decode step; separate arrays, as the engine's layers
            x = layer(x, w)
        return x

    return run


def timed(fn: Any, *args: Any, reps: int = 20) -> float:
    fn(*args).block_until_ready()
    t_end = time.perf_counter() + 0.3
    while time.perf_counter() < t_end:
        fn(*args).block_until_ready()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(5):
            out = fn(*args)
        out.block_until_ready()
        ts.append((time.perf_counter() - t0) / 5)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--tag", default="", help="suffix of the JSON file (e.g. the XLA_FLAGS of this run)")
    ap.add_argument("--tokens", type=int, default=4)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--modes", default="nopdl,pdl,pdl_early", help="kernel modes to time (comma-separated)")
    ap.add_argument("--tilings", default=None, help="indices into TILINGS to time (comma-separated; all)")
    args = ap.parse_args()
    tilings = TILINGS if args.tilings is None else tuple(TILINGS[int(i)] for i in args.tilings.split(","))
    out = Path(args.out) if args.out else None
    json_name = f"probe_gemv_pdl{'_' + args.tag if args.tag else ''}.json"
    key = jax.random.PRNGKey(0)
    res: dict[str, Any] = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "tag": args.tag,
                           "sms": getattr(jax.devices()[0], "core_count", None),
                           "xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": []}
    lines = ["| shape | variant | us per layer | TB/s of weights |", "|---|---|---|---|"]
    for kind in args.shapes.split(","):
        n, k = SHAPES[kind]
        kx, key = jax.random.split(key)
        ws = [(jax.random.normal(kw, (n, k), jnp.float32) * 0.02).astype(jnp.bfloat16)
              for kw in jax.random.split(key, args.layers)]
        x = jax.random.normal(kx, (args.tokens, k), jnp.float32).astype(jnp.bfloat16)
        ref = jnp.dot(x, ws[0].T, preferred_element_type=jnp.float32)
        variants: list[tuple[str, Any, bool, bool]] = [("xla", None, False, False)]
        variants += [(f"gemv{t}{'_pdl' if p else ''}{'_early' if e else ''}", t, p, e)
                     for t in tilings for p, e in MODES if MODE_NAMES[(p, e)] in args.modes.split(",")]
        for name, tiling, pdl, early in variants:
            row: dict[str, Any] = {"shape": kind, "variant": name}
            try:
                if tiling is not None:
                    got = gemv(x, ws[0], pdl=pdl, early_launch=early, **tiling_kwargs(tiling))
                    row["max_rel_err"] = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
                s = timed(chain(tiling, pdl, early), x, ws) / args.layers
                row["us"] = s * 1e6
                row["TBps"] = n * k * 2 / s / 1e12
                lines.append(f"| {kind} | {name} | {row['us']:.1f} | {row['TBps']:.2f} |")
            except Exception as e:  # noqa: BLE001 - record and go on with the other variants
                row["error"] = repr(e)[:500]
                lines.append(f"| {kind} | {name} | error | {type(e).__name__} |")
            res["rows"].append(row)
            print(row, flush=True)
        del ws
        if out:  # after each shape: a run cut by its time limit keeps what it measured
            out.mkdir(parents=True, exist_ok=True)
            (out / json_name).write_text(json.dumps(res, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
