"""paged_kv_write (Pallas, interpreted on the CPU) against its plain-JAX contract."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.kv_write import paged_kv_write, paged_kv_write_reference, row_chunk, supports


def _case(kv_heads: int, head_dim: int, num_tokens: int, dtype: jnp.dtype, seed: int = 0):
    blocks, block_size = 5, 4
    rng = np.random.default_rng(seed)
    shape = (blocks, block_size, kv_heads, head_dim)
    k_cache = jnp.asarray(rng.standard_normal(shape), dtype)
    v_cache = jnp.asarray(rng.standard_normal(shape), dtype)
    k = jnp.asarray(rng.standard_normal((num_tokens, kv_heads, head_dim)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((num_tokens, kv_heads, head_dim)), jnp.float32)
    slots = rng.choice(blocks * block_size, num_tokens, replace=False).astype(np.int32)
    slots[-1] = blocks * block_size  # a padding token: its slot is out of range
    return k_cache, v_cache, k, v, jnp.asarray(slots)


@pytest.mark.parametrize("kv_heads,head_dim", [(2, 64), (3, 64), (8, 128)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_matches_reference_scatter(kv_heads: int, head_dim: int, dtype: jnp.dtype) -> None:
    """Every real token's K and V land in its slot (cast to the cache dtype), the padding token's write
    is dropped, and every other slot keeps its bytes, exactly as the two XLA scatters do."""
    args = _case(kv_heads, head_dim, 7, dtype)
    want_k, want_v = paged_kv_write_reference(*[jnp.array(a) for a in args])
    got_k, got_v = paged_kv_write(*[jnp.array(a) for a in args], interpret=True)
    np.testing.assert_array_equal(np.asarray(got_k, np.float32), np.asarray(want_k, np.float32))
    np.testing.assert_array_equal(np.asarray(got_v, np.float32), np.asarray(want_v, np.float32))


def test_all_padding_changes_nothing() -> None:
    """A batch of padding tokens only (every slot out of range, negative ones too) leaves the caches as
    they were."""
    k_cache, v_cache, k, v, _ = _case(2, 64, 3, jnp.bfloat16)
    slots = jnp.asarray([20, -1, 1 << 30], jnp.int32)
    got_k, got_v = paged_kv_write(jnp.array(k_cache), jnp.array(v_cache), k, v, slots, interpret=True)
    np.testing.assert_array_equal(np.asarray(got_k, np.float32), np.asarray(k_cache, np.float32))
    np.testing.assert_array_equal(np.asarray(got_v, np.float32), np.asarray(v_cache, np.float32))


def test_row_chunks_and_refusals() -> None:
    """Rows split into power-of-two chunks of at most 1024; shapes without a chunk of 16 are refused,
    as are mismatched k/v, with the argument named."""
    assert row_chunk(8 * 128) == 1024 and row_chunk(3 * 64) == 64 and row_chunk(32 * 128) == 1024
    k_cache, v_cache, k, v, slots = _case(1, 24, 2, jnp.float32)  # 24 = 8 x 3: no chunk of 16
    assert not supports(k_cache, k)
    with pytest.raises(ValueError, match="paged_kv_write_reference"):
        paged_kv_write(k_cache, v_cache, k, v, slots, interpret=True)
    k_cache, v_cache, k, v, slots = _case(2, 64, 2, jnp.float32)
    with pytest.raises(ValueError, match="k and v must be"):
        paged_kv_write(k_cache, v_cache, k[:1], v, slots, interpret=True)


def test_inside_jit_with_donated_caches() -> None:
    """Inside a jitted step with donated caches (the engine's use) the result is the reference's."""
    args = _case(2, 64, 5, jnp.bfloat16, seed=3)
    want = paged_kv_write_reference(*[jnp.array(a) for a in args])
    step = jax.jit(lambda kc, vc, k, v, s: paged_kv_write(kc, vc, k, v, s, interpret=True),
                   donate_argnums=(0, 1))
    got = step(*[jnp.array(a) for a in args])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
