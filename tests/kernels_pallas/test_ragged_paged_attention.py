"""Pallas ragged paged attention (interpret mode on CPU) against the pure-JAX reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels_pallas import ragged_paged_attention, ragged_paged_attention_reference
from kernels_pallas.ragged_paged_attention import tile_metadata
from kernels_pallas.testing import make_ragged_batch, relative_error

# Deterministic and quick: every example recompiles, so keep the count small.
FAST = settings(max_examples=8, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
ON_GPU = jax.default_backend() == "gpu"


def _check(batch, *, tol: float, sliding_window=None, soft_cap=None, **tuning) -> None:
    """Kernel == reference on real tokens; padding tokens are exactly zero; no NaN anywhere."""
    if ON_GPU and batch.q.dtype == jnp.float32:
        # Compiled, the kernel's f32 dots run on tensor cores in TF32 (10-bit mantissa): 2.0-2.3e-4
        # relative error on an H200 (bench/notes_bench.md, 2026-12-01, fifth session), not 1e-5.
        tol = max(tol, 1e-3)
    head_dim = batch.q.shape[-1]
    kwargs = dict(sm_scale=head_dim**-0.5, sliding_window=sliding_window, soft_cap=soft_cap)
    out = np.asarray(ragged_paged_attention(*batch.args(), interpret=not ON_GPU, **kwargs, **tuning),
                     np.float32)
    ref = np.asarray(ragged_paged_attention_reference(*batch.args(), **kwargs), np.float32)
    real = int(batch.query_start_loc[batch.num_seqs])
    assert np.isfinite(out).all()
    assert relative_error(out[:real], ref[:real]) < tol
    assert not out[real:].any(), "padding tokens must give zeros"


@st.composite
def ragged_batches(draw, mode: str):
    """Lengths for a decode-only, prefill-only or mixed batch (1..4 sequences)."""
    n = draw(st.integers(1, 4))
    kv_lens, q_lens = [], []
    for _ in range(n):
        kv = draw(st.integers(1, 70))
        is_decode = mode == "decode" or (mode == "mixed" and draw(st.booleans()))
        q = 1 if is_decode else draw(st.integers(1, kv))
        kv_lens.append(kv)
        q_lens.append(q)
    return q_lens, kv_lens


def _batch(q_lens, kv_lens, *, group: int, head_dim: int = 32, block_size: int = 8, seed: int = 0,
           dtype=np.float32, kv_heads: int = 2, **kw):
    return make_ragged_batch(np.random.default_rng(seed), q_lens, kv_lens, num_q_heads=kv_heads * group,
                             num_kv_heads=kv_heads, head_dim=head_dim, block_size=block_size, dtype=dtype,
                             **kw)


# "mixed" batches hold decode and prefill rows, so for the kernel variants it alone runs in the suite; the
# pure kinds are -m slow.
MIXED_IN_SUITE = ["mixed", pytest.param("decode", marks=pytest.mark.slow),
                  pytest.param("prefill", marks=pytest.mark.slow)]


@pytest.mark.parametrize("mode", ["decode", pytest.param("prefill", marks=pytest.mark.slow), "mixed"])
@FAST
@given(data=st.data())
def test_random_ragged_batches_match_reference(mode: str, data: st.DataObject) -> None:
    """Any ragged batch (with padding tokens, padded slots, stale table entries) equals the oracle."""
    q_lens, kv_lens = data.draw(ragged_batches(mode))
    group = data.draw(st.sampled_from([1, 4]))
    batch = _batch(q_lens, kv_lens, group=group, pad_tokens=data.draw(st.integers(0, 3)),
                   pad_seqs=data.draw(st.integers(0, 2)), extra_pages=data.draw(st.integers(0, 2)))
    _check(batch, tol=1e-5, fuse_heads=False, block_q=data.draw(st.sampled_from([1, 4])),
           pages_per_block=2, num_splits=data.draw(st.sampled_from([1, 3])),
           heads_inner=data.draw(st.booleans()))


@pytest.mark.parametrize("mode", MIXED_IN_SUITE)
@FAST
@given(data=st.data())
def test_fused_heads_kernel_matches_reference(mode: str, data: st.DataObject) -> None:
    """Fused-heads kernel (all KV heads per program, block-diagonal head mask) on any ragged batch."""
    q_lens, kv_lens = data.draw(ragged_batches(mode))
    batch = _batch(q_lens, kv_lens, group=data.draw(st.sampled_from([1, 3, 4])),
                   kv_heads=data.draw(st.sampled_from([1, 2, 4])), pad_tokens=data.draw(st.integers(0, 3)),
                   pad_seqs=data.draw(st.integers(0, 2)), extra_pages=data.draw(st.integers(0, 2)))
    _check(batch, tol=1e-5, fuse_heads=True, block_q=data.draw(st.sampled_from([1, 2])),
           pages_per_block=data.draw(st.sampled_from([1, 2])), num_splits=data.draw(st.sampled_from([1, 3])))


@pytest.mark.parametrize("mode", MIXED_IN_SUITE)
@FAST
@given(data=st.data())
def test_row_gather_single_loop_heavy_first_match_reference(mode: str, data: st.DataObject) -> None:
    """The 2026-11-25 knobs (flat row gather, one masked KV loop, longest tiles first) on ragged batches."""
    q_lens, kv_lens = data.draw(ragged_batches(mode))
    batch = _batch(q_lens, kv_lens, group=data.draw(st.sampled_from([1, 4])),
                   pad_tokens=data.draw(st.integers(0, 3)), pad_seqs=data.draw(st.integers(0, 2)),
                   extra_pages=data.draw(st.integers(0, 2)))
    window = data.draw(st.sampled_from([None, 6]))
    _check(batch, tol=1e-5, sliding_window=window, fuse_heads=False,
           block_q=data.draw(st.sampled_from([1, 4])), pages_per_block=data.draw(st.sampled_from([1, 2])),
           num_splits=data.draw(st.sampled_from([1, 3])),
           heads_inner=data.draw(st.booleans()), row_gather=data.draw(st.booleans()),
           single_loop=data.draw(st.booleans()), heavy_first=data.draw(st.booleans()))


def test_fused_heads_rejects_per_head_knobs() -> None:
    batch = _batch([1, 1], [9, 20], group=2)
    with pytest.raises(ValueError, match="per-head"):
        ragged_paged_attention(*batch.args(), sm_scale=1.0, interpret=True, fuse_heads=True, row_gather=True)


def test_sort_tiles_by_work_puts_longest_first() -> None:
    """heavy_first reorders tile rows by visible KV extent; padding and empty tiles go last."""
    from kernels_pallas.ragged_paged_attention import sort_tiles_by_work

    qsl = jnp.asarray([0, 8, 9, 9], jnp.int32)  # seq 0: 8-token chunk @ 20, seq 1: decode @ 30, 1 pad slot
    meta = tile_metadata(12, 4, jnp.asarray([20, 30, 0], jnp.int32), qsl, jnp.int32(2), cover_padding=True)
    rows = [tuple(int(x) for x in r) for r in np.asarray(sort_tiles_by_work(meta, 4))]
    assert rows[:3] == [(1, 8, 9, 30), (0, 4, 8, 20), (0, 0, 8, 20)]
    assert rows[3] == (0, 9, 12, 0)  # the padding tokens' tile: empty context, writes zeros


@pytest.mark.parametrize("sliding_window,soft_cap", [(5, None), (16, None), (None, 3.0), (7, 10.0)])
@pytest.mark.parametrize("pages_per_block", [1, 2])
def test_fused_heads_window_soft_cap_and_splits(sliding_window, soft_cap, pages_per_block: int) -> None:
    """Fused-heads kernel with a window / soft cap, more splits than pages, and bf16 inputs."""
    batch = _batch([1, 1, 1, 2], [50, 33, 64, 9], group=4, pad_tokens=1, pad_seqs=1, dtype=jnp.bfloat16)
    _check(batch, tol=1e-2, sliding_window=sliding_window, soft_cap=soft_cap, fuse_heads=True,
           block_q=1, pages_per_block=pages_per_block, num_splits=12)


def test_decode_default_tuning() -> None:
    """Decode: per-head kernel, >= 4 splits up to ~2 programs per SM, heads-inner grid from 8 seqs."""
    from kernels_pallas.ragged_paged_attention import default_tuning

    dec = default_tuning(64, 64, 4, 4096, 8)
    assert not dec["fuse_heads"] and dec["num_splits"] == 4 and dec["heads_inner"]
    assert dec["row_gather"] and dec["single_loop"] and not dec["heavy_first"]
    assert default_tuning(8, 8, 4, 32768, 8)["num_splits"] == 4
    one = default_tuning(1, 1, 4, 4096, 8)
    assert one["num_splits"] == 16 and not one["heads_inner"]
    assert default_tuning(1, 1, 4, 16, 8)["num_splits"] == 1  # one 128-token block: nothing to split
    prefill = default_tuning(4096, 1, 4, 4096, 8)
    assert prefill["num_splits"] == 1 and not prefill["heads_inner"]
    assert prefill["heavy_first"] and prefill["row_gather"] and prefill["block_q"] * 4 == 128


def test_default_tuning_sizes_kv_steps_in_tokens() -> None:
    """Larger pages give fewer pages per KV step, not larger tiles (64-token pages overflowed shared
    memory on the GPU with 8 pages per step)."""
    from kernels_pallas.ragged_paged_attention import default_tuning

    for shape in ((64, 64, 4, 4096, 8), (4096, 1, 4, 4096, 8), (600, 20, 4, 1024, 8), (512, 1, 4, 512, 8)):
        tokens = {bs: default_tuning(*shape, block_size=bs)["pages_per_block"] * bs for bs in (16, 32, 64)}
        assert len(set(tokens.values())) == 1, tokens
    assert default_tuning(64, 64, 4, 4096, 8, block_size=256)["pages_per_block"] == 1


def test_fused_heads_rejects_non_power_of_two_kv_heads() -> None:
    batch = _batch([1, 1], [9, 20], group=2, kv_heads=3)
    with pytest.raises(ValueError, match="power-of-two"):
        ragged_paged_attention(*batch.args(), sm_scale=1.0, interpret=True, fuse_heads=True)


@pytest.mark.parametrize("kv_len", [8, 16, 17, 31, 32, 33])
def test_lengths_at_block_boundaries(kv_len: int) -> None:
    """Context lengths on and next to page (8) and compute-block (16) boundaries."""
    batch = _batch([1, kv_len, 3], [kv_len, kv_len, kv_len], group=4)
    _check(batch, tol=1e-5, block_q=4, pages_per_block=2, num_splits=1)


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_mha_gqa_and_head_dims(group: int, head_dim: int) -> None:
    """MHA, GQA with a power-of-two group and with an odd group (padded), head_dim 64 and 128."""
    batch = _batch([1, 5, 12], [9, 20, 40], group=group, head_dim=head_dim, pad_tokens=2)
    _check(batch, tol=1e-5, block_q=4, pages_per_block=2, num_splits=2)


@pytest.mark.parametrize("sliding_window,soft_cap", [(5, None), (16, None), (None, 3.0), (7, 10.0)])
def test_sliding_window_and_soft_cap(sliding_window, soft_cap) -> None:
    """Sliding window (inside and across blocks) and logit soft-capping, alone and together."""
    batch = _batch([1, 9, 30], [50, 33, 64], group=4, pad_tokens=1)
    _check(batch, tol=1e-5, sliding_window=sliding_window, soft_cap=soft_cap, block_q=4,
           pages_per_block=2, num_splits=3)


def test_bf16_inputs() -> None:
    """bf16 q/K/V: fp32 accumulation keeps the error at bf16 rounding of the output."""
    batch = _batch([1, 7, 20], [30, 40, 20], group=4, dtype=jnp.bfloat16, pad_tokens=2)
    _check(batch, tol=1e-2, block_q=4, pages_per_block=2, num_splits=2)


def test_default_tuning_decode_and_prefill_shapes() -> None:
    """The wrapper's default tuning (no knobs passed) is valid for decode- and prefill-shaped calls."""
    _check(_batch([1] * 4, [40, 3, 17, 64], group=4), tol=1e-5)
    _check(_batch([24, 40], [30, 40], group=4, block_size=16), tol=1e-5)
    _check(_batch([1] * 3, [40, 3, 17], group=3, kv_heads=3), tol=1e-5)  # odd group and KV heads
    _check(_batch([1] * 9, [40, 3, 17, 8, 1, 64, 30, 2, 9], group=4), tol=1e-5)  # heads-inner grid


