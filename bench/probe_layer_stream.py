"""Can one persistent kernel stream a decode layer's weights at the copy rate, with a grid-wide barrier
between the dependent GEMMs? The route left for batch-1 decode >= 90% of the roofline (notes_bench.md,
16th and 17th sessions) is a decode layer as one or two persistent kernels; this probe measures its
ceiling before any math is written.

    python3 bench/probe_layer_stream.py --out $OUT [--layers 8] [--parts stream,chain]  # GPU (jax >= 0.11)

`stream`: G CTAs (one per SM), two warpgroups each. The memory warpgroup streams the CTA's weight tiles of
every phase by TMA through `stages` shared-memory slots; the consumer warpgroup waits for each slot and
frees it (memory only: no math). Phases are a Llama-3-8B decode layer's GEMMs in order (q/k/v [6144, 4096],
o [4096, 4096], gate/up [28672, 4096], down [4096, 14336]) for `--layers` layers; tile i of a phase goes to
CTA i % G. With `barrier`, after its last tile of each phase every CTA's consumer meets the others at a
grid barrier (GMEM semaphores) and then reads an x tile from global memory (the next GEMM's input), as a
layer kernel must; meanwhile the memory warpgroup keeps filling free slots with the next phase's weights,
which depend on nothing. With `math`, the consumer also runs each tile through the tensor cores (wgmma of
the [tile_n, tile_k] weight tile against a fixed x tile, accumulated per CTA and checked against XLA), the
GEMV's work on every streamed byte without its data flow. The figure to read: barrier vs no barrier vs
the copy rate, with and without the math. If the barrier
variant streams near the no-barrier one and near the copy rate (4.1 TB/s on the H200), a persistent
layer can hide its dependencies and the math is worth writing; if not, the route is closed.

Then `gemv_chain` (bench/layer_chain_mgpu.py): the same phases with their data flow, y_p = x_p @ W_p.T
and x_{p+1} = y_p's first K columns, each CTA a contiguous share of the phase's [64, tile_k] W tiles
(split-K partial sums added by TMA reduce-add), a grid barrier after each phase; checked against XLA's
chain of the same dots and timed beside it. First GPU results: results/probe_layer_stream_5d973f3.md.

Baselines in the same process: the copy rate (fp32 x + 1, as run_all), XLA reading each weight once
(a column sum), and XLA's chain of the same GEMMs at T = 4 with a small fusion between them (the engine's
pattern). Each `stream` variant is checked for its tile count per CTA before it is timed. Prints a table
last; writes probe_layer_stream_<parts>.json under --out. On the CPU (jax >= 0.11), `--interpret` runs the
no-barrier kernels on small shapes in the Mosaic GPU interpreter, and the chain with one CTA (the grid
barrier's global semaphores are compiled-only).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from attention import timed as timed_sets  # noqa: E402
from layer_chain_mgpu import (  # noqa: E402
    T_PAD,
    barrier_exit,
    barrier_semaphores,
    gemv_chain,
    gemv_chain_reference,
    grid_barrier,
    stream_weights,
)

# (name, N, K) of one Llama-3-8B decode layer's GEMMs, in the order a layer runs them
LAYER = (("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336))


def phase_tiles(n: int, k: int, tile_n: int, tile_k: int) -> int:
    return (n // tile_n) * (k // tile_k)


def tiles_per_cta(total: int, cta: Any, ctas: int) -> Any:
    """How many of a phase's `total` tiles CTA `cta` streams (tile i goes to CTA i % ctas)."""
    return (total - cta + ctas - 1) // ctas


@functools.partial(jax.jit, static_argnames=("ctas", "tile_n", "tile_k", "stages", "barrier", "math",
                                             "interpret"))
