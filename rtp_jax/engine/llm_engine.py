"""LLMEngine: text in, `RequestOutput`s out, around the token-level EngineCore.

It tokenizes prompts, fans a request with `n > 1` out into n core sequences, detokenizes incrementally,
applies stop strings (finishing the core sequence at once so its blocks are freed) and keeps each
request's `RequestOutput` up to date. Both the offline `LLM` and the HTTP server drive it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from rtp_jax.config import SamplingParams
from rtp_jax.engine.core import EngineCore, EngineCoreOutput
from rtp_jax.engine.request import Logprob, PositionLogprobs, Request, RequestStatus
from rtp_jax.outputs import CompletionOutput, RequestOutput
from rtp_jax.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class _Sequence:
    """Output-side state of one core sequence (one of a request's n)."""

    parent: RequestOutput
    completion: CompletionOutput
    params: SamplingParams
    detok: IncrementalDetokenizer
    text: str = ""  # everything decoded, before stop-string truncation


def _child_id(request_id: str, index: int) -> str:
    return f"{request_id}#{index}"


def find_stop(text: str, stops: tuple[str, ...], search_from: int) -> tuple[int, str] | None:
    """Earliest (index, stop string) with the match ending after `search_from` (new text only)."""
    best: tuple[int, str] | None = None
    for s in stops:
        i = text.find(s, max(0, search_from - len(s) + 1))
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


class LLMEngine:
    def __init__(self, core: EngineCore, tokenizer: Tokenizer) -> None:
        self.core = core
        self.tokenizer = tokenizer
        self._outputs: dict[str, RequestOutput] = {}
        self._seqs: dict[str, _Sequence] = {}  # core request id -> output-side state

    # ---- input ----------------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: str | list[int] | dict[str, Any]) -> tuple[str | None, list[int]]:
        """Accepts a string, a list of token ids, or {"prompt": str} / {"prompt_token_ids": [...]}."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, list):
            return None, list(prompt)
        raise ValueError(
            f"prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def add_request(self, request_id: str, prompt: str | list[int] | dict[str, Any],
                    params: SamplingParams) -> RequestOutput:
        """Validates and queues a request; raises ValueError (nothing queued) on bad input."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if request_id in self._outputs:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text, token_ids = self.tokenize_prompt(prompt)
        token_ids = self.core.validate(token_ids)  # plain ints, whatever the caller passed
        out = RequestOutput(request_id, text, token_ids, [],
                            prompt_logprobs=[None] if params.prompt_logprobs is not None else None)
        eos = self.tokenizer.eos_token_ids
        for i in range(params.n):
            seed = params.seed + i if params.seed is not None else self.core.draw_seed()
            # Only the first sequence scores the prompt: the n sequences share it.
            child_params = params if i == 0 else params.replace(prompt_logprobs=None)
            req = Request(_child_id(request_id, i), token_ids, child_params, seed, eos_token_ids=eos)
            completion = CompletionOutput(index=i, logprobs=[] if params.logprobs is not None else None,
                                          cumulative_logprob=0.0 if params.logprobs is not None else None)
            out.outputs.append(completion)
            detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens, prompt_ids=token_ids)
            self._seqs[req.request_id] = _Sequence(out, completion, params, detok)
            self.core.add_request(req)
        out.arrival_time = req.arrival_time
        self._outputs[request_id] = out
        return out

    def abort_request(self, request_id: str) -> None:
        """Aborts every sequence of a request and frees their KV blocks; unknown ids are ignored."""
        out = self._outputs.pop(request_id, None)
        if out is None:
            return
        for c in out.outputs:
            self.core.finish_request(_child_id(request_id, c.index), RequestStatus.FINISHED_ABORTED)
            self._seqs.pop(_child_id(request_id, c.index), None)
            c.finish_reason = c.finish_reason or "abort"
        out.finished = True

    def has_unfinished_requests(self) -> bool:
        return bool(self._outputs)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._outputs)

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one engine step; returns the requests that changed (finished ones for the last time)."""
        changed: dict[str, RequestOutput] = {}
        for co in self.core.step():
            seq = self._seqs.get(co.request_id)
            if seq is None:
                continue
            self._apply(seq, co)
            changed[seq.parent.request_id] = seq.parent
        for rid, out in changed.items():
            if all(c.finished for c in out.outputs):
                out.finished = True
                self._outputs.pop(rid, None)
                for c in out.outputs:
                    self._seqs.pop(_child_id(rid, c.index), None)
        return list(changed.values())

    def _apply(self, seq: _Sequence, co: EngineCoreOutput) -> None:
        """Adds one core output to its sequence, token by token: a stop string ends the sequence at
        the token that completes it, even when the core produced more in a multi-step decode."""
        c, parent = seq.completion, seq.parent
        if co.new_prompt_logprobs and parent.prompt_logprobs is not None:
            parent.prompt_logprobs.extend(self._decode_logprobs(co.new_prompt_logprobs))
        if parent.first_token_time is None and co.new_token_ids:
            parent.first_token_time = time.monotonic()
        new_lps = self._decode_logprobs(co.new_logprobs) if c.logprobs is not None else []
        stops = seq.params.stop
        for j, tok in enumerate(co.new_token_ids):
            before = len(seq.text)
            seq.text += seq.detok.add([tok])
            c.token_ids.append(tok)
            if new_lps:
                c.logprobs.append(new_lps[j])
                c.cumulative_logprob = (c.cumulative_logprob or 0.0) + new_lps[j][tok].logprob
            hit = find_stop(seq.text, stops, before) if stops else None
            if hit is not None:
                i, s = hit
                seq.text = seq.text[: i + len(s)] if seq.params.include_stop_str_in_output else seq.text[:i]
                c.text, c.finish_reason, c.stop_reason = seq.text, "stop", s
                c.stream_text_len = len(c.text)
                self.core.finish_request(co.request_id, RequestStatus.FINISHED_STOPPED, stop_reason=s)
                return
        c.finish_reason, c.stop_reason = co.finish_reason, co.stop_reason
        if c.finished:
            seq.text += seq.detok.flush()
        c.text = seq.text
        c.stream_text_len = len(c.text) if c.finished or not stops else len(c.text) - held_back(c.text, stops)

    def _decode_logprobs(self, entries: list[PositionLogprobs | None]) -> list[PositionLogprobs | None]:
        def name(tok: int) -> str:
            return self.tokenizer.decode([tok], skip_special_tokens=False)

        return [
            None if e is None else {t: Logprob(lp.logprob, lp.rank, name(t)) for t, lp in e.items()}
            for e in entries
        ]
