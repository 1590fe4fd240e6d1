"""rope_decode_attention (Pallas: compiled on a GPU, interpreted on the CPU) against its plain-JAX contract:
rope_kv_write's reference followed by the dense paged-attention reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.rope_decode_attention import (
    rope_decode_attention,
    rope_decode_attention_reference,
    supports,
)
from rtp_jax.models.rope import inv_frequencies

ON_GPU = jax.default_backend() == "gpu"
BF16_TOL = 1.6e-2  # a bf16 output compared with one computed in another summation order: ~2 roundings


def _case(*, kv: int = 2, group: int = 4, head_dim: int = 64, lens: tuple[int, ...] = (37, 1, 0, 200),
          splits: int = 0, block_size: int = 16, width: int = 16, seed: int = 0) -> tuple:
    """A decode batch of one token per slot; every slot owns its own pages, the new token's slot is the
    page entry of position kv_len - 1 (padded slots, kv_len 0, get an out-of-range slot)."""
    rng = np.random.default_rng(seed)
    t = len(lens)
    blocks = t * width + 1
    shape = (t, kv, group + 2, head_dim)
    h = (jnp.asarray(rng.standard_normal((splits, *shape)), jnp.float32) if splits
         else jnp.asarray(rng.standard_normal(shape), jnp.bfloat16))
    cache = (blocks, block_size, kv, head_dim)
    k_cache = jnp.asarray(rng.standard_normal(cache), jnp.bfloat16)
    v_cache = jnp.asarray(rng.standard_normal(cache), jnp.bfloat16)
    tables = (rng.permutation(blocks - 1) + 1)[: t * width].reshape(t, width).astype(np.int32)
    kv_lens = np.asarray(lens, np.int32)
    pos = np.maximum(kv_lens - 1, 0)
    slots = np.where(kv_lens > 0, tables[np.arange(t), pos // block_size] * block_size + pos % block_size,
                     blocks * block_size).astype(np.int32)
    inv_freq = jnp.asarray(inv_frequencies(head_dim, 500000.0, None))
    return h, jnp.asarray(pos), inv_freq, k_cache, v_cache, jnp.asarray(slots), jnp.asarray(kv_lens), \
        jnp.asarray(tables)


def _check(args: tuple, *, num_q_heads: int, sliding_window: int | None = None, soft_cap: float | None = None,
           pages_per_tile: int = 4) -> None:
    sm_scale = args[0].shape[-1] ** -0.5
    kw = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    want = rope_decode_attention_reference(*[jnp.array(a) for a in args], **kw)
    got = rope_decode_attention(*[jnp.array(a) for a in args], num_q_heads=num_q_heads,
                                pages_per_tile=pages_per_tile, interpret=not ON_GPU, **kw)
    assert got[0].shape == want[0].shape == (args[0].shape[-4], num_q_heads, args[0].shape[-1])
    np.testing.assert_allclose(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32),
                               rtol=BF16_TOL, atol=BF16_TOL)
    for g, w in zip(got[1:], want[1:], strict=True):  # the cache writes: the same roped bf16 values
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


@pytest.mark.parametrize("splits", [0, 4])
def test_matches_reference(splits: int) -> None:
    """Contexts of 37, 1 (the new token alone), 0 (a padded slot: zero rows, no write) and 200 tokens over
    pages in random order: the output rows of every q head and the K/V cache writes agree with the
    contract, with the projection given whole or as float32 split-K partials."""
    _check(_case(splits=splits), num_q_heads=8)


def test_sliding_window_and_soft_cap() -> None:
    """A sliding window of 20 (the first visible tile partly masked, a window inside the last tile) and a
    tanh soft cap on the logits change the result as the reference's do."""
    args = _case(lens=(37, 1, 0, 200), seed=1)
    _check(args, num_q_heads=8, sliding_window=20)
    _check(args, num_q_heads=8, soft_cap=30.0, pages_per_tile=2)


def test_one_q_head_per_kv_head_and_tile_edges() -> None:
    """group 1 (MHA) with contexts at and one past tile edges (64 = 4 pages of 16)."""
    _check(_case(kv=4, group=1, lens=(64, 65, 16, 17), seed=2), num_q_heads=4)


def test_supports_and_refusals() -> None:
    """Shapes outside the kernel (a group of 3, a table width not divisible by pages_per_tile) are
    reported by `supports` and refused with a message naming what is wrong."""
    h, pos, inv, kc, vc, slots, lens, tables = _case()
    assert supports(h, kc, tables, num_q_heads=8, pages_per_tile=4)
    assert not supports(h, kc, tables, num_q_heads=8, pages_per_tile=3)
    h3 = jnp.zeros((4, 2, 5, 64), jnp.bfloat16)
    assert not supports(h3, kc, tables, num_q_heads=6, pages_per_tile=4)
    with pytest.raises(ValueError, match="pages_per_tile"):
        rope_decode_attention(h, pos, inv, kc, vc, slots, lens, tables, num_q_heads=8, sm_scale=0.1,
                              pages_per_tile=3, interpret=True)
    with pytest.raises(ValueError, match="kv_lens must be"):
        rope_decode_attention(h, pos, inv, kc, vc, slots, lens[:2], tables, num_q_heads=8, sm_scale=0.1,
                              interpret=True)
