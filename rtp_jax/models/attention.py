"""The one attention call every model layer makes, and the paged KV-cache write.

The backend (Pallas kernels on GPU, pure-JAX reference elsewhere) is chosen once at start-up by
`select_attention_backend` and closed over by the jitted steps; models only see `AttentionFn`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from kernels_pallas.ragged_paged_attention import ragged_paged_attention_reference
from rtp_jax.config import ATTENTION_BACKENDS


class AttentionMetadata(NamedTuple):
    """Ragged batch layout shared by all layers of one step (a pytree of device arrays).

    slot_mapping:    int32[T] flat cache slot (block * block_size + offset) of each token's new K/V;
                     padding tokens hold an out-of-range slot so their writes are dropped
    kv_lens:         int32[S] context length of each sequence after this step (0 for padded slots)
    block_tables:    int32[S, max_blocks] KV blocks of each sequence (padding entries: block 0)
    query_start_loc: int32[S+1] cumulative query offsets of the sequences in the flat token axis
    num_seqs:        int32[] number of valid sequences
    """

    slot_mapping: jax.Array
    kv_lens: jax.Array
    block_tables: jax.Array
    query_start_loc: jax.Array
    num_seqs: jax.Array


class AttentionFn(Protocol):
    """q: [T, heads, head_dim] -> [T, heads, head_dim]. `new_kv`: this step's K and V, each
    [T, kv_heads, head_dim], already written to the caches; kernels that read the paged caches ignore
    it, `fresh_attention` reads only it. A backend's function may carry a `write_kv` attribute (the
    contract of `write_kv` below): the cache write the layers use with it (`kv_writer`); and a
    `fused_decode` attribute (`FusedDecode`): RoPE, cache write and attention from the unsplit q/k/v
    projection in fewer kernels, which layers without q/k norms try first (`fused_decoder`)."""

    def __call__(
        self,
        q: jax.Array,
        k_cache: jax.Array,
        v_cache: jax.Array,
        md: AttentionMetadata,
        *,
        sm_scale: float,
        sliding_window: int | None,
        soft_cap: float | None,
        new_kv: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array: ...


class FusedDecode(Protocol):
    """h: [T, kv_heads, group + 2, head_dim] (`QKVProj.project`: per KV head its q heads, its k, its v), or,
    for one whose `takes_partials` attribute is true, float32 [S, T, ...] split-K partial sums of it
    (`QKVProj.project_partials`); positions int32[T], inv_freq float32[head_dim // 2] -> (attention output
    [T, heads, head_dim], updated k_cache, v_cache), or None where it does not apply (the layer then ropes,
    writes and attends itself)."""

    def __call__(self, h: jax.Array, positions: jax.Array, inv_freq: jax.Array, k_cache: jax.Array,
                 v_cache: jax.Array, md: AttentionMetadata, *, num_q_heads: int, sm_scale: float,
                 sliding_window: int | None, soft_cap: float | None,
                 ) -> tuple[jax.Array, jax.Array, jax.Array] | None: ...


def fused_decoder(attn_fn: AttentionFn) -> FusedDecode | None:
    """The fused RoPE + cache write + attention that goes with `attn_fn`, if its backend offers one."""
    return getattr(attn_fn, "fused_decode", None)


# Split-K factor of the q/k/v projection in decode steps of at most `PARTIALS_MAX_ROWS` rows whose fused
# decoder sums partial sums itself (`takes_partials`, e.g. `rope_write_decode`): the projection becomes a
# batched GEMM writing this many float32 partials (`QKVProj.project_partials`), and the kernel XLA runs to
# sum its own split-K partials goes away: +0.6-0.7% batch-1 tokens/s on an H200 (236.8 vs 235.2, 233.1 vs
# 231.6; bench/notes_bench.md, twelfth session). 0: off, XLA splits as it likes. A/B:
# bench/probe_decode_variants.py's `qkv_split:S`.
DECODE_QKV_SPLITS = 4
# Larger decode batches keep XLA's GEMMs: float32 partials grow with the rows (at 256 rows, 25 MB per layer
# of q/k/v against 50 MB of weights), where split-K no longer pays anyway.
PARTIALS_MAX_ROWS = 16


def decode_qkv_splits(fused: FusedDecode | None, num_tokens: int, md: AttentionMetadata, dim: int) -> int:
    """How many partial sums of the q/k/v projection to hand `fused`: `DECODE_QKV_SPLITS` in a decode step
    (one row per sequence slot) of at most `PARTIALS_MAX_ROWS` rows when `fused` takes partials and they
    divide `dim`; else 0 (the unsplit projection)."""
    splits = DECODE_QKV_SPLITS
    if (fused is None or not getattr(fused, "takes_partials", False) or splits < 2 or dim % splits
            or num_tokens != md.kv_lens.shape[0] or num_tokens > PARTIALS_MAX_ROWS):
        return 0
    return splits


def write_kv(
    k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Scatters this step's K/V into the paged cache.

    k_cache, v_cache: [num_blocks, block_size, kv_heads, head_dim]; k, v: [T, kv_heads, head_dim].
    Out-of-range slots (padding tokens) are dropped rather than clamped, so they never clobber
    a real block.
    """
    shape = k_cache.shape
    flat = (shape[0] * shape[1], shape[2], shape[3])
    k_cache = k_cache.reshape(flat).at[slot_mapping].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.reshape(flat).at[slot_mapping].set(v.astype(v_cache.dtype), mode="drop")
    return k_cache.reshape(shape), v_cache.reshape(shape)