def stream(ws: tuple[jax.Array, ...], x: jax.Array, *, ctas: int, tile_n: int = 64, tile_k: int = 256,
           stages: int = 4, barrier: bool = True, math: bool = False,
           interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """ws: per GEMM of the layer, its weights stacked over layers [L, N, K] (bf16); x: [T_PAD, >= tile_k].
    Returns (float32 [ctas, 128]: column 0 holds the tiles each CTA's consumer released, float32
    [ctas, tile_n, T_PAD]: with `math`, the sum over the CTA's tiles of tile @ x[:, :tile_k].T by wgmma, the
    GEMV's tensor-core work on every streamed byte without its data flow; zeros without)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    layers = ws[0].shape[0]
    shapes = [(w.shape[1], w.shape[2]) for w in ws]
    totals = [phase_tiles(n, k, tile_n, tile_k) for n, k in shapes]

    def kernel(*refs: Any) -> None:
        w_refs = refs[:len(ws)]
        x_ref, o_ref, acc_ref, w_smem, x_smem, o_smem, acc_smem, full, free, x_bar = refs[len(ws):]
        cta = lax.axis_index("c")
        counts = [tiles_per_cta(t, cta, ctas) for t in totals]

        def tile_src(m: int, layer: Any, j: Any) -> Any:
            """The weight tile of GEMM m that is this CTA's j-th in its phase."""
            i = cta + j * ctas
            cols = shapes[m][1] // tile_k
            row, col = i // cols, lax.rem(i, cols)
            return w_refs[m].at[layer, pl.ds(row * tile_n, tile_n), pl.ds(col * tile_k, tile_k)]

        pl.when(lax.axis_index("wg") == 1)(functools.partial(
            stream_weights, layers, len(ws), lambda m: counts[m], tile_src, lambda m, slot: w_smem.at[slot],
            full, free, stages))

        @pl.when(lax.axis_index("wg") == 0)
        def _consume() -> None:
            if barrier:
                sems = barrier_semaphores()

            def load_x() -> None:
                plgpu.copy_gmem_to_smem(x_ref.at[:, pl.ds(0, tile_k)], x_smem, x_bar)
                plgpu.barrier_wait(x_bar)

            def one_layer(layer: Any, carry: tuple[Any, Any]) -> tuple[Any, Any]:
                for m in range(len(ws)):
                    def take(j: Any, carry: tuple[Any, Any]) -> tuple[Any, Any]:
                        g, acc = carry
                        slot = lax.rem(g, stages)
                        plgpu.barrier_wait(full.at[slot])
                        if math:
                            def scope(ref: Any) -> Any:
                                plgpu.wgmma(ref, w_smem.at[slot], x_smem.transpose((1, 0)))
                                return ref[...]

                            acc = acc + pl.run_scoped(scope, plgpu.ACC((tile_n, T_PAD), jnp.float32))
                        plgpu.barrier_arrive(free.at[slot])
                        return g + 1, acc

                    carry = lax.fori_loop(0, counts[m], take, carry)
                    if barrier:
                        grid_barrier(sems, cta, ctas, layer * len(ws) + m + 1)
                        load_x()  # the next GEMM's input, written by every CTA before the barrier
                return carry

            load_x()
            acc0 = plgpu.layout_cast(jnp.zeros((tile_n, T_PAD), jnp.float32), plgpu.Layout.WGMMA)
            total, acc = lax.fori_loop(0, layers, one_layer, (jnp.int32(0), acc0))
            if barrier:
                barrier_exit(sems, cta, ctas, layers * len(ws))
            o_smem[...] = jnp.full((128,), total.astype(jnp.float32), jnp.float32)
            acc_smem[...] = acc
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, o_ref.at[cta])
            plgpu.copy_smem_to_gmem(acc_smem, acc_ref.at[cta])
            plgpu.wait_smem_to_gmem(0)

    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    call = plgpu.kernel(
        kernel, out_type=(jax.ShapeDtypeStruct((ctas, 128), jnp.float32),
                          jax.ShapeDtypeStruct((ctas, tile_n, T_PAD), jnp.float32)),
        scratch_types=[
            plgpu.SMEM((stages, tile_n, tile_k), ws[0].dtype, transforms=tiled),
            plgpu.SMEM((T_PAD, tile_k), x.dtype, transforms=tiled),
            plgpu.SMEM((128,), jnp.float32),
            plgpu.SMEM((tile_n, T_PAD), jnp.float32),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(),
        ],
        grid=(ctas,), grid_names=("c",), num_threads=2, thread_name="wg",
        **({"interpret": plgpu.InterpretGPUParams()} if interpret else {}),
    )
    return call(*ws, x)


