"""Which attention functions an engine gets for mixed and for pure-decode batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import ragged_paged_attention_reference
from kernels_pallas.testing import make_ragged_batch
from rtp_jax.config import EngineConfig, ModelConfig
from rtp_jax.models.attention import (
    AttentionMetadata,
    _from_contract,
    _mosaic_decode,
    kv_writer,
    pallas_write_kv,
    select_attention_backend,
    split_decode_rows,
    write_kv,
)


def test_reference_and_triton_only_backends_use_one_function_for_both_batch_kinds():
    """"reference" and "pallas-triton" serve decode batches with their mixed-batch function."""
    for name in ("reference", "pallas-triton"):
        backend = select_attention_backend(name)
        assert backend.name == name and backend.decode is backend.mixed


def test_pallas_decode_falls_back_off_hopper():
    """Without a Hopper GPU (this CPU run), "pallas" decodes with the ragged kernel too."""
    if jax.default_backend() == "gpu":
        pytest.skip("checks the non-GPU fallback")
    backend = select_attention_backend("pallas")
    assert backend.decode is backend.mixed


def test_unknown_backend_names_the_choices():
    """A typo is refused by the selector and by EngineConfig, listing the valid names."""
    with pytest.raises(ValueError, match="pallas-triton"):
        select_attention_backend("flash")
    with pytest.raises(ValueError, match="attention_backend"):
        model = ModelConfig(architecture="LlamaForCausalLM", vocab_size=8, hidden_size=8, intermediate_size=8,
                            num_layers=1, num_heads=1, num_kv_heads=1, head_dim=8)
        EngineConfig(model=model, attention_backend="flash")


def test_mosaic_decode_routes_unsupported_batches_to_the_fallback():
    """fp32 caches, head_dim 32, or more query rows than sequences go to the ragged kernel untouched."""
    calls = []

    def fallback(q, k, v, md, *, sm_scale, sliding_window, soft_cap):
        calls.append(q.shape)
        return q

    attn = _mosaic_decode(fallback)
    md = AttentionMetadata(jnp.zeros(2, jnp.int32), jnp.ones(2, jnp.int32), jnp.zeros((2, 1), jnp.int32),
                           jnp.arange(3, dtype=jnp.int32), jnp.int32(2))
    cases = [((2, 4, 64), jnp.float32), ((2, 4, 32), jnp.bfloat16), ((5, 4, 64), jnp.bfloat16)]
    for shape, dtype in cases:
        q = jnp.zeros(shape, dtype)
        cache = jnp.zeros((4, 16, 2, shape[-1]), dtype)
        attn(q, cache, cache, md, sm_scale=1.0, sliding_window=None, soft_cap=None)
    assert calls == [shape for shape, _ in cases]


def test_split_decode_rows_equals_one_ragged_call():
    """Decode rows (q_len 1, anywhere in the batch) served by the decode function and the rest by the ragged
    one give the ragged result, padding tokens and padded slots included; the decode function sees one row
    per sequence slot, with context 0 for the others."""
    rng = np.random.default_rng(3)
    batch = make_ragged_batch(rng, [1, 5, 1, 1, 12], [9, 20, 33, 1, 40], num_q_heads=4, num_kv_heads=2,
                              head_dim=16, block_size=4, pad_tokens=3, pad_seqs=2)
    q, k, v, lens, tables, qsl, n = batch.args()
    md = AttentionMetadata(jnp.zeros(q.shape[0], jnp.int32), lens, tables, qsl, n)
    ref = _from_contract(ragged_paged_attention_reference)
    seen = []

    def decode(q, k, v, md, **kw):
        seen.append((q.shape[0], np.asarray(md.kv_lens)))
        return ref(q, k, v, md, **kw)

    kw = dict(sm_scale=0.25, sliding_window=None, soft_cap=None)
    want = np.asarray(ref(q, k, v, md, **kw))
    got = np.asarray(split_decode_rows(ref, decode)(q, k, v, md, **kw))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert seen[0][0] == 7 and list(seen[0][1]) == [9, 0, 33, 1, 0, 0, 0]
    skipped = split_decode_rows(ref, decode, applies=lambda q, k: False)(q, k, v, md, **kw)
    np.testing.assert_array_equal(np.asarray(skipped), want)
    assert len(seen) == 1, "decode must not run where it does not apply"


def _write_peaked_llama(directory: Path) -> Path:
    """A 2-layer Llama (8 q / 2 KV heads of 64) with weights scaled so greedy choices are clear-cut."""
    import json

    import ml_dtypes
    from hf_models import write_tiny_tokenizer
    from safetensors.numpy import save_file

    d, inter, vocab, heads, kv_heads, hd = 512, 1024, 512, 8, 2, 64
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=d,
                  intermediate_size=inter, num_hidden_layers=2, num_attention_heads=heads,
                  num_key_value_heads=kv_heads, head_dim=hd,
                  vocab_size=vocab, max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
                  torch_dtype="bfloat16", bos_token_id=0, eos_token_id=2, tie_word_embeddings=False)
    rng = np.random.default_rng(0)

    def w(out: int, inp: int, scale: float = 1.0) -> np.ndarray:
        return (scale * rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(ml_dtypes.bfloat16)

    t = {"model.embed_tokens.weight": w(vocab, d, np.sqrt(d)), "lm_head.weight": w(vocab, d, 4.0),
         "model.norm.weight": np.ones(d, ml_dtypes.bfloat16)}
    for i in range(2):
        p = f"model.layers.{i}."
        ones = np.ones(d, ml_dtypes.bfloat16)
        t |= {p + "self_attn.q_proj.weight": w(heads * hd, d, 2.0),
              p + "self_attn.k_proj.weight": w(kv_heads * hd, d, 2.0),
              p + "self_attn.v_proj.weight": w(kv_heads * hd, d),
              p + "self_attn.o_proj.weight": w(d, heads * hd),
              p + "mlp.gate_proj.weight": w(inter, d), p + "mlp.up_proj.weight": w(inter, d),
              p + "mlp.down_proj.weight": w(d, inter), p + "input_layernorm.weight": ones,
              p + "post_attention_layernorm.weight": ones}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(t, str(directory / "model.safetensors"))
    write_tiny_tokenizer(directory)
    return directory


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the Mosaic GPU decode kernel needs a GPU")
def test_engine_decodes_the_same_with_the_mosaic_kernel(tmp_path: Path):
    """Greedy continuations (contexts crossing 64-token tiles) agree between "pallas" (Mosaic GPU decode) and
    "pallas-triton"; where they first differ, the logprobs so far agree to bf16 noise."""
    from rtp_jax import LLM, SamplingParams

    path = _write_peaked_llama(tmp_path / "peaked")
    prompts = [{"prompt_token_ids": [int(x) for x in np.random.default_rng(n).integers(3, 500, n)]}
               for n in (5, 60, 130, 250)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=1)
    runs = {}
    for backend in ("pallas", "pallas-triton"):
        llm = LLM(str(path), dtype="bfloat16", max_model_len=512, num_kv_blocks=128,
                  attention_backend=backend)
        runs[backend] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        del llm
    same = 0
    for a, b in zip(runs["pallas"], runs["pallas-triton"], strict=True):
        pairs = zip(a.token_ids, b.token_ids, strict=True)
        n = next((i for i, (x, y) in enumerate(pairs) if x != y), len(a.token_ids))
        same += n
        for i in range(n):
            tok = a.token_ids[i]
            assert abs(a.logprobs[i][tok].logprob - b.logprobs[i][tok].logprob) < 0.05
    assert same >= 0.9 * sum(len(a.token_ids) for a in runs["pallas"])


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="the Pallas kernels compile on a GPU")
def test_pallas_mixed_batch_matches_reference_on_gpu():
    """The "pallas" mixed function (decode rows by the Mosaic kernel where it applies) equals the reference
    on a bf16 batch of decodes and prefill chunks."""
    from kernels_pallas.testing import relative_error

    rng = np.random.default_rng(4)
    batch = make_ragged_batch(rng, [1, 40, 1, 1, 100, 1], [70, 40, 300, 1, 230, 129], num_q_heads=8,
                              num_kv_heads=2, head_dim=128, block_size=16, pad_tokens=5, pad_seqs=2)
    q, k, v, lens, tables, qsl, n = batch.args()
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    md = AttentionMetadata(jnp.zeros(q.shape[0], jnp.int32), lens, tables, qsl, n)
    kw = dict(sm_scale=128**-0.5, sliding_window=None, soft_cap=None)
    got = np.asarray(select_attention_backend("pallas").mixed(q, k, v, md, **kw), np.float32)
    want = np.asarray(_from_contract(ragged_paged_attention_reference)(q, k, v, md, **kw), np.float32)
    assert relative_error(got, want) < 1e-2


def test_pallas_backends_write_the_cache_with_one_kernel():
    """"pallas" and "pallas-triton" functions carry the Pallas K/V cache write; "reference" keeps XLA's
    scatters."""
    for name in ("pallas", "pallas-triton"):
        backend = select_attention_backend(name)
        for fn in (backend.mixed, backend.decode, backend.fresh):
            assert fn is None or kv_writer(fn) is pallas_write_kv
    ref = select_attention_backend("reference")
    assert kv_writer(ref.mixed) is write_kv and kv_writer(ref.decode) is write_kv


def test_engine_layers_write_kv_with_the_backends_writer(tiny_hf_model, monkeypatch: pytest.MonkeyPatch):
    """Every layer of the step and multi-step decode programs writes its K/V with the writer its attention
    function carries; with the Pallas kernel (interpreted here) greedy outputs equal the scatter engine's."""
    import rtp_jax.engine.core as core_mod
    from kernels_pallas.kv_write import paged_kv_write
    from rtp_jax import LLM, SamplingParams

    path = str(tiny_hf_model("llama"))
    kw = dict(dtype="float32", max_model_len=128, max_num_batched_tokens=32, max_num_seqs=4,
              num_decode_steps=4)
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 40, 17)]
    params = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(path, **kw).generate(prompts, params, use_tqdm=False)]
    traced: list[tuple[int, ...]] = []

    def interpreted(k_cache, v_cache, k, v, slot_mapping):
        traced.append(tuple(k.shape))
        return paged_kv_write(k_cache, v_cache, k, v, slot_mapping, interpret=True)

    def with_kernel_write(name: str = "auto", **tuning: Any) -> Any:
        backend = select_attention_backend("reference")
        fns = [_from_contract(ragged_paged_attention_reference) for _ in range(2)]
        for fn in fns:
            fn.write_kv = interpreted
        return backend._replace(mixed=fns[0], decode=fns[1])

    monkeypatch.setattr(core_mod, "select_attention_backend", with_kernel_write)
    llm = LLM(path, **kw)
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == want
    layers = llm.engine.core.config.model.num_layers
    assert traced and len(traced) % layers == 0  # each traced program wrote once per layer
    # the mixed program (token buckets >= 16) and the multi-step decode one (4 sequence slots, one token each)
    assert {shape[0] for shape in traced} >= {4, 32}, traced


