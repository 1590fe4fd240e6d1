"""A chain of dependent decode GEMVs in one persistent Mosaic GPU kernel (a probe, not an engine kernel).

The data flow a persistent decode layer needs, without its norms and attention: phase p computes
y_p = x_p @ W_p.T for T_PAD token rows (bf16 out), and phase p + 1 reads x_{p+1} = y_p[:, :K_{p+1}], the
phases being a Llama decode layer's GEMMs (q/k/v, o, gate/up, down) over layers. Each phase's N is cut into
`blocks` row blocks of W (tile_n = N / blocks rows, a multiple of 8); CTA c computes blocks c, c + G, ...
over the whole K, so no split-K sum is needed. Per CTA, two warpgroups:
  memory:   streams the CTA's W tiles [tile_n, tile_k] of every phase by TMA through `stages` slots, running
            ahead across phase boundaries (weights depend on nothing);
  consumer: per block, x tiles [T_PAD, tile_k] from the previous phase's output by TMA into the first
            rows of a zero-padded [64, tile_k] buffer (wgmma's A; `xstages` ahead), acc [64, tile_n] +=
            x @ W_tile.T by wgmma (W as K-major B), then rows 0..T_PAD of acc as bf16 to the phase's output
            by TMA; after each phase, a grid barrier (`grid_barrier`) so that every block of y_p is
            written before any CTA reads x_{p+1}.
`ys`: [phases, T_PAD, N_max] bf16, every phase's output. `gemv_chain_reference` is the same in XLA.
With ctas=1 the barrier is not needed (one CTA computes every block in order), which is how the Mosaic GPU
interpreter checks the data flow on a CPU (its global semaphores are compiled-only).
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


def tile_rows(ws: tuple[jax.Array, ...], blocks: int) -> list[int]:
    """W rows per block for each GEMM; raises where `blocks` does not cut N into multiples of 8 <= 256."""
    rows = []
    for w in ws:
        n = w.shape[1]
        if n % blocks or (n // blocks) % 8 or n // blocks > 256:
            raise ValueError(f"blocks={blocks} must cut N={n} into row blocks of a multiple of 8, <= 256")
        rows.append(n // blocks)
    return rows


def gemv_chain_reference(ws: tuple[jax.Array, ...], x0: jax.Array) -> jax.Array:
    """XLA's version: [phases, T_PAD, N_max] bf16, each phase's y (bf16) = x @ W.T in float32."""
    n_max = max(w.shape[1] for w in ws)
    ys, x = [], x0
    for layer in range(ws[0].shape[0]):
        for w in ws:
            y = jnp.dot(x[:, :w.shape[2]], w[layer].T, preferred_element_type=jnp.float32).astype(x0.dtype)
            ys.append(jnp.pad(y, ((0, 0), (0, n_max - y.shape[1]))))
            x = y
    return jnp.stack(ys)


@functools.partial(jax.jit, static_argnames=("ctas", "blocks", "tile_k", "stages", "xstages", "barrier",
                                             "interpret"))
def gemv_chain(ws: tuple[jax.Array, ...], x0: jax.Array, *, ctas: int, blocks: int = 128, tile_k: int = 64,
               stages: int = 5, xstages: int = 2, barrier: bool = True, interpret: bool = False) -> jax.Array:
    """ws: per GEMM of the layer [L, N, K] bf16 (each K <= the previous GEMM's N); x0: [T_PAD, K_0] bf16."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    layers, num = ws[0].shape[0], len(ws)
    rows = tile_rows(ws, blocks)
    ks = [w.shape[2] for w in ws]
    if any(k % tile_k for k in ks) or x0.shape != (T_PAD, ks[0]):
        raise ValueError(f"K {ks} must be multiples of tile_k={tile_k}; x0 must be [{T_PAD}, {ks[0]}]")
    if barrier is False and ctas > 1:
        raise ValueError("without the grid barrier only one CTA may run (its blocks in order)")
    n_max, max_rows = max(w.shape[1] for w in ws), max(rows)
    smem = stages * max_rows * tile_k * 2 + xstages * A_ROWS * tile_k * 2 + sum(A_ROWS * r * 2 for r in rows)
    if smem > 227 * 1024:
        raise ValueError(f"{smem} bytes of shared memory: lower stages or tile_k")
    dtype = x0.dtype

    def kernel(*refs: Any) -> None:
        w_refs = refs[:num]
        x0_ref, ys_ref, w_smem, x_smem, *y_smems, full, free, x_full = refs[num:]
        cta = lax.axis_index("c")
        my_blocks = (blocks - cta + ctas - 1) // ctas

        def src(m: int, layer: Any, i: Any) -> Any:
            """This CTA's i-th W tile of GEMM m: block-major, K steps within a block."""
            steps = ks[m] // tile_k
            block, j = cta + (i // steps) * ctas, lax.rem(i, steps)
            return w_refs[m].at[layer, pl.ds(block * rows[m], rows[m]), pl.ds(j * tile_k, tile_k)]

        pl.when(lax.axis_index("wg") == 1)(functools.partial(
            stream_weights, layers, num, lambda m: my_blocks * (ks[m] // tile_k), src,
            lambda m, slot: w_smem.at[slot, pl.ds(0, rows[m])], full, free, stages))

        @pl.when(lax.axis_index("wg") == 0)
        def _consume() -> None:
            if barrier:
                sems = barrier_semaphores()
            x_smem[...] = jnp.zeros((xstages, A_ROWS, tile_k), dtype)  # rows >= T_PAD stay zero
            plgpu.commit_smem()

            def one_layer(layer: Any, g: Any) -> Any:
                for m in range(num):
                    p = layer * num + m
                    steps, n_rows = ks[m] // tile_k, rows[m]

                    def load_x(j: Any, m: int = m, p: Any = p, layer: Any = layer) -> None:
                        xs = lax.rem(j, xstages)
                        dst = x_smem.at[xs, pl.ds(0, T_PAD)]
                        if m == 0:  # a layer's first GEMM reads the previous layer's last output, or x0
                            @pl.when(layer == 0)
                            def _first() -> None:
                                plgpu.copy_gmem_to_smem(x0_ref.at[:, pl.ds(j * tile_k, tile_k)], dst,
                                                        x_full.at[xs])

                            @pl.when(layer > 0)
                            def _later() -> None:
                                plgpu.copy_gmem_to_smem(ys_ref.at[p - 1, :, pl.ds(j * tile_k, tile_k)], dst,
                                                        x_full.at[xs])
                        else:
                            plgpu.copy_gmem_to_smem(ys_ref.at[p - 1, :, pl.ds(j * tile_k, tile_k)], dst,
                                                    x_full.at[xs])

                    def one_block(b: Any, g: Any, m: int = m, p: Any = p, steps: int = steps,
                                  n_rows: int = n_rows, load_x: Any = load_x) -> Any:
                        block = cta + b * ctas
                        for j in range(min(xstages, steps)):
                            load_x(jnp.int32(j))

                        def step(j: Any, carry: tuple[Any, Any]) -> tuple[Any, Any]:
                            g, acc = carry
                            slot, xs = lax.rem(g, stages), lax.rem(j, xstages)
                            plgpu.barrier_wait(full.at[slot])
                            plgpu.barrier_wait(x_full.at[xs])

                            def scope(ref: Any) -> Any:
                                plgpu.wgmma(ref, x_smem.at[xs],
                                            w_smem.at[slot, pl.ds(0, n_rows)].transpose((1, 0)))
                                return ref[...]

                            acc = acc + pl.run_scoped(scope, plgpu.ACC((A_ROWS, n_rows), jnp.float32))
                            plgpu.barrier_arrive(free.at[slot])
                            pl.when(j + xstages < steps)(functools.partial(load_x, j + xstages))
                            return g + 1, acc

                        acc0 = plgpu.layout_cast(jnp.zeros((A_ROWS, n_rows), jnp.float32), plgpu.Layout.WGMMA)
                        g, acc = lax.fori_loop(0, steps, step, (g, acc0))
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last block's store read it
                        y_smems[m][...] = acc.astype(dtype)
                        plgpu.commit_smem()
                        plgpu.copy_smem_to_gmem(y_smems[m].at[pl.ds(0, T_PAD)],
                                                ys_ref.at[p, :, pl.ds(block * n_rows, n_rows)])
                        return g

                    g = lax.fori_loop(0, my_blocks, one_block, g)
                    plgpu.wait_smem_to_gmem(0)  # this phase's outputs are in global memory
                    if barrier:
                        grid_barrier(sems, cta, ctas, p + 1)
                return g

            lax.fori_loop(0, layers, one_layer, jnp.int32(0))
            if barrier:
                barrier_exit(sems, cta, ctas, layers * num)

    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    call = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((layers * num, T_PAD, n_max), dtype),
        scratch_types=[
            plgpu.SMEM((stages, max_rows, tile_k), dtype, transforms=tiled),
            plgpu.SMEM((xstages, A_ROWS, tile_k), dtype, transforms=tiled),
            *[plgpu.SMEM((A_ROWS, r), dtype) for r in rows],  # one per GEMM: contiguous TMA sources
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=xstages),
        ],
        grid=(ctas,), grid_names=("c",), num_threads=2, thread_name="wg",
        **({"interpret": plgpu.InterpretGPUParams()} if interpret else {}),
    )
    return call(*ws, x0)