def relative_error(got: jax.Array, want: jax.Array) -> float:
    return float(jnp.linalg.norm((got - want).ravel()) / jnp.maximum(jnp.linalg.norm(want.ravel()), 1e-30))


def expected_acc(ws: tuple[jax.Array, ...], x: jax.Array, ctas: int, tile_n: int,
                 tile_k: int) -> jax.Array:
    """float32 [ctas, tile_n, T_PAD]: `stream(math=True)`'s sum over each CTA's tiles of tile @ x.T."""
    xt = x[:, :tile_k].astype(jnp.float32)
    out = jnp.zeros((ctas, tile_n, T_PAD), jnp.float32)
    for w in ws:
        layers, n, k = w.shape
        tiles = w.reshape(layers, n // tile_n, tile_n, k // tile_k, tile_k).transpose(0, 1, 3, 2, 4)
        tiles = tiles.reshape(layers, -1, tile_n, tile_k).astype(jnp.float32)  # tile i = (row, col) row-major
        per_tile = jnp.einsum("lind,td->lint", tiles, xt)  # [L, tiles, tile_n, T_PAD]
        owner = jnp.arange(per_tile.shape[1]) % ctas
        out = out + jax.ops.segment_sum(per_tile.sum(0), owner, num_segments=ctas)
    return out


def expected_counts(ws: tuple[jax.Array, ...], ctas: int, tile_n: int, tile_k: int) -> list[int]:
    """Tiles each CTA should release over all layers."""
    layers = ws[0].shape[0]
    totals = [phase_tiles(w.shape[1], w.shape[2], tile_n, tile_k) for w in ws]
    return [layers * sum(tiles_per_cta(t, c, ctas) for t in totals) for c in range(ctas)]


def xla_chain(ws: tuple[jax.Array, ...], x: jax.Array) -> jax.Array:
    """Per layer, per GEMM: a small fusion on x (an RMSNorm, as before the engine's GEMMs), then
    y = x @ W.T, the next GEMM's x = y's first K columns plus x's (so each GEMM waits on the last)."""
    layers = ws[0].shape[0]
    for layer in range(layers):
        for w in ws:
            k = w.shape[2]
            h = x[:, :k].astype(jnp.float32)
            h = (h * lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6)).astype(x.dtype)
            y = jnp.dot(h, w[layer].T, preferred_element_type=jnp.float32)
            width = x.shape[1]
            y = y[:, :width] if y.shape[1] >= width else jnp.pad(y, ((0, 0), (0, width - y.shape[1])))
            x = (y + x.astype(jnp.float32)).astype(x.dtype)
    return x


def xla_read(ws: tuple[jax.Array, ...]) -> jax.Array:
    """Every weight read once by XLA (a column sum per matrix), no dependencies between them."""
    return sum(jnp.sum(w, axis=(0, 1), dtype=jnp.float32).sum() for w in ws)


def timed(fn: Any, *args: Any) -> float:
    """Median seconds per call of fn(*args), timed as bench/attention.py times its kernels."""
    return timed_sets(fn, [args], iters=7)[0]


