"""Paged decode attention on Hopper through Pallas Mosaic GPU (TMA page copies + wgmma).

One query token per sequence (a pure-decode batch: `query_start_loc == arange(S + 1)`), the case where
attention is bound by reading the KV cache. The Triton-lowered kernel (ragged_paged_attention.py) reaches
1.3-1.8 TB/s there on an H100 because each KV page is a dependent pointer gather; here a memory warpgroup
streams every page of a KV tile into shared memory with one TMA copy per page ([block_size, head_dim] box
of one KV head), `num_stages` tiles ahead, while a compute warpgroup runs QK^T and PV on the tensor cores.

Grid (kv_head, seq, split), two warpgroups per block:
  memory wg:  for each tile of `pages_per_tile` pages: wait until the slot is free, issue the K (then V)
              page copies; a slot's barrier completes when all its pages have landed.
  compute wg: q rows of the head group (padded to wgmma's 64 rows; only `group` are real) x K^T ->
              [64, tile] logits, base-2 online softmax in fp32, p x V into a [64, head_dim] fp32
              accumulator; frees the slot.
Each split writes its normalized rows and base-2 log-sum-exp; XLA merges splits (`merge_splits`). With one
split the rows are written in the output dtype and no merge runs.

Only the compiled path exists for Mosaic GPU on a GPU; on the CPU, `interpret=True` runs JAX's Mosaic GPU
interpreter (jax >= 0.11), which the tests use. Contract and results are those of the reference in
ragged_paged_attention.py restricted to one token per sequence.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas._lowering import mosaic_gpu_modules
from kernels_pallas._paged_common import LOG2E, MASK_VALUE, merge_splits

BLOCK_M = 64  # wgmma's row count; the head group's q rows are the first `group_pad` of them
SMEM_LIMIT = 227 * 1024  # per block on Hopper


def shared_memory_bytes(head_dim: int, block_size: int, itemsize: int, *, pages_per_tile: int,
                        num_stages: int, num_splits: int) -> int:
    """Shared memory of one block: K and V stages, the q tile, the output tile (+ barriers, lse)."""
    kv = 2 * num_stages * pages_per_tile * block_size * head_dim * itemsize
    out = BLOCK_M * head_dim * 4 + BLOCK_M * 4 if num_splits > 1 else BLOCK_M * head_dim * itemsize
    return kv + BLOCK_M * head_dim * itemsize + out + 1024


def default_decode_tuning(num_seqs: int, num_kv_heads: int, block_size: int,
                          max_context: int) -> dict[str, Any]:
    """pages_per_tile / num_stages / num_splits for a decode batch.

    From the H200 sweep (bench/attention_mgpu.py, notes_attention.md, 2026-12-01): tiles of 128 tokens
    (64 when the whole context fits in one), two in flight, KV heads innermost in the grid (1-3% over
    heads outermost); split-K only while there are fewer than ~2 (sequence, head) programs per SM,
    keeping >= 2 tiles per split.
    """
    tile_tokens = 64 if max_context <= 64 else 128
    pages_per_tile = max(1, tile_tokens // block_size)
    programs = max(num_seqs * num_kv_heads, 1)
    tiles = max(-(-max_context // (pages_per_tile * block_size)), 1)
    num_splits = max(1, min(-(-264 // programs), tiles // 2, 16))
    return {"pages_per_tile": pages_per_tile, "num_stages": 2, "num_splits": num_splits,
            "heads_inner": True}


def paged_decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    kv_lens: jax.Array,
    block_tables: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    interpret: bool = False,
    num_q_heads: int | None = None,
    **tuning: Any,
) -> jax.Array:
    """Attention of one new token per sequence over its paged context.

    q: [S, num_q_heads, head_dim] (token s belongs to sequence s), or already grouped as the kernel reads
    it, [S, num_kv_heads, group_pad(group), head_dim] with zero rows past each group (`group_pad`; as
    kernels_pallas/rope_kv_write.py writes it) and `num_q_heads` given; k_cache, v_cache: [num_blocks,
    block_size, num_kv_heads, head_dim] (already holding this step's K/V); kv_lens: int32[S] (0 for
    padded slots, whose rows come out as zeros); block_tables: int32[S, max_blocks].
    Returns [S, num_q_heads, head_dim] in q's dtype.
    `tuning`: pages_per_tile (KV pages per pipeline stage; tile = pages * block_size tokens, a multiple
    of 64), num_stages (tiles in flight per block), num_splits (split-K factor), heads_inner (grid order:
    the KV heads of a sequence in adjacent blocks).
    Constraints: bf16 or fp16; head_dim a multiple of 64; group = q heads per KV head <= 64.
    """
    _, block_size, num_kv_heads, _ = k_cache.shape
    if q.ndim == 4:
        if num_q_heads is None or num_q_heads % num_kv_heads:
            raise ValueError(f"grouped q {q.shape} needs num_q_heads, a multiple of {num_kv_heads=}; got "
                             f"{num_q_heads}")
        want = (q.shape[0], num_kv_heads, group_pad(num_q_heads // num_kv_heads), q.shape[3])
        if q.shape != want:
            raise ValueError(f"grouped q must be [S, num_kv_heads, group_pad, head_dim] = {want}, "
                             f"got {q.shape}")
    elif num_q_heads not in (None, q.shape[1]):
        raise ValueError(f"num_q_heads={num_q_heads} differs from q's {q.shape[1]} heads")
    num_seqs, head_dim, num_q_heads = q.shape[0], q.shape[-1], num_q_heads or q.shape[1]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads=} is not a multiple of {num_kv_heads=}")
    if kv_lens.shape != (num_seqs,) or block_tables.shape[0] != num_seqs:
        raise ValueError(f"one query token per sequence: q has {num_seqs} rows, kv_lens {kv_lens.shape}, "
                         f"block_tables {block_tables.shape}")
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k_cache.dtype != q.dtype:
        raise ValueError(f"q and the cache must both be bf16 or fp16, got {q.dtype} and {k_cache.dtype}")
    if head_dim % 64:
        raise ValueError(f"{head_dim=} must be a multiple of 64")
    params = default_decode_tuning(num_seqs, num_kv_heads, block_size, block_tables.shape[1] * block_size)
    unknown = set(tuning) - set(params)
    if unknown:
        raise TypeError(f"unknown tuning arguments {sorted(unknown)}")
    params.update(tuning)
    if (params["pages_per_tile"] * block_size) % 64:  # the PV wgmma's K dimension
        raise ValueError(f"pages_per_tile * block_size must be a multiple of 64, got "
                         f"{params['pages_per_tile']} * {block_size}")
    smem = shared_memory_bytes(head_dim, block_size, q.dtype.itemsize,
                               pages_per_tile=params["pages_per_tile"], num_stages=params["num_stages"],
                               num_splits=params["num_splits"])
    if smem > SMEM_LIMIT:
        raise ValueError(f"tuning {params} needs {smem} bytes of shared memory (limit {SMEM_LIMIT}); "
                         "lower num_stages or pages_per_tile")
    if num_q_heads // num_kv_heads > BLOCK_M:
        raise ValueError(f"at most {BLOCK_M} q heads per KV head, got {num_q_heads // num_kv_heads}")
    args = (q, k_cache, v_cache, jnp.asarray(kv_lens, jnp.int32), jnp.asarray(block_tables, jnp.int32))
    static = dict(sm_scale=float(sm_scale), sliding_window=sliding_window, soft_cap=soft_cap,
                  num_q_heads=num_q_heads, **params)
    if interpret:
        return _paged_decode(*args, interpret=True, **static)
    signature = tuple((tuple(a.shape), jnp.dtype(a.dtype).name) for a in args)
    return _lowered_once(signature, tuple(sorted(static.items())), _platform()).call(*args)


def _platform() -> str:
    """The jax.export platform name of the default backend ("cuda" for a GPU)."""
    backend = jax.default_backend()
    return "cuda" if backend == "gpu" else backend


@functools.lru_cache(maxsize=64)
def _lowered_once(signature: tuple[tuple[tuple[int, ...], str], ...], static: tuple[tuple[str, Any], ...],
                  platform: str) -> Any:
    """The compiled kernel for one static signature, lowered once per process as a `jax.export.Exported`
    whose `.call` every program embeds.

    Lowering this Mosaic GPU kernel takes ~0.67 s, most of a decode program's lowering, and the same
    kernel sits in every K-step decode program, both sampling modes and the mixed programs with the same
    sequence slots: lowered in each, a warm start-up (cache hits still lower every program to find its
    key) and `--precompile` repeat that work per program. On an H200 (Llama-3-8B shape) this cut a warm
    start-up's lowering from 5.3 to 1.8 s (bench/results/probe_startup_601ed34.json). A JAX whose export
    refuses the kernel gets `InlineKernel` (lowered in each program, as before), with a warning."""
    from jax import export

    fn = jax.jit(functools.partial(_paged_decode, interpret=False, **dict(static)))
    avals = [jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)) for shape, dtype in signature]
    try:
        return export.export(fn, platforms=(platform,))(*avals)
    except Exception as e:  # noqa: BLE001 - any refusal: the inline path below raises real kernel errors
        warnings.warn(f"Mosaic decode kernel not exportable ({type(e).__name__}: {e}); it is lowered in "
                      "every program instead (slower start-up)", RuntimeWarning, stacklevel=2)
        return InlineKernel(static)


class InlineKernel(NamedTuple):
    """The compiled kernel lowered inside each calling program (`_lowered_once`'s fallback)."""

    static: tuple[tuple[str, Any], ...]

    def call(self, *args: jax.Array) -> jax.Array:
        return _paged_decode(*args, interpret=False, **dict(self.static))


def group_pad(group: int) -> int:
    """Rows of a head group's q tile: whole 8-row tiles (TMA boxes)."""
    return -(-group // 8) * 8


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "interpret",
                                             "pages_per_tile", "num_stages", "num_splits", "heads_inner",
                                             "memory_only", "num_q_heads"))