def test_mosaic_decode_offers_the_fused_rope_write_path():
    """The Mosaic decode function carries `fused_decode` (RoPE + cache write + attention from the unsplit
    projection); the reference and Triton-only backends do not."""
    from rtp_jax.models.attention import fused_decoder, rope_write_decode

    mosaic = _mosaic_decode(_from_contract(ragged_paged_attention_reference))
    assert fused_decoder(mosaic) is rope_write_decode
    for name in ("reference", "pallas-triton"):
        backend = select_attention_backend(name)
        assert fused_decoder(backend.mixed) is None and fused_decoder(backend.decode) is None


@pytest.mark.parametrize("qk_norm,splits,declines", [(False, 0, False), (True, 0, False), (False, 4, False),
                                                     (True, 4, False), (False, 4, True)])
def test_layer_uses_the_fused_decode_path_with_the_same_result(qk_norm: bool, splits: int, declines: bool,
                                                               monkeypatch: pytest.MonkeyPatch):
    """A layer whose attention function offers `fused_decode` hands it the unsplit projection (or, with
    `DECODE_QKV_SPLITS`, its split-K partial sums) and returns its output through o_proj with its caches:
    equal to the layer's own RoPE, write and attention (here the fused path is rope_kv_write, interpreted,
    then the reference attention). Qwen3-style q/k norms keep the unfused path (the fused kernel has no
    norm). A fused path that declines after being handed partials leaves the layer to sum them itself."""
    from flax import nnx

    import rtp_jax.models.attention as attention

    monkeypatch.setattr(attention, "DECODE_QKV_SPLITS", splits)

    from kernels_pallas.rope_kv_write import rope_kv_write
    from rtp_jax.models.llama import Attention
    from rtp_jax.models.rope import rope_tables

    cfg = ModelConfig.from_hf_config({
        "architectures": ["Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM"], "vocab_size": 64,
        "hidden_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32})
    layer = Attention(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    seqs, block, blocks = 3, 4, 12
    x = jnp.asarray(rng.standard_normal((seqs, 128)), jnp.float32)
    kv_lens = jnp.asarray([5, 9, 2], jnp.int32)
    tables = jnp.asarray(rng.permutation(blocks)[:seqs * 3].reshape(seqs, 3), jnp.int32)
    positions = kv_lens - 1
    slots = tables[jnp.arange(seqs), positions // block] * block + positions % block
    md = AttentionMetadata(slots, kv_lens, tables, jnp.arange(seqs + 1, dtype=jnp.int32), jnp.int32(seqs))
    caches = tuple(jnp.asarray(rng.standard_normal((blocks, block, 2, 32)), jnp.float32) for _ in range(2))
    inv_freq = jnp.asarray(rope_tables(cfg))
    plain = _from_contract(ragged_paged_attention_reference)
    calls: list[tuple[int, ...]] = []

    def fused(h, positions, inv_freq, k_cache, v_cache, md, *, num_q_heads, sm_scale, sliding_window,
              soft_cap):
        calls.append(tuple(h.shape))
        if declines:
            return None
        q4, k_cache, v_cache = rope_kv_write(h, positions, inv_freq, k_cache, v_cache, md.slot_mapping,
                                             group_pad=8, interpret=True)
        t, kv, _, hd = h.shape[-4:]
        q = q4[:, :, :num_q_heads // kv].reshape(t, num_q_heads, hd)
        out = plain(q, k_cache, v_cache, md, sm_scale=sm_scale, sliding_window=sliding_window,
                    soft_cap=soft_cap)
        return out, k_cache, v_cache

    offering = _from_contract(ragged_paged_attention_reference)
    fused.takes_partials = True
    offering.fused_decode = fused
    want, (wk, wv) = layer(x, positions, inv_freq, tuple(jnp.array(c) for c in caches), md, plain)
    got, (gk, gv) = layer(x, positions, inv_freq, tuple(jnp.array(c) for c in caches), md, offering)
    assert calls == ([] if qk_norm else [(splits,) * bool(splits) + (seqs, 2, 4, 32)])
    for g, w in ((got, want), (gk, wk), (gv, wv)):
        tol = 2e-3 if jax.default_backend() == "gpu" else 1e-4  # TF32: split and plain GEMMs round apart
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=tol, atol=tol)


def test_qkv_partials_go_only_to_decode_steps_of_a_decoder_that_takes_them(monkeypatch: pytest.MonkeyPatch):
    """`decode_qkv_splits`: the configured split count for a decode step (one row per sequence slot) whose
    fused decoder takes partials and whose width they divide; 0 otherwise (prefill, other decoders, off)."""
    import rtp_jax.models.attention as attention

    md = AttentionMetadata(*(jnp.zeros(n, jnp.int32) for n in (3, 3, 3, 4)), jnp.int32(3))
    takes = attention.rope_write_decode
    monkeypatch.setattr(attention, "DECODE_QKV_SPLITS", 4)
    assert attention.decode_qkv_splits(takes, 3, md, 128) == 4
    assert attention.decode_qkv_splits(takes, 8, md, 128) == 0  # a prefill / mixed step
    assert attention.decode_qkv_splits(takes, 3, md, 126) == 0  # 4 does not divide the width
    assert attention.decode_qkv_splits(lambda *a, **k: None, 3, md, 128) == 0  # does not take partials
    assert attention.decode_qkv_splits(None, 3, md, 128) == 0
    big = AttentionMetadata(*(jnp.zeros(n, jnp.int32) for n in (17, 17, 17, 18)), jnp.int32(17))
    assert attention.decode_qkv_splits(takes, 17, big, 128) == 0  # past PARTIALS_MAX_ROWS: XLA's GEMM
    monkeypatch.setattr(attention, "DECODE_QKV_SPLITS", 0)
    assert attention.decode_qkv_splits(takes, 3, md, 128) == 0