def make_weights(layers: int, scale: int = 1) -> tuple[jax.Array, ...]:
    """Random bf16 weights [layers, N, K] per GEMM of LAYER (dimensions divided by `scale`)."""
    key = jax.random.key(0)
    out = []
    for _, n, k in LAYER:
        key, sub = jax.random.split(key)
        # scaled by K ** -0.5 so that a chain of GEMMs neither overflows nor vanishes
        w = jax.random.normal(sub, (layers, n // scale, k // scale), jnp.float32) * (k // scale) ** -0.5
        out.append(w.astype(jnp.bfloat16))
    return tuple(out)


# (tile_n, tile_k, stages): 32 KiB tiles with 4 or 6 stages (128 / 192 KiB of shared memory), and 16 KiB
# tiles with 8 stages
TILINGS = ((64, 256, 4), (64, 256, 6), (64, 128, 8), (128, 128, 6))
# gemv_chain's (tile_n, tile_k, stages, xstages)
CHAINS = ((64, 256, 4, 2), (64, 128, 8, 4), (64, 128, 6, 6))
CHAINS_F32 = ((64, 128, 8, 2), (64, 256, 4, 1), (64, 128, 6, 3))  # float32 x buffers: 32-64 KiB a stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--parts", default="baseline,stream,barrier,chain",
                    help="comma list of baseline,stream,barrier,chain,chain32 (float32 y); run a part that "
                         "may hang (a grid barrier whose CTAs are not all resident) in its own process under "
                         "`timeout`")
    ap.add_argument("--interpret", action="store_true",
                    help="CPU: small shapes in the interpreter, no barrier")
    ns = ap.parse_args()

    if ns.interpret:
        ws = make_weights(1, scale=32)  # [1, 192/128/896/128, 128/128/128/448]
        x = jax.random.normal(jax.random.key(1), (T_PAD, 128), jnp.bfloat16)
        for ctas, tile_n, tile_k, stages in ((3, 64, 64, 2), (5, 64, 64, 3)):
            for math in (False, True):
                counts, acc = stream(ws, x, ctas=ctas, tile_n=tile_n, tile_k=tile_k, stages=stages,
                                     barrier=False, math=math, interpret=True)
                want = expected_counts(ws, ctas, tile_n, tile_k)
                err = relative_error(acc, expected_acc(ws, x, ctas, tile_n, tile_k)) if math else 0.0
                print(f"interpret ctas={ctas} stages={stages} math={math}: tiles per CTA "
                      f"{counts[:, 0].tolist()} (want {want}), acc rel err {err:.1e}")
                assert counts[:, 0].tolist() == [float(c) for c in want] and err < 1e-2
        x0 = x[:, :ws[0].shape[2]]
        ys = gemv_chain(ws, x0, ctas=1, tile_n=64, tile_k=64, stages=3, xstages=2, barrier=False,
                        interpret=True)
        want_ys = gemv_chain_reference(ws, x0)
        errs = [relative_error(ys[p, :, :w.shape[1]].astype(jnp.float32),
                               want_ys[p, :, :w.shape[1]].astype(jnp.float32)) for p, w in enumerate(ws)]
        print(f"interpret gemv_chain (1 CTA, 64x64 tiles): rel err per phase {errs}")
        assert max(errs) < 1e-2
        return

    from run_all import copy_bandwidth

    sms = int(getattr(jax.devices()[0], "core_count", 0) or 132)
    ws = make_weights(ns.layers)
    nbytes = sum(w.nbytes for w in ws)
    x = jax.random.normal(jax.random.key(1), (T_PAD, 14336), jnp.bfloat16)
    x4 = x[:4]  # [4, 14336]: every GEMM reads its first K columns
    rows: list[dict[str, Any]] = []
    copy = copy_bandwidth()
    print(f"{jax.devices()[0].device_kind}: {sms} SMs, copy {copy:.2f} TB/s, weights {nbytes / 1e9:.2f} GB "
          f"({ns.layers} layers)", flush=True)

    def record(name: str, secs: float, **extra: Any) -> None:
        rows.append(dict(variant=name, us_per_layer=secs / ns.layers * 1e6, TBps=nbytes / secs / 1e12,
                         **extra))
        print(f"  {name:40s} {secs / ns.layers * 1e6:8.1f} us/layer {nbytes / secs / 1e12:5.2f} TB/s",
              flush=True)

    parts = set(ns.parts.split(","))
    if "baseline" in parts:
        record("xla_read (column sums)", timed(jax.jit(xla_read), ws))
        record("xla_chain (T=4, norm + dot)", timed(jax.jit(xla_chain), ws, x4))
    # Every no-barrier variant first: a barrier variant that hung (a CTA not resident) would cut the rest.
    # The math variants need 64-row tiles (one wgmma M).
    no_barrier = [(t, False, False) for t in TILINGS] + [(t, False, True) for t in TILINGS if t[0] == 64]
    plan = (no_barrier if "stream" in parts else []) + (
        [(t, True, m) for t, _, m in no_barrier] if "barrier" in parts else [])
    for (tile_n, tile_k, stages), barrier, math in plan:
        name = (f"stream {tile_n}x{tile_k} s{stages} {'barrier' if barrier else 'no barrier'}"
                f"{' math' if math else ''}")
        fn = functools.partial(stream, ctas=sms, tile_n=tile_n, tile_k=tile_k, stages=stages,
                               barrier=barrier, math=math)
        try:
            counts, acc = jax.block_until_ready(fn(ws, x))
            ok = counts[:, 0].tolist() == [float(c) for c in expected_counts(ws, sms, tile_n, tile_k)]
            extra: dict[str, Any] = dict(tiles_ok=ok)
            if math:
                extra["acc_rel_err"] = relative_error(acc, expected_acc(ws, x, sms, tile_n, tile_k))
            record(name, timed(fn, ws, x), **extra)
        except Exception as e:  # noqa: BLE001 - keep the other variants' figures
            rows.append(dict(variant=name, error=f"{type(e).__name__}: {str(e)[:500]}"))
            print(f"  {name} FAILED {type(e).__name__}: {str(e)[:1500]}", flush=True)
    # The GEMV chain with its data flow (bench/layer_chain_mgpu.py): contiguous split-K shares per CTA.
    x0 = x[:, :ws[0].shape[2]]
    if "chain" in parts:
        record("xla gemv chain (no norms)", timed(jax.jit(gemv_chain_reference), ws, x0))
    # bf16 y (partial sums added in bf16), then float32 y (x as bf16 from registers)
    plan_chain = [(x0, c) for c in CHAINS if "chain" in parts]
    plan_chain += [(x0.astype(jnp.float32), c) for c in CHAINS_F32 if "chain32" in parts]
    for x0_, (tile_n, tile_k, stages, xstages) in plan_chain:
        want_ys = jax.jit(gemv_chain_reference)(ws, x0_)
        name = f"gemv_chain {x0_.dtype.name} {tile_n}x{tile_k} s{stages} x{xstages} barrier"
        fn = functools.partial(gemv_chain, ctas=sms, tile_n=tile_n, tile_k=tile_k, stages=stages,
                               xstages=xstages, barrier=True)
        try:
            ys = jax.block_until_ready(fn(ws, x0_))
            errs = [relative_error(ys[p, :, :n].astype(jnp.float32), want_ys[p, :, :n].astype(jnp.float32))
                    for p, n in enumerate([w.shape[1] for w in ws] * ns.layers)]
            record(name, timed(fn, ws, x0_), acc_rel_err=max(errs))
        except Exception as e:  # noqa: BLE001 - keep the other variants' figures
            rows.append(dict(variant=name, error=f"{type(e).__name__}: {str(e)[:500]}"))
            print(f"  {name} FAILED {type(e).__name__}: {str(e)[:1500]}", flush=True)
    os.makedirs(ns.out, exist_ok=True)
    info = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, sms=sms, copy_TBps=copy,
                weight_bytes=nbytes, layers=ns.layers, git=os.environ.get("RTP_GIT_SHA", ""),
                command="python3 bench/probe_layer_stream.py " + " ".join(sys.argv[1:]))
    out = Path(ns.out, f"probe_layer_stream_{ns.parts.replace(',', '_')}.json")
    out.write_text(json.dumps({**info, "rows": rows}, indent=1))
    print("\n| variant | us per layer | TB/s | tiles ok | math rel err |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | failed | | | |")
        else:
            err = f"{r['acc_rel_err']:.1e}" if "acc_rel_err" in r else ""
            print(f"| {r['variant']} | {r['us_per_layer']:.1f} | {r['TBps']:.2f} | {r.get('tiles_ok', '')} "
                  f"| {err} |")
    print(f"copy {copy:.2f} TB/s: one layer's 436 MB at that rate takes {436e6 / copy / 1e6:.1f} us")


if __name__ == "__main__":
    main()