def _paged_decode(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, kv_lens: jax.Array,
                  block_tables: jax.Array, *, sm_scale: float, sliding_window: int | None,
                  soft_cap: float | None, interpret: bool, pages_per_tile: int, num_stages: int,
                  num_splits: int, heads_inner: bool = True, memory_only: bool = False,
                  num_q_heads: int | None = None) -> jax.Array:
    pl, plgpu = mosaic_gpu_modules()
    num_seqs, head_dim = q.shape[0], q.shape[-1]
    num_q_heads = num_q_heads or q.shape[1]
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_q_heads // num_kv_heads
    gpad = group_pad(group)
    block_kv = pages_per_tile * block_size
    dtype = q.dtype
    # Mosaic GPU takes only 256-byte aligned buffers; a caller's table or lengths may be a slice of a packed
    # buffer (the engine's are), so both are recomputed here into buffers of their own. Entries past each
    # context become page 0. (q is reshaped and padded below; unpadded, it must come aligned, as every
    # array XLA allocates does.)
    kv_lens = jnp.maximum(kv_lens, 0)
    used_pages = (kv_lens + block_size - 1) // block_size
    cols = jnp.arange(block_tables.shape[1], dtype=jnp.int32)
    block_tables = jnp.where(cols[None, :] < used_pages[:, None], block_tables, 0)
    # q rows of a head group are contiguous in [S, KVH, group_pad, D]; the padding rows are zeros.
    if q.ndim == 4:  # already grouped and padded (rope_kv_write)
        q4 = q
    else:
        q4 = jnp.pad(q.reshape(num_seqs, num_kv_heads, group, head_dim),
                     ((0, 0), (0, 0), (0, gpad - group), (0, 0)))
    split_out = num_splits > 1
    o_dtype = jnp.float32 if split_out else dtype
    # Only the group's real rows leave the kernel, so the result reshapes to [S, heads, D] without a slice.
    # The log-sum-exps keep whole 8-row tiles: TMA needs 16-byte strides, and the merge reads them anyway.
    out_types = (jax.ShapeDtypeStruct((num_seqs, num_kv_heads, num_splits, group, head_dim), o_dtype),
                 jax.ShapeDtypeStruct((num_seqs, num_kv_heads, num_splits, gpad), jnp.float32))
    scale2 = sm_scale * LOG2E

    def kernel(q_ref: Any, k_ref: Any, v_ref: Any, lens_ref: Any, bt_ref: Any, o_ref: Any, lse_ref: Any,
               q_smem: Any, k_smem: Any, v_smem: Any, o_smem: Any, lse_smem: Any, q_bar: Any, k_full: Any,
               v_full: Any, k_free: Any, v_free: Any, p_smem: Any = None) -> None:
        h, s, split = lax.axis_index("h"), lax.axis_index("s"), lax.axis_index("k")
        kv_len = lens_ref[s]
        lo = jnp.int32(0) if sliding_window is None else jnp.maximum(kv_len - sliding_window, 0)
        first, last = lo // block_kv, (kv_len + block_kv - 1) // block_kv
        per_split = (last - first + num_splits - 1) // num_splits
        start = first + split * per_split
        steps = jnp.maximum(jnp.minimum(start + per_split, last) - start, 0)
        last_page = (kv_len + block_size - 1) // block_size - 1

        @pl.when(lax.axis_index("wg") == 0)
        def _compute() -> None:
            # A block with no tile (an empty split, or a padded sequence slot: most blocks of a small
            # batch, whose split count follows the table width) only writes its empty result; it skips
            # the q copy, a global-memory round trip.
            @pl.when(steps > 0)
            def _load_q() -> None:
                q_smem[...] = jnp.zeros((BLOCK_M, head_dim), dtype)
                plgpu.commit_smem()
                plgpu.copy_gmem_to_smem(q_ref.at[s, h], q_smem.at[pl.ds(0, gpad)], q_bar)
                plgpu.barrier_wait(q_bar)

            row = plgpu.Layout.WGMMA.reduce(1)
            m0 = plgpu.layout_cast(jnp.full((BLOCK_M,), MASK_VALUE, jnp.float32), row)
            l0 = plgpu.layout_cast(jnp.zeros((BLOCK_M,), jnp.float32), row)
            acc0 = plgpu.layout_cast(jnp.zeros((BLOCK_M, head_dim), jnp.float32), plgpu.Layout.WGMMA)

            def tile_step(i: jax.Array, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
                acc, m, denom = carry
                slot = lax.rem(i, num_stages)
                plgpu.barrier_wait(k_full.at[slot])
                if memory_only:  # diagnostic: the page stream alone, no math (output is garbage)
                    plgpu.barrier_arrive(k_free.at[slot])
                    plgpu.barrier_wait(v_full.at[slot])
                    plgpu.barrier_arrive(v_free.at[slot])
                    return acc, m, denom + 1.0

                def qk_scope(acc_ref: Any) -> jax.Array:
                    plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].transpose((1, 0)))
                    return acc_ref[...]

                logits = pl.run_scoped(qk_scope, plgpu.ACC((BLOCK_M, block_kv), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                if soft_cap is None:
                    logits = logits * scale2
                else:
                    logits = (soft_cap * LOG2E) * jnp.tanh(logits * (sm_scale / soft_cap))
                pos = (start + i) * block_kv + plgpu.broadcasted_iota(
                    jnp.int32, (BLOCK_M, block_kv), 1, layout=plgpu.Layout.WGMMA)
                logits = jnp.where((pos < kv_len) & (pos >= lo), logits, MASK_VALUE)
                m_new = jnp.maximum(m, logits.max(axis=1))
                alpha = jnp.exp2(m - m_new)
                p = jnp.exp2(logits - lax.broadcast_in_dim(m_new, logits.shape, [0]))
                denom = denom * alpha + p.sum(axis=1)
                p16 = p.astype(dtype)
                plgpu.barrier_wait(v_full.at[slot])

                if p_smem is not None:  # interpret mode: its wgmma takes operands from shared memory only
                    p_smem[...] = p16
                    plgpu.commit_smem()

                def pv_scope(acc_ref: Any) -> jax.Array:
                    plgpu.wgmma(acc_ref, p16 if p_smem is None else p_smem, v_smem.at[slot])
                    return acc_ref[...]

                # A fresh accumulator per tile (added below) rather than wgmma into the running one:
                # the same registers, and the form the Mosaic GPU interpreter runs on the CPU.
                pv = pl.run_scoped(pv_scope, plgpu.ACC((BLOCK_M, head_dim), jnp.float32))
                plgpu.barrier_arrive(v_free.at[slot])
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv
                return acc, m_new, denom

            acc, m, denom = lax.fori_loop(0, steps, tile_step, (acc0, m0, l0))
            seen = denom > 0  # false only for an empty split or a padded sequence slot
            inv = jnp.where(seen, 1.0 / jnp.where(seen, denom, 1.0), 0.0)
            o_smem[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(o_smem.dtype)
            if split_out:
                lse_smem[...] = jnp.where(seen, m + jnp.log2(jnp.where(seen, denom, 1.0)), -jnp.inf)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, group)], o_ref.at[s, h, split])
            if split_out:
                plgpu.copy_smem_to_gmem(lse_smem.at[pl.ds(0, gpad)], lse_ref.at[s, h, split])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(lax.axis_index("wg") == 1)
        def _memory() -> None:
            def fetch(i: jax.Array, slot: jax.Array, wait: bool) -> None:
                # Page ids first: their loads are in flight while this warpgroup waits for the slot.
                # Columns past the context are clamped to its last page (masked anyway).
                pages = [bt_ref[s, jnp.minimum((start + i) * pages_per_tile + j, last_page)]
                         for j in range(pages_per_tile)]
                streams = ((k_ref, k_smem, k_full, k_free), (v_ref, v_smem, v_full, v_free))
                for cache, smem, full, free in streams:
                    if wait:
                        plgpu.barrier_wait(free.at[slot])
                    for j, page in enumerate(pages):  # one TMA per page; `full` expects all of them
                        dst = smem.at[slot, pl.ds(j * block_size, block_size)]
                        plgpu.copy_gmem_to_smem(cache.at[page, :, h], dst, full.at[slot])

            for i in range(num_stages):
                pl.when(i < steps)(functools.partial(fetch, jnp.int32(i), jnp.int32(i), False))

            def refill(i: jax.Array, _: Any) -> None:
                fetch(i, lax.rem(i, num_stages), True)

            lax.fori_loop(jnp.int32(num_stages), jnp.maximum(steps, num_stages), refill, None)

            # Observe each used slot's last release, so no barrier phase is left unobserved at exit.
            def drain(j: int) -> None:
                plgpu.barrier_wait(k_free.at[j])
                plgpu.barrier_wait(v_free.at[j])

            for j in range(num_stages):
                pl.when(j < steps)(functools.partial(drain, j))

    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = [
        plgpu.SMEM((BLOCK_M, head_dim), dtype, transforms=tiled),
        plgpu.SMEM((num_stages, block_kv, head_dim), dtype, transforms=tiled),
        plgpu.SMEM((num_stages, block_kv, head_dim), dtype, transforms=tiled),
        plgpu.SMEM((BLOCK_M, head_dim), o_dtype),  # untiled: a TMA store of just the group's rows
        plgpu.SMEM((BLOCK_M,), jnp.float32) if split_out else None,
        plgpu.Barrier(),
        plgpu.Barrier(num_arrivals=pages_per_tile, num_barriers=num_stages),
        plgpu.Barrier(num_arrivals=pages_per_tile, num_barriers=num_stages),
        plgpu.Barrier(num_barriers=num_stages),
        plgpu.Barrier(num_barriers=num_stages),
    ]
    if interpret:
        scratch.append(plgpu.SMEM((BLOCK_M, block_kv), dtype, transforms=tiled))
    call = plgpu.kernel(
        kernel, out_type=out_types, scratch_types=scratch,
        # The last grid axis varies fastest. Heads innermost: the KV heads of one page ([block_size,
        # num_kv_heads, head_dim], contiguous) are read by blocks running at the same time.
        **(dict(grid=(num_seqs, num_splits, num_kv_heads), grid_names=("s", "k", "h")) if heads_inner
           else dict(grid=(num_kv_heads, num_seqs, num_splits), grid_names=("h", "s", "k"))),
        num_threads=2, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **({"interpret": plgpu.InterpretGPUParams()} if interpret else {}),
    )
    o, lse = call(q4, k_cache, v_cache, kv_lens, block_tables)
    lse = lse[..., :group]
    out = merge_splits(jnp.moveaxis(o, 2, 0), jnp.moveaxis(lse, 2, 0)) if split_out else o[:, :, 0]
    if split_out:  # padded slots: every split empty, 0/0 in the merge
        out = jnp.where((kv_lens > 0)[:, None, None, None], out, 0.0)
    return out.reshape(num_seqs, num_q_heads, head_dim).astype(dtype)


def supports(q: jax.Array, k_cache: jax.Array) -> bool:
    """Whether `paged_decode_attention` accepts these shapes/dtypes (else use the ragged kernel)."""
    num_q_heads, head_dim = q.shape[1:]
    num_kv_heads = k_cache.shape[2]
    return (q.dtype in (jnp.bfloat16, jnp.float16) and k_cache.dtype == q.dtype and head_dim % 64 == 0
            and num_q_heads % num_kv_heads == 0 and num_q_heads // num_kv_heads <= BLOCK_M)
