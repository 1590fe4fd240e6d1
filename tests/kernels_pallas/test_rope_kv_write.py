"""rope_kv_write (Pallas: compiled on a GPU, interpreted on the CPU) against its plain-JAX contract and the
engine's own ops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.rope_kv_write import rope_kv_write, rope_kv_write_reference, supports
from rtp_jax.models.attention import write_kv
from rtp_jax.models.rope import apply_rope, inv_frequencies

ON_GPU = jax.default_backend() == "gpu"
# On a GPU the kernel's cos/sin (Triton) and XLA's may round differently at positions in the thousands.
TOL = 2e-3 if ON_GPU else 1e-5


def _case(kv_heads: int, group: int, head_dim: int, num_tokens: int, dtype: jnp.dtype, seed: int = 0):
    blocks, block_size = 6, 4
    rng = np.random.default_rng(seed)
    shape = (blocks, block_size, kv_heads, head_dim)
    k_cache = jnp.asarray(rng.standard_normal(shape), dtype)
    v_cache = jnp.asarray(rng.standard_normal(shape), dtype)
    h = jnp.asarray(rng.standard_normal((num_tokens, kv_heads, group + 2, head_dim)), dtype)
    positions = jnp.asarray(rng.integers(0, 5000, num_tokens), jnp.int32)
    slots = rng.choice(blocks * block_size, num_tokens, replace=False).astype(np.int32)
    slots[-1] = blocks * block_size  # a padding token: its slot is out of range
    inv_freq = jnp.asarray(inv_frequencies(head_dim, 500000.0, None))
    return h, positions, inv_freq, k_cache, v_cache, jnp.asarray(slots)


def _f32(x) -> np.ndarray:
    return np.asarray(x, np.float32)


@pytest.mark.parametrize("kv_heads,group,head_dim,group_pad", [(2, 4, 128, 8), (1, 2, 64, 8), (3, 8, 32, 8),
                                                               (2, 16, 64, 16)])
def test_matches_reference(kv_heads: int, group: int, head_dim: int, group_pad: int) -> None:
    """q rows roped and zero-padded to group_pad; every real token's roped k and its v in its slot, the
    padding token's write dropped, all other cache bytes kept: as the plain-JAX contract (float32
    caches: to float32 rounding, since the kernel computes its own cos/sin)."""
    args = _case(kv_heads, group, head_dim, 5, jnp.float32)
    want = rope_kv_write_reference(*[jnp.array(a) for a in args], group_pad=group_pad)
    got = rope_kv_write(*[jnp.array(a) for a in args], group_pad=group_pad, interpret=not ON_GPU)
    assert got[0].shape == (5, kv_heads, group_pad, head_dim)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(_f32(g), _f32(w), rtol=TOL, atol=TOL)
    assert not _f32(got[0])[:, :, group:].any(), "padding rows must be zero"


def test_reference_is_the_engines_rope_and_write() -> None:
    """The contract is what the model does without the kernel: `apply_rope` on q and k, `write_kv` of k
    and v (bf16, bit for bit)."""
    h, pos, inv, kc, vc, slots = _case(2, 4, 128, 4, jnp.bfloat16)
    q_want = apply_rope(h[:, :, :4].reshape(4, 8, 128), pos, inv)
    k_want = apply_rope(h[:, :, 4], pos, inv)
    kc_want, vc_want = write_kv(jnp.array(kc), jnp.array(vc), k_want, h[:, :, 5], slots)
    q, kc_got, vc_got = rope_kv_write_reference(h, pos, inv, jnp.array(kc), jnp.array(vc), slots, group_pad=8)
    np.testing.assert_array_equal(_f32(q[:, :, :4].reshape(4, 8, 128)), _f32(q_want))
    np.testing.assert_array_equal(_f32(kc_got), _f32(kc_want))
    np.testing.assert_array_equal(_f32(vc_got), _f32(vc_want))


def test_bf16_kernel_within_one_rounding_of_reference() -> None:
    """bf16 activations and caches: each value within one bf16 rounding step of the reference."""
    args = _case(2, 4, 128, 4, jnp.bfloat16, seed=3)
    want = rope_kv_write_reference(*[jnp.array(a) for a in args], group_pad=8)
    got = rope_kv_write(*[jnp.array(a) for a in args], group_pad=8, interpret=not ON_GPU)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(_f32(g), _f32(w), rtol=2 ** -7, atol=1e-2)


def test_refusals_name_the_argument() -> None:
    """Shapes the kernel cannot serve are refused with what was expected."""
    h, pos, inv, kc, vc, slots = _case(2, 4, 48, 3, jnp.float32)  # half = 24: not a power of two
    assert not supports(h, kc)
    with pytest.raises(ValueError, match="rope_kv_write_reference"):
        rope_kv_write(h, pos, inv, kc, vc, slots, group_pad=8, interpret=True)
    h, pos, inv, kc, vc, slots = _case(2, 4, 64, 3, jnp.float32)
    with pytest.raises(ValueError, match="positions and slot_mapping"):
        rope_kv_write(h, pos[:2], inv, kc, vc, slots, group_pad=8, interpret=True)
    with pytest.raises(ValueError, match="inv_freq"):
        rope_kv_write(h, pos, inv[:4], kc, vc, slots, group_pad=8, interpret=True)
    with pytest.raises(ValueError, match="group_pad"):
        rope_kv_write(h, pos, inv, kc, vc, slots, group_pad=2, interpret=True)


def _partials(h: jax.Array, splits: int, seed: int = 7) -> jax.Array:
    """float32 [S, ...] partial sums adding up to h (random split, so each partial matters)."""
    rng = np.random.default_rng(seed)
    parts = rng.standard_normal((splits - 1, *h.shape)).astype(np.float32)
    return jnp.asarray(np.concatenate([parts, np.asarray(h, np.float32)[None] - parts.sum(0)[None]]))


@pytest.mark.parametrize("splits", [2, 4, 8])
def test_partial_sums_are_summed_first(splits: int) -> None:
    """Given float32 split-K partials of h, the kernel writes what it writes for their sum rounded to the
    caches' dtype (f32 caches: to f32 rounding; the padding token's write dropped as before)."""
    h, pos, inv, kc, vc, slots = _case(2, 4, 64, 5, jnp.float32, seed=splits)
    parts = _partials(h, splits)
    want = rope_kv_write_reference(parts.sum(0), pos, inv, jnp.array(kc), jnp.array(vc), slots, group_pad=8)
    got = rope_kv_write(parts, pos, inv, jnp.array(kc), jnp.array(vc), slots, group_pad=8,
                        interpret=not ON_GPU)
    assert got[0].dtype == kc.dtype
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(_f32(g), _f32(w), rtol=TOL, atol=10 * TOL)


def test_bf16_partials_within_one_rounding_of_reference() -> None:
    """bf16 caches: the partials' sum is rounded to bf16 before RoPE, as the unsplit bf16 projection's
    output is; q comes out bf16; each value within one bf16 rounding of the reference."""
    h, pos, inv, kc, vc, slots = _case(2, 4, 128, 4, jnp.bfloat16, seed=5)
    parts = _partials(h.astype(jnp.float32), 4)
    want = rope_kv_write_reference(parts, pos, inv, jnp.array(kc), jnp.array(vc), slots, group_pad=8)
    got = rope_kv_write(parts, pos, inv, jnp.array(kc), jnp.array(vc), slots, group_pad=8,
                        interpret=not ON_GPU)
    assert got[0].dtype == jnp.bfloat16
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(_f32(g), _f32(w), rtol=2 ** -7, atol=2e-2)


def test_partials_refused_unless_float32_and_a_power_of_two() -> None:
    """Three partials (not a power of two: Triton loads) or bf16 partials are refused by name."""
    h, pos, inv, kc, vc, slots = _case(2, 4, 64, 3, jnp.float32)
    for bad in (_partials(h, 3), _partials(h, 2).astype(jnp.bfloat16)):
        assert not supports(bad, kc)
        with pytest.raises(ValueError, match="partials"):
            rope_kv_write(bad, pos, inv, kc, vc, slots, group_pad=8, interpret=True)
