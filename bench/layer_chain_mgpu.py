"""A chain of dependent decode GEMVs in one persistent Mosaic GPU kernel (a probe, not an engine kernel).

The data flow a persistent decode layer needs, without its norms and attention: phase p computes
y_p = x_p @ W_p.T for T_PAD token rows (bf16), and phase p + 1 reads x_{p+1} = y_p[:, :K_{p+1}],
the phases being a Llama decode layer's GEMMs (q/k/v, o, gate/up, down) over layers. A phase's W is cut
into [tile_n, tile_k] tiles, numbered row-major (row block, K chunk); CTA c takes the contiguous range
[total * c / G, total * (c + 1) / G), so every CTA streams the same bytes in every phase (the split-K a
GEMV needs to keep 132 SMs busy on a 4096-row GEMM). Per CTA, two warpgroups:
  memory:   streams the CTA's W tiles of every phase by TMA through `stages` slots, running ahead across
            phase boundaries (weights depend on nothing);
  consumer: per tile, the x chunk [T_PAD, tile_k] of the previous phase's output by TMA (`xstages`
            ahead) into the first rows of a zero-padded [64, tile_k] buffer (wgmma's A),
            acc [64, tile_n] += x @ W_tile.T by wgmma (W as K-major B); at the end of its share of a row
            block, rows 0..T_PAD of acc are added into y_p in global memory by a TMA reduce-add (the
            partial sums of the 2-3 CTAs sharing a row block). It also zeroes its share of y_{p+1}, and
            after each phase meets the others at a grid barrier (`grid_barrier`): every partial sum of
            y_p is in global memory before any CTA reads x_{p+1}.
y is bf16 or float32 (x0's dtype). A float32 x chunk goes to the wgmma as bf16 from registers, read out of a
plain [64, tile_k] float32 buffer: Mosaic's layout inference places no [8, tile_k] float32 -> bf16 pass
into the swizzled A buffer.
`ys`: [phases, T_PAD, N_max] of x0's dtype, every phase's output. `gemv_chain_reference` is the same in XLA.
With ctas=1 the barrier is not needed and a plain TMA store stands for the reduce-add (one CTA flushes each
row block once), which is how the Mosaic GPU interpreter checks the data flow on a CPU (its global
semaphores and reduce-adds are compiled-only).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

T_PAD = 8  # token rows, padded
A_ROWS = 64  # wgmma's M: x's rows padded


def grid_barrier(sems: tuple[Any, Any], cta: Any, ctas: int, epoch: Any) -> None:
    """All CTAs meet (one warpgroup each) for the `epoch`-th time in this launch (1, 2, ...): each adds 1 to
    `arrive`; CTA 0 alone waits for `ctas` arrivals (taking them back by compare-and-swap), then bumps the
    generation `gen`; every CTA polls `gen` by plain loads until it reaches `epoch`. Only one CTA ever
    spins with compare-and-swap: 131 CTAs each taking a release token by CAS from one address cost ~27 us
    per barrier on an H200 (the retries are quadratic), where loads of a word in L2 do not contend.
    `barrier_exit` returns `gen` to 0 before the kernel ends."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    arrive, gen = sems
    plgpu.semaphore_signal(arrive, 1, memory_scope="gpu")

    @pl.when(cta == 0)
    def _count() -> None:
        plgpu.semaphore_wait(arrive, ctas, memory_scope="gpu")
        plgpu.semaphore_signal(gen, 1, memory_scope="gpu")

    plgpu.semaphore_wait(gen, epoch, decrement=False, memory_scope="gpu")


