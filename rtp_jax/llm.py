"""The offline API, shaped like vLLM's:

    from rtp_jax import LLM, SamplingParams
    llm = LLM()                                   # the embedded SmolLM2-135M-Instruct
    outs = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=16))
    print(outs[0].outputs[0].text)
    llm.chat([{"role": "user", "content": "Hi!"}])
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from rtp_jax.config import SamplingParams
from rtp_jax.engine.args import EngineArgs, build_engine
from rtp_jax.engine.llm_engine import LLMEngine
from rtp_jax.outputs import RequestOutput
from rtp_jax.tokenizer import Tokenizer

PromptType = str | list[int] | dict[str, Any]
Conversation = list[dict[str, Any]]


class LLM:
    """An engine plus tokenizer for batch generation. Keyword options are those of `EngineArgs`
    (dtype, max_model_len, gpu_memory_utilization, max_num_batched_tokens, max_num_seqs, block_size,
    num_kv_blocks, enable_prefix_caching, seed, attention_backend, load_format, *_parallel_size)."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("offline", True)
        self.engine: LLMEngine = build_engine(EngineArgs.from_kwargs(model=model, **kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generates for every prompt; returns outputs in prompt order.

        Every prompt is validated before any is queued, so a bad one raises ValueError and leaves the
        engine as it was.
        """
        prompt_list = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompt_list))
        tokenized = [self.engine.tokenize_prompt(p) for p in prompt_list]
        for i, (_, ids) in enumerate(tokenized):
            try:
                self.engine.core.validate(ids)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        request_ids = []
        for (text, ids), p in zip(tokenized, params, strict=True):
            rid = str(next(self._ids))
            self.engine.add_request(rid, {"prompt": text, "prompt_token_ids": ids}, p)
            request_ids.append(rid)
        return self._run(request_ids, use_tqdm)

    def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        """Applies the model's chat template to one conversation or a list of them, then generates."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.engine.tokenizer
        prompts = [
            {"prompt_token_ids": tok.encode(
                tok.apply_chat_template(conv, add_generation_prompt=add_generation_prompt,
                                        chat_template=chat_template),
                add_special_tokens=False)}
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        wanted = set(request_ids)
        bar = tqdm(total=len(request_ids), desc="Generating", disable=not use_tqdm or len(request_ids) < 2)
        try:
            while self.engine.has_unfinished_requests() and len(finished) < len(wanted):
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        finished[out.request_id] = out
                        bar.update(1)
        except BaseException:
            for rid in wanted - set(finished):
                self.engine.abort_request(rid)  # leave the engine clean for the next call
            raise
        finally:
            bar.close()
        return [finished[r] for r in request_ids]


def _as_prompt_list(prompts: PromptType | Sequence[PromptType]) -> list[PromptType]:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    if isinstance(prompts, list) and prompts and isinstance(prompts[0], int):
        return [prompts]  # one prompt given as token ids
    out = list(prompts)
    if not out:
        raise ValueError("prompts is empty")
    return out


def _as_params_list(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"sampling_params has {len(params)} entries for {n} prompts")
    return params
