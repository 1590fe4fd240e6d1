"""Mixture-of-experts: routing, grouped expert matmul, checkpoint name mapping, parity with transformers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtp_jax.config import ModelConfig
from rtp_jax.models.moe import experts_forward, route
from rtp_jax.models.params import load_state, map_moe_name

ATOL = 1e-4


def _naive_experts(x, ids, w, gate, up, down):
    out = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            g, u = gate[e] @ x[t], up[e] @ x[t]
            out[t] += w[t, j] * (down[e] @ (g / (1 + np.exp(-g)) * u))
    return out


def test_experts_forward_matches_naive_and_splits_by_expert() -> None:
    rng = np.random.default_rng(0)
    t, d, i, e, k = 7, 16, 8, 6, 2
    x = rng.normal(size=(t, d)).astype(np.float32)
    gate, up = rng.normal(size=(2, e, i, d)).astype(np.float32) * 0.3
    down = rng.normal(size=(e, d, i)).astype(np.float32) * 0.3
    w, ids = route(jnp.asarray(rng.normal(size=(t, e)), jnp.float32), k, True, jnp.float32)
    want = _naive_experts(x, np.asarray(ids), np.asarray(w), gate, up, down)
    got = experts_forward(jnp.asarray(x), ids, w, jnp.asarray(gate), jnp.asarray(up), jnp.asarray(down))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
    # Expert parallelism: each shard computes its experts' pairs; the shards sum to the whole.
    parts = [experts_forward(jnp.asarray(x), ids, w, jnp.asarray(gate[s:s + 2]), jnp.asarray(up[s:s + 2]),
                             jnp.asarray(down[s:s + 2]), s) for s in (0, 2, 4)]
    np.testing.assert_allclose(np.asarray(sum(parts)), want, atol=1e-4)


def test_route_is_softmax_topk_with_optional_renormalisation() -> None:
    logits = jnp.log(jnp.asarray([[0.1, 0.5, 0.15, 0.25]], jnp.float32))
    w, ids = route(logits, 2, False, jnp.float32)
    assert ids.tolist() == [[1, 3]]
    np.testing.assert_allclose(np.asarray(w), [[0.5, 0.25]], rtol=1e-6)
    w, _ = route(logits, 2, True, jnp.float32)
    np.testing.assert_allclose(np.asarray(w), [[2 / 3, 1 / 3]], rtol=1e-6)


@pytest.mark.parametrize(("name", "want"), [
    ("model.layers.3.block_sparse_moe.experts.7.w1.weight", ("model.layers.3.mlp.experts.gate_proj", 7,
                                                             None)),
    ("model.layers.3.block_sparse_moe.experts.7.w3.weight", ("model.layers.3.mlp.experts.up_proj", 7, None)),
    ("model.layers.3.block_sparse_moe.experts.0.w2.weight", ("model.layers.3.mlp.experts.down_proj", 0,
                                                             None)),
    ("model.layers.0.block_sparse_moe.gate.weight", ("model.layers.0.mlp.gate.weight", None, None)),
    ("model.layers.1.mlp.experts.5.gate_proj.weight", ("model.layers.1.mlp.experts.gate_proj", 5, None)),
    ("model.layers.1.mlp.experts.gate_up_proj", ("model.layers.1.mlp.experts.gate_proj", None, "gate_up")),
    ("model.layers.1.mlp.experts.down_proj", ("model.layers.1.mlp.experts.down_proj", None, None)),
    ("model.layers.1.self_attn.q_proj.weight", ("model.layers.1.self_attn.q_proj.weight", None, None)),
])
def test_checkpoint_names_map_to_stacked_experts(name: str, want: tuple) -> None:
    assert map_moe_name(name) == want


def _tiny_moe() -> ModelConfig:
    return ModelConfig("Qwen3MoeForCausalLM", vocab_size=32, hidden_size=16, intermediate_size=0,
                       num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, qk_norm=True, num_experts=3,
                       num_experts_per_tok=2, moe_intermediate_size=4)


def _per_expert_weights(cfg: ModelConfig) -> dict[str, np.ndarray]:
    from sharding import hf_param_shapes

    rng = np.random.default_rng(0)
    out: dict[str, np.ndarray] = {}
    for name, shape in hf_param_shapes(cfg).items():
        if ".experts." in name:
            for e in range(cfg.num_experts):
                out[name.replace("experts.", f"experts.{e}.") + ".weight"] = rng.normal(size=shape[1:])
        else:
            out[name] = rng.normal(size=shape)
    return {k: v.astype(np.float32) for k, v in out.items()}


def test_fused_and_per_expert_checkpoints_load_the_same() -> None:
    cfg = _tiny_moe()
    per_expert = _per_expert_weights(cfg)
    fused = {k: v for k, v in per_expert.items() if ".experts." not in k}
    p = "model.layers.0.mlp.experts"
    e = range(cfg.num_experts)
    gate_up = [np.concatenate([per_expert[f"{p}.{i}.{proj}.weight"] for proj in ("gate_proj", "up_proj")])
               for i in e]
    fused[f"{p}.gate_up_proj"] = np.stack(gate_up)
    fused[f"{p}.down_proj"] = np.stack([per_expert[f"{p}.{i}.down_proj.weight"] for i in e])
    _, a = load_state(cfg, jnp.float32, iter(per_expert.items()))
    _, b = load_state(cfg, jnp.float32, iter(fused.items()))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(a["model"]["layers"][0]["mlp"]["experts"]["up_proj"][...][2]),
                                  per_expert[f"{p}.2.up_proj.weight"])


def test_missing_expert_is_reported() -> None:
    cfg = _tiny_moe()
    weights = {k: v for k, v in _per_expert_weights(cfg).items() if ".experts.2.up_proj" not in k}
    with pytest.raises(ValueError, match="2 of 3 experts"):
        load_state(cfg, jnp.float32, iter(weights.items()))


def test_config_reads_moe_fields_and_rejects_dense_interleaving() -> None:
    base = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 32, "hidden_size": 16,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_experts": 4,
            "num_experts_per_tok": 2, "moe_intermediate_size": 8, "norm_topk_prob": False}
    cfg = ModelConfig.from_hf_config(base)
    assert (cfg.num_experts, cfg.moe_intermediate_size, cfg.norm_topk_prob) == (4, 8, False)
    assert cfg.qk_norm
    mixtral = ModelConfig.from_hf_config({**base, "architectures": ["MixtralForCausalLM"],
                                          "num_experts": None, "num_local_experts": 4,
                                          "moe_intermediate_size": None})
    assert (mixtral.num_experts, mixtral.moe_intermediate_size, mixtral.norm_topk_prob) == (4, 64, True)
    for bad in ({"decoder_sparse_step": 2}, {"mlp_only_layers": [0]}):
        with pytest.raises(ValueError, match="dense layers"):
            ModelConfig.from_hf_config({**base, **bad})


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_prompt_logprobs_and_greedy_tokens_match_transformers(tiny_hf_model, family: str) -> None:
    import torch
    import transformers

    from rtp_jax import LLM, SamplingParams

    path = tiny_hf_model(family)
    ids = [5, 17, 300, 42, 99, 7, 250, 11, 3, 400, 128, 64]
    llm = LLM(str(path), dtype="float32", max_model_len=64, num_kv_blocks=16, attention_backend="reference")
    out = llm.generate({"prompt_token_ids": ids},
                       SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=0, ignore_eos=True),
                       use_tqdm=False)[0]
    ours = np.array([next(iter(p.values())).logprob for p in out.prompt_logprobs[1:]])
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)[0, len(ids):]
    ref = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
    assert list(out.outputs[0].token_ids) == greedy.tolist()
