"""Fresh prompts (one sequence from position 0, alone in its step) by dense causal attention over the step's
own K/V, and the per-program XLA options of the step programs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from kernels_pallas import ragged_paged_attention_reference
from rtp_jax import LLM, SamplingParams
from rtp_jax.engine import runner as runner_mod
from rtp_jax.engine.step import CUBLAS_MIN_TOKENS, PackedStep, compiler_options
from rtp_jax.models.attention import (
    AttentionBackend,
    AttentionMetadata,
    _from_contract,
    fresh_attention,
    write_kv,
)
from sharding.attention import shard_attention

REF = _from_contract(ragged_paged_attention_reference)


def _fresh_batch(n: int, padded: int, heads: int = 4, kv_heads: int = 2, hd: int = 16, bs: int = 8,
                 seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array, AttentionMetadata, tuple[Any, Any]]:
    """One sequence of n tokens at positions 0..n-1, padded to `padded` tokens and 3 sequence slots; its K/V
    written to shuffled cache blocks as the model does (padding tokens to the dropped slot)."""
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((padded, h, hd)), jnp.float32)
               for h in (heads, kv_heads, kv_heads))
    num_blocks = -(-n // bs) + 3
    table = rng.permutation(num_blocks)[: -(-n // bs)]
    pos = np.arange(padded)
    slots = np.where(pos < n, table[np.minimum(pos // bs, len(table) - 1)] * bs + pos % bs, num_blocks * bs)
    cache = jnp.zeros((num_blocks, bs, kv_heads, hd), jnp.float32)
    k_cache, v_cache = write_kv(cache, cache, k, v, jnp.asarray(slots, jnp.int32))
    tables = np.zeros((3, len(table)), np.int32)
    tables[0] = table
    md = AttentionMetadata(jnp.asarray(slots, jnp.int32), jnp.asarray([n, 0, 0], jnp.int32),
                           jnp.asarray(tables), jnp.asarray([0, n, n, n], jnp.int32), jnp.int32(1))
    return q, k_cache, v_cache, md, (k, v)


@pytest.mark.parametrize("window", [None, 5])
def test_fresh_attention_equals_the_paged_reference(window: int | None):
    """On a fresh sequence (GQA, padding after it), dense causal attention over the step's K/V gives the
    paged reference's output on every real token, with and without a sliding window."""
    q, kc, vc, md, new_kv = _fresh_batch(n=29, padded=32)
    kw = dict(sm_scale=0.25, sliding_window=window, soft_cap=None)
    want = np.asarray(REF(q, kc, vc, md, **kw))[:29]
    got = np.asarray(fresh_attention(REF, "xla")(q, kc, vc, md, new_kv=new_kv, **kw))[:29]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fresh_attention_hands_what_it_cannot_serve_to_the_fallback():
    """Logit soft-capping, a call without the step's K/V, and for cuDNN fp32, a sliding window or a token
    count not a multiple of 64 go to the fallback."""
    q, kc, vc, md, new_kv = _fresh_batch(n=10, padded=16)
    calls: list[str] = []

    def fallback(q, k, v, md, *, sm_scale, sliding_window, soft_cap, new_kv=None):
        calls.append("fallback")
        return q

    base = dict(sm_scale=0.25, sliding_window=None)
    fresh_attention(fallback, "xla")(q, kc, vc, md, soft_cap=30.0, new_kv=new_kv, **base)
    fresh_attention(fallback, "xla")(q, kc, vc, md, soft_cap=None, **base)
    fresh_attention(fallback, "cudnn")(q, kc, vc, md, soft_cap=None, new_kv=new_kv, **base)
    half = [x.astype(jnp.bfloat16) for x in (q, *new_kv)]
    fresh_attention(fallback, "cudnn")(half[0], kc, vc, md, soft_cap=None, new_kv=tuple(half[1:]), **base)
    q64, kc64, vc64, md64, kv64 = _fresh_batch(n=40, padded=64)
    q64, *kv64 = [x.astype(jnp.bfloat16) for x in (q64, *kv64)]
    fresh_attention(fallback, "cudnn")(q64, kc64, vc64, md64, soft_cap=None, sliding_window=8, sm_scale=0.25,
                                       new_kv=tuple(kv64))
    assert calls == ["fallback"] * 5