def barrier_exit(sems: tuple[Any, Any], cta: Any, ctas: int, epochs: Any) -> None:
    """After a CTA's last `grid_barrier` (`epochs` of them): once every CTA has left its last poll of `gen`,
    CTA 0 takes `gen` back to 0, so the semaphores are zero for the next launch."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    arrive, gen = sems
    plgpu.semaphore_signal(arrive, 1, memory_scope="gpu")

    @pl.when(cta == 0)
    def _reset() -> None:
        plgpu.semaphore_wait(arrive, ctas, memory_scope="gpu")
        plgpu.semaphore_signal(gen, -epochs, memory_scope="gpu")  # u32 add wraps: gen - epochs = 0


def barrier_semaphores() -> tuple[Any, Any]:
    """`grid_barrier`'s global semaphores (arrive, gen), zero between launches."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    sem = functools.partial(pl.get_global, plgpu.SemaphoreType.REGULAR)
    return sem(), sem()


def fill(src: Any, dst: Any, full: Any, free: Any, g: Any, stages: int) -> Any:
    """The producer's g-th slot fill: wait until the consumer freed slot g % stages (from the second round
    on), then copy `src` into `dst(slot)` by TMA, completing `full[slot]`. Returns g + 1."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    slot = lax.rem(g, stages)
    pl.when(g >= stages)(functools.partial(plgpu.barrier_wait, free.at[slot]))
    plgpu.copy_gmem_to_smem(src, dst(slot), full.at[slot])
    return g + 1


def drain(free: Any, stages: int, used: Any) -> None:
    """A producer that waited on `free[slot]` before each reuse observes every used slot's last release,
    so no barrier phase is left unobserved at exit (`used`: how many slot fills it issued)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    for s in range(stages):
        pl.when(s < used)(functools.partial(plgpu.barrier_wait, free.at[s]))


def stream_weights(layers: int, num: int, count: Any, src: Any, dst: Any, full: Any, free: Any,
                   stages: int) -> None:
    """A memory warpgroup's whole job: for each layer and each of its `num` GEMMs m, `count(m)` slot fills
    of `src(m, layer, i)` into `dst(m, slot)` (running ahead across phases: weights depend on nothing),
    then `drain`."""
    def one_layer(layer: Any, g: Any) -> Any:
        for m in range(num):
            def one(i: Any, g: Any, m: int = m) -> Any:
                return fill(src(m, layer, i), functools.partial(dst, m), full, free, g, stages)

            g = lax.fori_loop(0, count(m), one, g)
        return g

    drain(free, stages, lax.fori_loop(0, layers, one_layer, jnp.int32(0)))


def share(total: int, cta: Any, ctas: int) -> tuple[Any, Any]:
    """CTA `cta`'s contiguous range [start, end) of a phase's `total` tiles (sizes differ by at most 1)."""
    return total * cta // ctas, total * (cta + 1) // ctas


def gemv_chain_reference(ws: tuple[jax.Array, ...], x0: jax.Array) -> jax.Array:
    """XLA's version: [phases, T_PAD, N_max] of x0's dtype, y = bf16(x) @ W.T in float32 (rounded to bf16
    for a bf16 x0), x_next = y."""
    n_max = max(w.shape[1] for w in ws)
    ys, x = [], x0
    for layer in range(ws[0].shape[0]):
        for w in ws:
            y = jnp.dot(x[:, :w.shape[2]].astype(w.dtype), w[layer].T,
                        preferred_element_type=jnp.float32).astype(x0.dtype)
            ys.append(jnp.pad(y, ((0, 0), (0, n_max - y.shape[1]))))
            x = y
    return jnp.stack(ys)


@functools.partial(jax.jit, static_argnames=("ctas", "tile_n", "tile_k", "stages", "xstages", "barrier",
                                             "interpret"))
