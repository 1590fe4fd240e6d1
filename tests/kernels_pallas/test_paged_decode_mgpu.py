"""The Mosaic GPU paged decode kernel against the pure-JAX reference.

On a GPU the compiled kernel runs; on the CPU JAX's Mosaic GPU interpreter does (jax >= 0.11; with an
older JAX those tests skip). Input validation is checked everywhere.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import ragged_paged_attention_reference
from kernels_pallas._lowering import mosaic_gpu_interpretable
from kernels_pallas.paged_decode_mgpu import default_decode_tuning, paged_decode_attention
from kernels_pallas.testing import make_ragged_batch, relative_error

ON_GPU = jax.default_backend() == "gpu"
needs_kernel = pytest.mark.skipif(
    not (ON_GPU or mosaic_gpu_interpretable()),
    reason=f"the Mosaic GPU interpreter needs jax >= 0.11 (have {jax.__version__}) and no GPU is present")


def _decode_batch(kv_lens: list[int], *, num_q_heads: int = 8, num_kv_heads: int = 2, head_dim: int = 128,
                  block_size: int = 16, pad_seqs: int = 0, seed: int = 0):
    """One query token per sequence, bf16, garbage (out-of-range) page ids past each context."""
    rng = np.random.default_rng(seed)
    batch = make_ragged_batch(rng, [1] * len(kv_lens), kv_lens, num_q_heads=num_q_heads,
                              num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
                              pad_seqs=pad_seqs, pad_tokens=pad_seqs, extra_pages=2)
    q, k, v, lens, tables, qsl, n = batch.args()
    return q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), lens, tables, qsl, n


def _check(kv_lens: list[int], *, sliding_window=None, soft_cap=None, pad_seqs: int = 0, shape=None,
           **tuning) -> None:
    """Kernel == reference on every real sequence (bf16 tolerance); padded slots come out as zeros."""
    q, k, v, lens, tables, qsl, n = _decode_batch(kv_lens, pad_seqs=pad_seqs, **(shape or {}))
    kw = dict(sm_scale=q.shape[-1] ** -0.5, sliding_window=sliding_window, soft_cap=soft_cap)
    out = np.asarray(paged_decode_attention(q, k, v, lens, tables, interpret=not ON_GPU, **kw, **tuning),
                     np.float32)
    ref = np.asarray(ragged_paged_attention_reference(q, k, v, lens, tables, qsl, n, **kw), np.float32)
    real = len(kv_lens)
    assert np.isfinite(out).all()
    assert relative_error(out[:real], ref[:real]) < 1e-2
    assert not out[real:].any(), "padded sequence slots must give zeros"


@needs_kernel
def test_decode_matches_reference_across_tile_boundaries():
    """Contexts of 1, 63, 64, 65, 200 tokens (64-token tiles), one split, a padded slot: as the reference."""
    _check([1, 63, 64, 65, 200], pad_seqs=1, num_splits=1, pages_per_tile=4, num_stages=2)


@needs_kernel
def test_metadata_sliced_from_one_packed_buffer():
    """Lengths and tables sliced at odd offsets of one buffer inside a jit (as the engine packs its inputs):
    the kernel still gets aligned copies (Mosaic GPU refuses unaligned buffers) and the same result."""
    q, k, v, lens, tables, qsl, n = _decode_batch([5, 90, 200])
    packed = jnp.concatenate([jnp.arange(3, dtype=jnp.int32), lens, tables.ravel()])

    @jax.jit
    def run(q, k, v, packed):
        s = lens.shape[0]
        return paged_decode_attention(q, k, v, packed[3:3 + s], packed[3 + s:].reshape(tables.shape),
                                      sm_scale=0.125, interpret=not ON_GPU)

    out = np.asarray(run(q, k, v, packed), np.float32)
    ref = ragged_paged_attention_reference(q, k, v, lens, tables, qsl, n, sm_scale=0.125)
    ref = np.asarray(ref, np.float32)
    assert relative_error(out, ref) < 1e-2


@needs_kernel
def test_split_k_merge_matches_reference_with_empty_splits():
    """Three splits over contexts of 30 and 300 tokens (the short one leaves splits empty) merge exactly."""
    _check([30, 300], num_splits=3, pages_per_tile=4, num_stages=3)


@needs_kernel
def test_sliding_window_and_soft_cap():
    """Mistral's window (a query at p sees p-W+1..p) and Gemma-2's logit soft cap, with splits."""
    _check([40, 170], sliding_window=50, soft_cap=30.0, num_splits=2, pages_per_tile=4, num_stages=2)


@needs_kernel
@pytest.mark.parametrize("shape, tuning", [
    (dict(num_q_heads=4, num_kv_heads=4, head_dim=64, block_size=8), dict(pages_per_tile=8)),  # MHA, d 64
    (dict(num_q_heads=16, num_kv_heads=1, block_size=32), dict(pages_per_tile=2)),  # group 16 (> 8 rows)
])
def test_head_layouts_and_block_sizes(shape, tuning):
    """MHA with head_dim 64 and 8-token pages; a 16-head group with 32-token pages."""
    _check([17, 130], shape=shape, num_splits=2, num_stages=2, **tuning)


@needs_kernel
@pytest.mark.parametrize("heads_inner", [False, True])
def test_grid_orders_give_the_same_result(heads_inner):
    """KV heads outermost or innermost in the grid (only the blocks' order changes): as the reference."""
    _check([33, 190], pad_seqs=1, num_splits=2, pages_per_tile=4, num_stages=2, heads_inner=heads_inner)


@needs_kernel
def test_grouped_q_input_gives_the_same_result():
    """q handed over already grouped and padded ([S, kv_heads, 8, D], as rope_kv_write writes it) gives
    the flat q's result bit for bit, with and without splits."""
    q, k, v, lens, tables, _, _ = _decode_batch([20, 150], pad_seqs=1)
    s, heads, d = q.shape
    grouped = jnp.pad(q.reshape(s, 2, heads // 2, d), ((0, 0), (0, 0), (0, 4), (0, 0)))
    for splits in (1, 3):
        kw = dict(sm_scale=d**-0.5, interpret=not ON_GPU, num_splits=splits, pages_per_tile=4)
        flat = paged_decode_attention(q, k, v, lens, tables, **kw)
        got = paged_decode_attention(grouped, k, v, lens, tables, num_q_heads=heads, **kw)
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(flat, np.float32))


def test_grouped_q_needs_its_head_count_and_shape():
    """Grouped q without num_q_heads, or not padded to whole 8-row tiles: refused, naming what is expected."""
    cache = jnp.zeros((4, 16, 2, 128), jnp.bfloat16)
    lens, tables = jnp.ones((2,), jnp.int32), jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(ValueError, match="needs num_q_heads"):
        paged_decode_attention(jnp.zeros((2, 2, 8, 128), jnp.bfloat16), cache, cache, lens, tables,
                               sm_scale=0.1)
    with pytest.raises(ValueError, match="group_pad"):
        paged_decode_attention(jnp.zeros((2, 2, 4, 128), jnp.bfloat16), cache, cache, lens, tables,
                               sm_scale=0.1, num_q_heads=8)


@pytest.fixture
def fresh_export_cache():
    """An empty per-signature export cache, emptied again afterwards (also when the test fails), so no
    stand-in kernel outlives its test."""
    import kernels_pallas.paged_decode_mgpu as mgpu

    mgpu._lowered_once.cache_clear()
    yield
    mgpu._lowered_once.cache_clear()


def _kernel_stand_in(traced: list[int]):
    """A pure-JAX stand-in for the compiled kernel (so the compiled path runs on the CPU), recording the
    split count of each trace."""

    def stand_in(q, k, v, lens, tables, *, interpret, sm_scale, sliding_window, soft_cap, **tuning):
        traced.append(tuning["num_splits"])
        qsl = jnp.arange(q.shape[0] + 1, dtype=jnp.int32)
        return ragged_paged_attention_reference(q, k, v, lens, tables, qsl, jnp.int32(q.shape[0]),
                                                sm_scale=sm_scale, sliding_window=sliding_window,
                                                soft_cap=soft_cap)

    return stand_in


def test_compiled_kernel_is_lowered_once_per_signature(monkeypatch: pytest.MonkeyPatch, fresh_export_cache):
    """The compiled path lowers the kernel once per static signature and embeds that export in every
    program: two programs with the same shapes and tuning trace it once, another tuning once more, and
    the results are the direct call's."""
    import kernels_pallas.paged_decode_mgpu as mgpu

    traced: list[int] = []
    stand_in = _kernel_stand_in(traced)
    monkeypatch.setattr(mgpu, "_paged_decode", stand_in)
    q, k, v, lens, tables, qsl, n = _decode_batch([5, 90, 200])

    def attend(splits: int) -> jax.Array:
        return paged_decode_attention(q, k, v, lens, tables, sm_scale=0.125, num_splits=splits)

    doubled = jax.jit(lambda: attend(2) * 2)()
    plus_one = jax.jit(lambda: attend(2) + 1)()
    jax.jit(lambda: attend(3))()
    assert traced == [2, 3]
    want = np.asarray(stand_in(q, k, v, lens, tables, interpret=False, sm_scale=0.125, sliding_window=None,
                               soft_cap=None, num_splits=2), np.float32)
    np.testing.assert_allclose(np.asarray(doubled, np.float32), 2 * want, rtol=1e-2)
    np.testing.assert_allclose(np.asarray(plus_one, np.float32), want + 1, rtol=1e-2)


def test_kernel_that_cannot_be_exported_is_lowered_in_each_program(monkeypatch: pytest.MonkeyPatch,
                                                                    fresh_export_cache):
    """If jax.export refuses the kernel, a warning says so and every program lowers it itself, with the
    same results."""
    from jax import export

    import kernels_pallas.paged_decode_mgpu as mgpu

    traced: list[int] = []
    monkeypatch.setattr(mgpu, "_paged_decode", _kernel_stand_in(traced))

    def refuse(*args, **kwargs):
        raise ValueError("custom call target not allowed")

    monkeypatch.setattr(export, "export", refuse)
    q, k, v, lens, tables, qsl, n = _decode_batch([5, 90])
    with pytest.warns(RuntimeWarning, match="not exportable"):
        out = jax.jit(lambda: paged_decode_attention(q, k, v, lens, tables, sm_scale=0.125, num_splits=2))()
    jax.jit(lambda: paged_decode_attention(q, k, v, lens, tables, sm_scale=0.125, num_splits=2) + 1)()
    assert traced == [2, 2]
    ref = ragged_paged_attention_reference(q, k, v, lens, tables, qsl, n, sm_scale=0.125)
    assert relative_error(np.asarray(out, np.float32), np.asarray(ref, np.float32)) < 1e-2


def test_default_tuning_splits_small_batches_and_keeps_tiles_whole():
    """Few (sequence, head) programs get split-K to fill the GPU; tiles are whole multiples of 64 tokens."""
    one = default_decode_tuning(1, 8, 16, 4096)
    many = default_decode_tuning(256, 8, 16, 512)
    assert one["num_splits"] > 1 and many["num_splits"] == 1
    for block_size in (8, 16, 32, 64, 128):
        cfg = default_decode_tuning(4, 8, block_size, 1024)
        assert cfg["pages_per_tile"] * block_size % 64 == 0


@pytest.mark.parametrize("change, message", [
    (dict(dtype=jnp.float32), "bf16 or fp16"),
    (dict(head_dim=96), "head_dim"),
    (dict(tuning=dict(pages_per_tile=3)), "multiple of 64"),
    (dict(tuning=dict(num_stages=8, pages_per_tile=8)), "shared memory"),
    (dict(tuning=dict(block_q=16)), "unknown tuning"),
    (dict(lens_rows=3), "one query token per sequence"),
])
def test_bad_input_is_refused_with_the_argument_named(change, message):
    """Wrong dtype, head_dim, tile, shared-memory budget, tuning key or row count: a clear error up front."""
    head_dim = change.get("head_dim", 128)
    dtype = change.get("dtype", jnp.bfloat16)
    q = jnp.zeros((2, 8, head_dim), dtype)
    cache = jnp.zeros((4, 16, 2, head_dim), dtype)
    lens = jnp.ones((change.get("lens_rows", 2),), jnp.int32)
    tables = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises((ValueError, TypeError), match=message):
        paged_decode_attention(q, cache, cache, lens, tables, sm_scale=0.1, **change.get("tuning", {}))
