"""Server-sent events for streamed chat and text completions, in OpenAI's chunk format.

Each generator owns its RequestStream: whatever ends it (the last update, an engine error, or the
client going away, which Starlette signals by cancelling the generator) aborts what is still running
in `finally`, so a dropped client frees its KV blocks at once. While a request waits in the queue no
bytes flow, so the generator also polls `request.is_disconnected()` between updates.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request

from serve import openai_format as fmt
from serve.async_engine import EngineError, RequestStream, RequestUpdate
from serve.errors import engine_failed

DISCONNECT_POLL_S = 0.5


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, allow_nan=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def updates_until_disconnect(stream: RequestStream, request: Request | None,
                                   poll_s: float = DISCONNECT_POLL_S) -> AsyncIterator[RequestUpdate]:
    """The stream's updates; stops early (the caller aborts) once the client has disconnected."""
    while True:
        try:
            update = await stream.next(timeout=poll_s if request is not None else None)
        except TimeoutError:
            if request is not None and await request.is_disconnected():
                return
            continue
        if update is None:
            return
        yield update


async def chat_sse(stream: RequestStream, request: Request, *, request_id: str, model: str, top: int | None,
                   n: int, include_usage: bool, token_text: fmt.TokenText) -> AsyncIterator[str]:
    created = fmt.now()

    def chunk(index: int, delta: dict[str, Any], **kw: Any) -> str:
        return sse(fmt.chat_chunk(request_id, model, created, index, delta, with_usage=include_usage, **kw))

    prompt_tokens = completion_tokens = 0
    try:
        for i in range(n):
            yield chunk(i, {"role": "assistant", "content": ""})
        async for update in updates_until_disconnect(stream, request):
            prompt_tokens = update.num_prompt_tokens or prompt_tokens
            for d in update.seqs:
                completion_tokens += len(d.token_ids)
                lps = None
                if top is not None and d.logprobs:
                    lps = fmt.chat_logprobs(d.token_ids, d.logprobs, top, token_text)
                if d.text or lps:
                    yield chunk(d.index, {"content": d.text}, logprobs=lps)
                if d.finish_reason is not None:
                    yield chunk(d.index, {}, finish_reason=d.finish_reason)
        if stream.finished:
            if include_usage:
                yield sse(fmt.usage_chunk(request_id, model, created, "chat.completion.chunk", prompt_tokens,
                                          completion_tokens))
            yield SSE_DONE
    except EngineError as e:
        yield sse(engine_failed(str(e)).body())
        yield SSE_DONE
    finally:
        stream.abort()


async def completion_sse(stream: RequestStream, request: Request, *, request_id: str, model: str,
                         top: int | None, n: int, include_usage: bool, echo: list[str] | None,
                         prompt_token_ids: list[list[int]], token_text: fmt.TokenText) -> AsyncIterator[str]:
    """`echo` holds each prompt's text when the prompt is to be repeated before its completion."""
    created = fmt.now()
    offsets: dict[int, int] = {}  # choice index -> text offset of its next token (logprobs)
    prompt_tokens: dict[str, int] = {}
    completion_tokens = 0

    def chunk(index: int, text: str, lps: dict[str, Any] | None = None, finish: str | None = None,
              stop_reason: int | str | None = None) -> str:
        choice = fmt.completion_choice(index, text, lps, finish, stop_reason)
        return sse(fmt.completion_chunk(request_id, model, created, choice, with_usage=include_usage))

    try:
        async for update in updates_until_disconnect(stream, request):
            p = stream.index[update.request_id]
            if update.request_id not in prompt_tokens:
                prompt_tokens[update.request_id] = update.num_prompt_tokens
                if echo is not None:
                    for i in range(n):
                        lps = None
                        if top is not None and update.prompt_logprobs is not None:
                            lps = fmt.completion_logprobs(prompt_token_ids[p], update.prompt_logprobs, top,
                                                          token_text)
                        offsets[p * n + i] = len(echo[p])
                        yield chunk(p * n + i, echo[p], lps)
            for d in update.seqs:
                index = p * n + d.index
                completion_tokens += len(d.token_ids)
                lps = None
                if top is not None and d.logprobs:
                    lps = fmt.completion_logprobs(d.token_ids, d.logprobs, top, token_text,
                                                  offsets.get(index, 0))
                    offsets[index] = offsets.get(index, 0) + sum(len(t) for t in lps["tokens"])
                if d.text or lps or d.finish_reason is not None:
                    yield chunk(index, d.text, lps, d.finish_reason, d.stop_reason)
        if stream.finished:
            if include_usage:
                yield sse(fmt.usage_chunk(request_id, model, created, "text_completion",
                                          sum(prompt_tokens.values()), completion_tokens))
            yield SSE_DONE
    except EngineError as e:
        yield sse(engine_failed(str(e)).body())
        yield SSE_DONE
    finally:
        stream.abort()
