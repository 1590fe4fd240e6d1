"""OpenAI response bodies (whole responses and stream chunks) as plain dicts.

Pure functions of the collected outputs: no engine, no HTTP. Logprobs are clamped to -9999.0 (as
vLLM does) because JSON has no -Infinity and the official clients' strict parsers reject it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rtp_jax.engine.request import Logprob, PositionLogprobs

Json = dict[str, Any]
TokenText = Callable[[int], str]  # token id -> its text (for tokens the engine did not name)

_MIN_LOGPROB = -9999.0


def _lp(x: float) -> float:
    return _MIN_LOGPROB if math.isnan(x) or x < _MIN_LOGPROB else x


def _name(tok: int, lp: Logprob, token_text: TokenText) -> str:
    return lp.decoded_token if lp.decoded_token is not None else token_text(tok)


def _top(entry: PositionLogprobs, k: int) -> list[tuple[int, Logprob]]:
    """The k most likely alternatives at one position, by rank (the chosen token too if it ranks)."""
    ranked = sorted(((lp.rank, tok, lp) for tok, lp in entry.items() if lp.rank is not None and lp.rank <= k),
                    key=lambda x: x[0])
    return [(tok, lp) for _, tok, lp in ranked[:k]]


@dataclass
class Choice:
    """Everything collected for one choice of a non-streamed response."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


def usage(prompt_tokens: int, completion_tokens: int) -> Json:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def now() -> int:
    return int(time.time())


# ---- chat ---------------------------------------------------------------------------------------------

def chat_logprobs(token_ids: Sequence[int], entries: Sequence[PositionLogprobs], top: int,
                  token_text: TokenText) -> Json:
    content = []
    for tok, entry in zip(token_ids, entries, strict=False):
        chosen = entry.get(tok)
        name = _name(tok, chosen, token_text) if chosen is not None else token_text(tok)
        content.append({
            "token": name,
            "logprob": _lp(chosen.logprob) if chosen is not None else _MIN_LOGPROB,
            "bytes": list(name.encode("utf-8")),
            "top_logprobs": [_chat_top(_name(t, lp, token_text), lp) for t, lp in _top(entry, top)],
        })
    return {"content": content}


def _chat_top(name: str, lp: Logprob) -> Json:
    return {"token": name, "logprob": _lp(lp.logprob), "bytes": list(name.encode("utf-8"))}


def chat_response(request_id: str, model: str, choices: Sequence[Choice], prompt_tokens: int, top: int,
                  token_text: TokenText) -> Json:
    return {
        "id": request_id, "object": "chat.completion", "created": now(), "model": model,
        "choices": [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": (None if c.logprobs is None
                             else chat_logprobs(c.token_ids, c.logprobs, top, token_text)),
                "finish_reason": _finish(c.finish_reason),
                "stop_reason": c.stop_reason,
            }
            for c in choices
        ],
        "usage": usage(prompt_tokens, sum(len(c.token_ids) for c in choices)),
    }


def chat_chunk(request_id: str, model: str, created: int, index: int, delta: Json,
               logprobs: Json | None = None, finish_reason: str | None = None,
               with_usage: bool = False) -> Json:
    chunk: Json = {
        "id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                     "finish_reason": _finish(finish_reason)}],
    }
    if with_usage:
        chunk["usage"] = None  # OpenAI: null on every chunk but the final usage chunk
    return chunk


def usage_chunk(request_id: str, model: str, created: int, obj: str, prompt_tokens: int,
                completion_tokens: int) -> Json:
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


# ---- completions -------------------------------------------------------------------------------------

def completion_logprobs(token_ids: Sequence[int], entries: Sequence[PositionLogprobs | None], top: int,
                        token_text: TokenText, text_offset: int = 0) -> Json:
    """The legacy shape: parallel lists; entries may be None (the first prompt token has no logprob)."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for tok, entry in zip(token_ids, entries, strict=False):
        chosen = entry.get(tok) if entry is not None else None
        name = _name(tok, chosen, token_text) if chosen is not None else token_text(tok)
        tokens.append(name)
        if entry is None:
            token_lps.append(None)
        else:
            token_lps.append(_lp(chosen.logprob) if chosen is not None else _MIN_LOGPROB)
        tops.append(None if entry is None else
                    {_name(t, lp, token_text): _lp(lp.logprob) for t, lp in _top(entry, top)})
        offsets.append(text_offset)
        text_offset += len(name)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def merge_completion_logprobs(a: Json, b: Json) -> Json:
    return {k: a[k] + b[k] for k in a}


def completion_choice(index: int, text: str, logprobs: Json | None, finish_reason: str | None,
                      stop_reason: int | str | None = None) -> Json:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": _finish(finish_reason),
            "stop_reason": stop_reason}


def completion_response(request_id: str, model: str, choices: list[Json], prompt_tokens: int,
                        completion_tokens: int) -> Json:
    return {"id": request_id, "object": "text_completion", "created": now(), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def completion_chunk(request_id: str, model: str, created: int, choice: Json,
                     with_usage: bool = False) -> Json:
    chunk: Json = {"id": request_id, "object": "text_completion", "created": created, "model": model,
                   "choices": [choice]}
    if with_usage:
        chunk["usage"] = None
    return chunk


def _finish(reason: str | None) -> str | None:
    # "abort" only reaches a client when the server stops mid-request; OpenAI has no such reason.
    return "stop" if reason == "abort" else reason
