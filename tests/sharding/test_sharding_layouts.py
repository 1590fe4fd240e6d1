"""Every layout gives the single-device greedy tokens and prompt logprobs (fp32, within 1e-4)."""

from __future__ import annotations

import numpy as np
import pytest

ATOL = 1e-4

DENSE_LAYOUTS = ["tp2", "tp4", "tp8", "dp2-tp4", "pp2-tp2", "dp2-pp2-tp2"]
MOE_LAYOUTS = ["ep2", "ep8", "tp4", "ep2-tp4", "ep4-tp2", "dp2-ep2-tp2", "pp2-ep2-tp2"]


def _assert_same(got: tuple, want: tuple) -> None:
    assert got[0] == want[0], "greedy tokens differ from one device"
    for g, w in zip(got[1], want[1], strict=True):
        assert g.shape == w.shape and g.size > 0
        np.testing.assert_allclose(g, w, atol=ATOL, rtol=0)


@pytest.mark.parametrize("spec", DENSE_LAYOUTS)
def test_dense_layout_matches_one_device(run_layout, spec: str) -> None:
    _assert_same(run_layout("dense", spec), run_layout("dense", "tp1"))


@pytest.mark.parametrize("spec", MOE_LAYOUTS)
def test_moe_layout_matches_one_device(run_layout, spec: str) -> None:
    _assert_same(run_layout("moe", spec), run_layout("moe", "tp1"))


@pytest.mark.parametrize(("family", "kw"), [
    ("qwen3_moe", {"tensor_parallel_size": 2, "expert_parallel_size": 2}),
    ("mixtral", {"tensor_parallel_size": 2, "expert_parallel_size": 4}),
    ("qwen3", {"tensor_parallel_size": 2, "data_parallel_size": 2, "pipeline_parallel_size": 2}),
])
def test_llm_layout_matches_transformers(tiny_hf, family: str, kw: dict) -> None:
    """The full path (checkpoint streamed onto the mesh, LLM options) against transformers on CPU."""
    import torch
    import transformers

    from rtp_jax import LLM, SamplingParams

    path = tiny_hf(family)
    llm = LLM(str(path), dtype="float32", max_model_len=64, num_kv_blocks=32, max_num_seqs=4,
              max_num_batched_tokens=16, attention_backend="reference", **kw)
    ids = [5, 17, 300, 42, 99, 7, 250, 11, 3, 400, 128, 64, 77, 31, 8, 200, 19]
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=0, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": ids}] * 2, params, use_tqdm=False)
    ours = np.array([next(iter(p.values())).logprob for p in out[0].prompt_logprobs[1:]])
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    ref = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
    assert out[0].outputs[0].token_ids == out[1].outputs[0].token_ids  # both dp replicas agree