@settings(max_examples=12, deadline=None, derandomize=True)
@given(q_lens=st.lists(st.integers(0, 20), min_size=1, max_size=6), block_q=st.sampled_from([1, 2, 4, 8]),
       pad=st.integers(0, 5))
def test_tiles_cover_every_real_token_once(q_lens: list[int], block_q: int, pad: int) -> None:
    """Tile metadata: each real token lies in exactly one tile of its own sequence; bound holds."""
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    num_tokens = int(qsl[-1]) + pad
    if num_tokens == 0:
        return
    meta = np.asarray(tile_metadata(num_tokens, block_q, jnp.asarray(q_lens, jnp.int32) + 3,
                                    jnp.asarray(qsl), jnp.int32(len(q_lens))))
    hits = np.zeros(num_tokens, int)
    for seq, q0, q_end, kv_len in meta:
        for t in range(q0, min(q0 + block_q, q_end)):
            assert qsl[seq] <= t < qsl[seq + 1] and kv_len == q_lens[seq] + 3
            hits[t] += 1
    assert (hits[: qsl[-1]] == 1).all() and (hits[qsl[-1]:] == 0).all()
    # cover_padding: padding tokens get their own tiles (seq 0, kv_len 0); real tiles unchanged
    meta = np.asarray(tile_metadata(num_tokens, block_q, jnp.asarray(q_lens, jnp.int32) + 3,
                                    jnp.asarray(qsl), jnp.int32(len(q_lens)), cover_padding=True))
    hits[:] = 0
    for seq, q0, q_end, kv_len in meta:
        for t in range(q0, min(q0 + block_q, q_end)):
            hits[t] += 1
            assert (kv_len == 0 and seq == 0) if t >= qsl[-1] else kv_len == q_lens[seq] + 3
    assert (hits == 1).all()


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
def test_compiled_kernel_on_gpu() -> None:
    """Compiled (Triton) kernel equals the reference on a bf16 mixed batch with block size 16."""
    batch = make_ragged_batch(np.random.default_rng(1), [1, 1, 100, 37], [300, 17, 100, 500],
                              num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
                              dtype=jnp.bfloat16, pad_tokens=5, pad_seqs=2)
    _check(batch, tol=2e-2)


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.parametrize("fuse_heads", [True, False])
def test_compiled_decode_kernels_on_gpu(fuse_heads: bool) -> None:
    """Compiled decode batch (T <= S, padded slots and tokens): default tuning, and the fused-heads kernel."""
    batch = make_ragged_batch(np.random.default_rng(2), [1] * 5, [300, 17, 1, 4096, 33],
                              num_q_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
                              dtype=jnp.bfloat16, pad_tokens=1, pad_seqs=3)
    extra = dict(fuse_heads=True, block_q=1, pages_per_block=1, num_splits=8) if fuse_heads else {}
    _check(batch, tol=2e-2, **extra)
