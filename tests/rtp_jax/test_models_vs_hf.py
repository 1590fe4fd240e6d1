"""Every supported dense family matches HF transformers (CPU torch, fp32) on the same tiny weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from rtp_jax import LLM, SamplingParams

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

DENSE_FAMILIES = ("llama", "llama2", "mistral", "qwen2", "qwen3")


def _hf_reference(path: Path, prompt: list[int], new_tokens: int) -> tuple[np.ndarray, list[int]]:
    """HF's logprob of each next prompt token, and its greedy continuation."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
        greedy = hf.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    return np.array([logp[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]), greedy


@pytest.mark.parametrize("family", DENSE_FAMILIES)
def test_prompt_logprobs_and_greedy_match_transformers(family: str,
                                                       tiny_hf_model: Callable[..., Path]) -> None:
    """Prompt logprobs agree with HF within 1e-4 and the greedy continuation is token-identical.

    The 40-token prompt is longer than Mistral's 16-token sliding window, and Llama uses llama3 rope
    scaling, so both code paths are exercised.
    """
    path = tiny_hf_model(family)
    prompt = np.random.default_rng(0).integers(3, 512, 40).tolist()
    ref_lp, ref_greedy = _hf_reference(path, prompt, 16)

    llm = LLM(str(path), dtype="float32", max_model_len=256)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, prompt_logprobs=0)
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]

    assert out.prompt_logprobs[0] is None
    ours = np.array([out.prompt_logprobs[i + 1][prompt[i + 1]].logprob for i in range(len(prompt) - 1)])
    np.testing.assert_allclose(ours, ref_lp, atol=1e-4)
    assert out.outputs[0].token_ids == ref_greedy


def test_sharded_checkpoint_loads_same_as_single(tiny_hf_model: Callable[..., Path]) -> None:
    """A checkpoint split over several safetensors files with an index gives the same logprobs."""
    prompt = list(range(10, 30))
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1)
    outs = [
        LLM(str(tiny_hf_model("llama", sharded=s)), dtype="float32", max_model_len=64)
        .generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
        for s in (False, True)
    ]
    a = [e[t].logprob for e, t in zip(outs[0].prompt_logprobs[1:], prompt[1:], strict=True)]
    b = [e[t].logprob for e, t in zip(outs[1].prompt_logprobs[1:], prompt[1:], strict=True)]
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