def gemv_chain(ws: tuple[jax.Array, ...], x0: jax.Array, *, ctas: int, tile_n: int = 64, tile_k: int = 256,
               stages: int = 4, xstages: int = 2, barrier: bool = True, interpret: bool = False) -> jax.Array:
    """ws: per GEMM of the layer [L, N, K] bf16 (each K <= the previous GEMM's N); x0: [T_PAD, K_0], bf16 or
    float32. With a float32 x0, y and the partial sums stay float32: x chunks land in a plain [64, tile_k]
    float32 buffer and go to the wgmma as bf16 from registers (the pass a norm or silu * up would use).
    The interpreter has no register-A wgmma, so the float32 chain is checked on the GPU only."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    layers, num = ws[0].shape[0], len(ws)
    ns, ks = [w.shape[1] for w in ws], [w.shape[2] for w in ws]
    if any(n % tile_n for n in ns) or any(k % tile_k for k in ks) or x0.shape != (T_PAD, ks[0]):
        raise ValueError(f"N {ns} must be multiples of tile_n={tile_n}, K {ks} of tile_k={tile_k}; "
                         f"x0 must be [{T_PAD}, {ks[0]}]")
    if barrier is False and ctas > 1:
        raise ValueError("without the grid barrier only one CTA may run (its tiles in order)")
    xf32 = x0.dtype == jnp.float32
    ydt = x0.dtype
    smem = (stages * tile_n * tile_k * 2 + (xstages * A_ROWS * tile_k + A_ROWS * tile_n + T_PAD * tile_n)
            * ydt.itemsize)
    if smem > 227 * 1024:
        raise ValueError(f"{smem} bytes of shared memory: lower stages, xstages or the tile")
    n_max, dtype, phases = max(ns), ws[0].dtype, layers * num
    cols = [k // tile_k for k in ks]  # K chunks per row block
    totals = [n // tile_n * c for n, c in zip(ns, cols, strict=True)]
    reduce_add = None if interpret else "add"

    def kernel(*refs: Any) -> None:
        w_refs = refs[:num]
        x0_ref, ys_ref, w_smem, x_pad, y_out, zeros, full, free, x_full = refs[num:]
        cta = lax.axis_index("c")

        def src(m: int, layer: Any, i: Any) -> Any:
            """This CTA's i-th W tile of GEMM m."""
            t = share(totals[m], cta, ctas)[0] + i
            row, chunk = t // cols[m], lax.rem(t, cols[m])
            return w_refs[m].at[layer, pl.ds(row * tile_n, tile_n), pl.ds(chunk * tile_k, tile_k)]

        def count(m: int) -> Any:
            start, end = share(totals[m], cta, ctas)
            return end - start

        pl.when(lax.axis_index("wg") == 1)(functools.partial(
            stream_weights, layers, num, count, src, lambda m, slot: w_smem.at[slot], full, free, stages))

        @pl.when(lax.axis_index("wg") == 0)
        def _consume() -> None:
            sems = barrier_semaphores() if barrier else None
            x_pad[...] = jnp.zeros((xstages, A_ROWS, tile_k), ydt)  # rows >= T_PAD stay zero
            zeros[...] = jnp.zeros((T_PAD, tile_n), ydt)
            plgpu.commit_smem()

            def zero_share(p: Any, m: int) -> None:
                """Zero this CTA's column blocks c, c + G, ... of y_p (GEMM m's output) before any adds."""
                def one(b: Any, _: Any) -> Any:
                    plgpu.copy_smem_to_gmem(zeros, ys_ref.at[p, :, pl.ds((cta + b * ctas) * tile_n, tile_n)])
                    return _

                lax.fori_loop(0, (ns[m] // tile_n - cta + ctas - 1) // ctas, one, None)
                plgpu.wait_smem_to_gmem(0)

            zero_share(jnp.int32(0), 0)
            if barrier:
                grid_barrier(sems, cta, ctas, 1)

            def one_layer(layer: Any, g: Any) -> Any:
                for m in range(num):
                    p = layer * num + m
                    start, end = share(totals[m], cta, ctas)
                    c_m = cols[m]

                    def load_x(t: Any, m: int = m, p: Any = p, layer: Any = layer,
                               start: Any = start) -> None:
                        xs = lax.rem(t - start, xstages)
                        chunk = pl.ds(lax.rem(t, cols[m]) * tile_k, tile_k)
                        dst = x_pad.at[xs, pl.ds(0, T_PAD)]
                        if m == 0:  # a layer's first GEMM reads the previous layer's last output, or x0
                            pl.when(layer == 0)(lambda: plgpu.copy_gmem_to_smem(
                                x0_ref.at[:, chunk], dst, x_full.at[xs]))
                            pl.when(layer > 0)(lambda: plgpu.copy_gmem_to_smem(
                                ys_ref.at[p - 1, :, chunk], dst, x_full.at[xs]))
                        else:
                            plgpu.copy_gmem_to_smem(ys_ref.at[p - 1, :, chunk], dst, x_full.at[xs])

                    for j in range(xstages):
                        pl.when(start + j < end)(functools.partial(load_x, start + j))

                    def one_row(r: Any, g: Any, m: int = m, p: Any = p, start: Any = start, end: Any = end,
                                c_m: int = c_m, load_x: Any = load_x) -> Any:
                        def step(c: Any, carry: tuple[Any, Any]) -> tuple[Any, Any]:
                            g, acc = carry
                            t = r * c_m + c
                            slot, xs = lax.rem(g, stages), lax.rem(t - start, xstages)
                            plgpu.barrier_wait(x_full.at[xs])
                            plgpu.barrier_wait(full.at[slot])

                            if xf32:
                                a = plgpu.layout_cast(x_pad[xs], plgpu.Layout.WGMMA).astype(dtype)
                            else:
                                a = x_pad.at[xs]

                            def scope(ref: Any) -> Any:
                                plgpu.wgmma(ref, a, w_smem.at[slot].transpose((1, 0)))
                                return ref[...]

                            acc = acc + pl.run_scoped(scope, plgpu.ACC((A_ROWS, tile_n), jnp.float32))
                            plgpu.barrier_arrive(free.at[slot])
                            pl.when(t + xstages < end)(functools.partial(load_x, t + xstages))
                            return g + 1, acc

                        acc0 = plgpu.layout_cast(jnp.zeros((A_ROWS, tile_n), jnp.float32), plgpu.Layout.WGMMA)
                        lo, hi = jnp.maximum(start - r * c_m, 0), jnp.minimum(end - r * c_m, c_m)
                        g, acc = lax.fori_loop(lo, hi, step, (g, acc0))
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last flush read y_out
                        y_out[...] = acc.astype(ydt)
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(y_out.at[pl.ds(0, T_PAD)],
                                                ys_ref.at[p, :, pl.ds(r * tile_n, tile_n)],
                                                reduction_op=reduce_add)
                        return g

                    g = lax.fori_loop(start // c_m, (end + c_m - 1) // c_m, one_row, g)
                    # Unconditional: the last phase zeroes a spare output. The same stores inside a `pl.when`
                    # (skip the last layer) hung on an H200 once a grid barrier followed (even with 1 CTA).
                    zero_share(p + 1, (m + 1) % num)
                    plgpu.wait_smem_to_gmem(0)  # this phase's partial sums are in global memory
                    if barrier:
                        grid_barrier(sems, cta, ctas, p + 2)
                return g

            lax.fori_loop(0, layers, one_layer, jnp.int32(0))
            if barrier:
                barrier_exit(sems, cta, ctas, phases + 1)

    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    call = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((phases + 1, T_PAD, n_max), ydt),
        scratch_types=[
            plgpu.SMEM((stages, tile_n, tile_k), dtype, transforms=tiled),
            plgpu.SMEM((xstages, A_ROWS, tile_k), ydt, transforms=() if xf32 else tiled),
            plgpu.SMEM((A_ROWS, tile_n), ydt),
            plgpu.SMEM((T_PAD, tile_n), ydt),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=xstages),
        ],
        grid=(ctas,), grid_names=("c",), num_threads=2, thread_name="wg",
        **({"interpret": plgpu.InterpretGPUParams()} if interpret else {}),
    )
    return call(*ws, x0)[:phases]