@pytest.mark.parametrize("tp", [2, 4])
def test_fresh_attention_under_tensor_parallelism(tp: int):
    """Wrapped by `shard_attention(uses_new_kv=True)`, each tp shard attends over its own K/V heads (split
    when tp divides the 2 KV heads, else the shard's one head picked from the replicated K/V): the result
    equals the unsharded one."""
    if len(jax.devices()) < tp:
        pytest.skip(f"needs {tp} devices")
    q, kc, vc, md, new_kv = _fresh_batch(n=21, padded=32, heads=8, kv_heads=2)
    mesh = Mesh(np.array(jax.devices()[:tp]).reshape(1, 1, 1, tp), ("dp", "pp", "ep", "tp"))
    kw = dict(sm_scale=0.25, sliding_window=None, soft_cap=None, new_kv=new_kv)
    fresh = fresh_attention(REF, "xla")
    want = np.asarray(fresh(q, kc, vc, md, **kw))
    got = np.asarray(jax.jit(lambda *a: shard_attention(fresh, mesh, 8, 2, uses_new_kv=True)(*a, **kw))(
        q, kc, vc, md))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def llama_path(tiny_hf_model: Callable[..., Path]) -> Path:
    return tiny_hf_model("llama")


def test_engine_serves_fresh_prompts_with_the_fresh_program(llama_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch):
    """With a backend that offers fresh-prompt attention, a prompt alone in its step from position 0 (a whole
    prompt, or the first chunk of a long one) runs the fresh program; later chunks, batches of several
    prompts, prefix-cache hits and short prompts run the mixed one; greedy outputs equal those of an
    engine without it."""
    import rtp_jax.engine.core as core_mod
    from rtp_jax.models.attention import select_attention_backend

    rng = np.random.default_rng(2)
    long, short = rng.integers(3, 500, 100).tolist(), rng.integers(3, 500, 9).tolist()
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    kw = dict(dtype="float32", max_model_len=192, max_num_batched_tokens=64, max_num_seqs=4)
    plain = LLM(str(llama_path), **kw)

    def run(llm: LLM) -> list[list[int]]:
        outs = [llm.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0].outputs[0].token_ids
                for p in (long, short, long)]  # the second `long` hits the prefix cache
        both = llm.generate([{"prompt_token_ids": p} for p in (long[:40], short)], params, use_tqdm=False)
        return outs + [o.outputs[0].token_ids for o in both]

    def with_fresh(name: str = "auto") -> AttentionBackend:
        ref = select_attention_backend("reference")
        return ref._replace(fresh=fresh_attention(ref.mixed, "xla"))

    monkeypatch.setattr(core_mod, "select_attention_backend", with_fresh)
    monkeypatch.setattr(runner_mod, "FRESH_MIN_TOKENS", 32)
    llm = LLM(str(llama_path), **kw)
    runner = llm.engine.core.runner
    fresh_calls: list[int] = []
    fresh_step = runner._fresh

    def counting(*args: Any) -> Any:
        fresh_calls.append(args[3].input_ids.shape[0])
        return fresh_step(*args)

    runner._fresh = counting
    assert run(llm) == run(plain)
    # `long` alone: its first 64-token chunk; the 40-token prompt shares its step with `short`.
    assert fresh_calls == [64]
    shapes = runner.bucket_shapes(8)
    assert {p.tokens for p in shapes if p.kind == "fresh"} == {32, 64}
    assert not [p for p in plain.engine.core.runner.bucket_shapes(8) if p.kind == "fresh"]


def test_large_step_programs_use_cublas_gemms():
    """Programs over CUBLAS_MIN_TOKENS tokens or more compile with XLA's Triton GEMMs off, smaller ones with
    XLA's defaults; both kinds compile and run here (the option is inert off the GPU)."""
    assert compiler_options(CUBLAS_MIN_TOKENS) == {"xla_gpu_enable_triton_gemm": False}
    assert compiler_options(CUBLAS_MIN_TOKENS - 1) == {}

    def fn(leaves, kv, last, ibuf, fbuf, spec, flags, extra):
        return kv, last + ibuf.sum(), fbuf.sum()

    step = PackedStep(fn, None)
    for t in (16, CUBLAS_MIN_TOKENS):
        jitted = step._jitted(t)
        ibuf = jnp.ones(t, jnp.int32)
        _, last, _ = jitted([], [], jnp.zeros(2, jnp.int32), ibuf, jnp.zeros(1), None, None, 0)
        assert int(last[0]) == t
    assert len(step._jits) == 2