def kv_writer(attn_fn: AttentionFn) -> Callable[..., tuple[jax.Array, jax.Array]]:
    """The cache write that goes with `attn_fn`: its `write_kv` attribute, else XLA's scatters."""
    return getattr(attn_fn, "write_kv", write_kv)


def pallas_write_kv(
    k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """`write_kv` as one Pallas kernel for K and V (kernels_pallas/kv_write.py; XLA's two scatters were
    ~5 us per layer at batch 1 on an H200), where the row shape allows; else `write_kv`."""
    from kernels_pallas.kv_write import paged_kv_write, supports

    if not supports(k_cache, k):
        return write_kv(k_cache, v_cache, k, v, slot_mapping)
    return paged_kv_write(k_cache, v_cache, k, v, slot_mapping)


def _with_writer(fns: AttentionBackend) -> AttentionBackend:
    """The backend's functions carrying the Pallas cache write (`kv_writer`)."""
    for fn in (fns.mixed, fns.decode, fns.fresh):
        if fn is not None:
            fn.write_kv = pallas_write_kv  # type: ignore[attr-defined]
    return fns


def _from_contract(kernel: Any, **tuning: Any) -> AttentionFn:
    """Adapts a function with the `kernels_pallas` contract (metadata as separate arrays) to `AttentionFn`."""

    def attn(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, md: AttentionMetadata, *,
             sm_scale: float, sliding_window: int | None, soft_cap: float | None,
             new_kv: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        return kernel(q, k_cache, v_cache, md.kv_lens, md.block_tables, md.query_start_loc, md.num_seqs,
                      sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap, **tuning)

    return attn


class AttentionBackend(NamedTuple):
    """The attention functions of one engine: `mixed` serves any ragged batch (the step program), `decode`
    batches of one new token per sequence, row s of q being sequence s (the multi-step decode program),
    `fresh` (None: not offered) batches holding one sequence whose tokens start at position 0, padding
    after them (a prompt, or the first chunk of one, with nothing cached before it)."""

    name: str
    mixed: AttentionFn
    decode: AttentionFn
    fresh: AttentionFn | None = None


def select_attention_backend(name: str = "auto", **tuning: Any) -> AttentionBackend:
    """"auto" is "pallas" on a GPU, else "reference". "pallas": the Triton-lowered ragged kernel, and on
    Hopper (sm_90) with Mosaic GPU the TMA/wgmma decode kernel for every sequence with one new token (in
    mixed batches via `split_decode_rows`), and on sm_80+ cuDNN flash attention for a fresh prompt
    (`fresh_attention`); "pallas-triton": the ragged kernel alone; "reference": pure JAX."""
    if name == "auto":
        name = "pallas" if jax.default_backend() == "gpu" and _pallas_available() else "reference"
    if name == "reference":
        fn = _from_contract(ragged_paged_attention_reference)
        return AttentionBackend(name, fn, fn)
    if name in ("pallas", "pallas-triton"):
        from kernels_pallas import ragged_paged_attention

        ragged = _from_contract(ragged_paged_attention, **tuning)
        if name == "pallas-triton":
            return _with_writer(AttentionBackend(name, ragged, ragged))
        fresh = fresh_attention(ragged, "cudnn") if _cudnn_available() else None
        if not _hopper_mosaic_available():
            return _with_writer(AttentionBackend(name, ragged, ragged, fresh))
        from kernels_pallas.paged_decode_mgpu import supports

        decode = _mosaic_decode(ragged)
        return _with_writer(
            AttentionBackend(name, split_decode_rows(ragged, decode, applies=supports), decode, fresh))
    raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {name!r}")


def _mosaic_decode(fallback: AttentionFn) -> AttentionFn:
    """The Mosaic GPU decode kernel where it applies (bf16/fp16, head_dim % 64 == 0), else `fallback`;
    decided from static shapes at trace time. Carries `fused_decode` (`rope_write_decode`) and `add_norm`
    (models/residual.py: the residual add and RMSNorm in one kernel)."""
    from kernels_pallas.paged_decode_mgpu import paged_decode_attention, supports

    def attn(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, md: AttentionMetadata, *,
             sm_scale: float, sliding_window: int | None, soft_cap: float | None,
             new_kv: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        if not supports(q, k_cache) or q.shape[0] != md.kv_lens.shape[0]:
            return fallback(q, k_cache, v_cache, md, sm_scale=sm_scale, sliding_window=sliding_window,
                            soft_cap=soft_cap)
        return paged_decode_attention(q, k_cache, v_cache, md.kv_lens, md.block_tables, sm_scale=sm_scale,
                                      sliding_window=sliding_window, soft_cap=soft_cap)

    from rtp_jax.models.residual import pallas_add_norm

    attn.fused_decode = rope_write_decode  # type: ignore[attr-defined]
    attn.add_norm = pallas_add_norm  # type: ignore[attr-defined]
    return attn


def rope_write_decode(h: jax.Array, positions: jax.Array, inv_freq: jax.Array, k_cache: jax.Array,
                      v_cache: jax.Array, md: AttentionMetadata, *, num_q_heads: int, sm_scale: float,
                      sliding_window: int | None, soft_cap: float | None,
                      ) -> tuple[jax.Array, jax.Array, jax.Array] | None:
    """`FusedDecode` for one query row per sequence slot: kernels_pallas/rope_kv_write.py (summing h's
    split-K partials first when it is given them) ropes q and k,
    writes k and v into the caches and lays q out in the Mosaic decode kernel's padded head groups (one
    kernel where XLA made three: q RoPE + pad, K/V stack, and the K/V write; 1.9 us where those took 4.6 per
    layer at batch 1 on an H200, +0.65% tokens/s), then the Mosaic kernel attends. None where either
    kernel does not apply (static shapes)."""
    from kernels_pallas import rope_kv_write as rkw
    from kernels_pallas.paged_decode_mgpu import group_pad, paged_decode_attention, supports

    t, kv, _, head_dim = h.shape[-4:]  # h may be [S, T, ...] float32 partial sums (`takes_partials`)
    q_like = jax.ShapeDtypeStruct((t, num_q_heads, head_dim), k_cache.dtype if h.ndim == 5 else h.dtype)
    if t != md.kv_lens.shape[0] or not rkw.supports(h, k_cache) or not supports(q_like, k_cache):
        return None
    q4, k_cache, v_cache = rkw.rope_kv_write(h, positions, inv_freq, k_cache, v_cache, md.slot_mapping,
                                             group_pad=group_pad(num_q_heads // kv))
    out = paged_decode_attention(q4, k_cache, v_cache, md.kv_lens, md.block_tables, sm_scale=sm_scale,
                                 sliding_window=sliding_window, soft_cap=soft_cap, num_q_heads=num_q_heads)
    return out, k_cache, v_cache


rope_write_decode.takes_partials = True  # type: ignore[attr-defined]


def split_decode_rows(ragged: AttentionFn, decode: AttentionFn,
                      applies: Callable[[jax.Array, jax.Array], bool] | None = None) -> AttentionFn:
    """Mixed batches with their decode rows served by `decode`: the sequences with one query token
    (gathered into one row each) go to `decode`, the rest to `ragged`, which sees the decode sequences as
    empty (context 0) and skips them; the decode rows are then written over its output.

    Continuous batching runs mostly such steps (the running decodes plus a prefill chunk), so this is where
    the decode kernel's bandwidth pays. Static shapes: one decode row per sequence slot, whether used or not.
    `applies(q, k_cache)` (static shapes and dtypes) false: `ragged` alone serves the batch.
    """

    def attn(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, md: AttentionMetadata, *,
             sm_scale: float, sliding_window: int | None, soft_cap: float | None,
             new_kv: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        if applies is not None and not applies(q, k_cache):
            return ragged(q, k_cache, v_cache, md, sm_scale=sm_scale, sliding_window=sliding_window,
                          soft_cap=soft_cap)
        num_tokens, num_slots = q.shape[0], md.kv_lens.shape[0]
        qsl = md.query_start_loc
        is_decode = (jnp.arange(num_slots) < md.num_seqs) & (qsl[1:] - qsl[:-1] == 1)
        rows = jnp.where(is_decode, qsl[:-1], num_tokens)  # out of range: dropped by the scatter
        kw = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
        dec_md = md._replace(kv_lens=jnp.where(is_decode, md.kv_lens, 0), query_start_loc=jnp.arange(
            num_slots + 1, dtype=jnp.int32), num_seqs=jnp.int32(num_slots))
        out_dec = decode(q[jnp.minimum(rows, num_tokens - 1)], k_cache, v_cache, dec_md, **kw)
        out = ragged(q, k_cache, v_cache, md._replace(kv_lens=jnp.where(is_decode, 0, md.kv_lens)), **kw)
        return out.at[rows].set(out_dec, mode="drop")

    return attn


def fresh_attention(fallback: AttentionFn, implementation: str | None) -> AttentionFn:
    """Attention for a batch that is one sequence starting at position 0 (token i at position i, padding
    after the real tokens): dense causal attention over `new_kv` by `jax.nn.dot_product_attention`, no
    paged-cache reads. Causality keeps real queries off the padding keys. With cuDNN on an H200 this takes
    94 us per layer for a 2048-token Llama-3-8B prompt where the ragged Triton kernel takes 159
    (bench/notes_attention.md). `implementation`: "cudnn", "xla" or None (JAX picks); what is not served
    with cuDNN here (logit soft-capping, fp32, head_dim over 128, sliding windows, a token count not a
    multiple of 64) goes to `fallback`, decided at trace time."""

    def attn(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, md: AttentionMetadata, *,
             sm_scale: float, sliding_window: int | None, soft_cap: float | None,
             new_kv: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
        # What cuDNN's flash attention was verified on here; sliding windows and odd lengths stay paged.
        cudnn_ok = (q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] <= 128 and q.shape[-1] % 8 == 0
                    and q.shape[0] % 64 == 0 and sliding_window is None)
        if new_kv is None or soft_cap is not None or (implementation == "cudnn" and not cudnn_ok):
            return fallback(q, k_cache, v_cache, md, sm_scale=sm_scale, sliding_window=sliding_window,
                            soft_cap=soft_cap)
        k, v = new_kv
        window = None if sliding_window is None else (sliding_window - 1, 0)
        out = jax.nn.dot_product_attention(q[None], k[None].astype(q.dtype), v[None].astype(q.dtype),
                                           scale=sm_scale, is_causal=True, local_window_size=window,
                                           implementation=implementation)
        return out[0]

    return attn


def _cudnn_available() -> bool:
    """cuDNN flash attention: an sm_80+ NVIDIA GPU (JAX's CUDA plugin ships cuDNN)."""
    dev = jax.devices()[0]
    try:
        return dev.platform == "gpu" and float(getattr(dev, "compute_capability", "0")) >= 8.0
    except ValueError:
        return False


def _pallas_available() -> bool:
    import kernels_pallas

    return hasattr(kernels_pallas, "ragged_paged_attention")


def _hopper_mosaic_available() -> bool:
    """A Hopper GPU (wgmma, TMA) and a JAX with Pallas Mosaic GPU."""
    from kernels_pallas._lowering import mosaic_gpu_available

    dev = jax.devices()[0]
    hopper = dev.platform == "gpu" and getattr(dev, "compute_capability", "") == "9.0"
    return hopper and mosaic_gpu_available()


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm with float32 statistics. x: [..., D], weight: [D]."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    # HF casts back to the activation dtype before the weight multiply; match it for bf16 parity.
    return weight.astype(x.dtype) * x32.astype(x.dtype)
