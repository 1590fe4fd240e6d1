"""The two generation endpoints: /v1/chat/completions and /v1/completions.

A call goes: parse and validate the body (serve.protocol) -> render/tokenize prompts -> check them
against the context length -> hand them to the AsyncEngine -> stream SSE chunks or collect one
response. Everything a client can get wrong is answered as an APIError before the engine sees it.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from rtp_jax.config import SamplingParams
from rtp_jax.tokenizer import Tokenizer
from serve import openai_format as fmt
from serve.async_engine import AsyncEngine, EngineError, QueueFullError, RequestStream
from serve.errors import bad_request, context_too_long, engine_failed, model_not_found, queue_full
from serve.protocol import ModelLimits, parse_chat, parse_completion
from serve.streaming import chat_sse, completion_sse, updates_until_disconnect

Json = dict[str, Any]
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ServeContext:
    """What the handlers share: the engine, its tokenizer, and the model's name and limits."""

    engine: AsyncEngine
    tokenizer: Tokenizer
    model_name: str
    limits: ModelLimits

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise model_not_found(model)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


@dataclass(frozen=True)
class _Prompt:
    text: str
    token_ids: list[int]
    params: SamplingParams  # max_tokens fitted to this prompt

    def engine_input(self) -> Json:
        return {"prompt": self.text, "prompt_token_ids": self.token_ids}


def fit_prompt(limits: ModelLimits, text: str, ids: list[int], params: SamplingParams,
               max_tokens_given: bool) -> _Prompt:
    """Rejects prompts that do not fit the context; a defaulted max_tokens shrinks to what fits."""
    if not ids:
        raise bad_request("the prompt is empty: at least one token is needed", "prompt")
    room = limits.max_model_len - len(ids)
    if room < 1:
        raise context_too_long(limits.max_model_len, len(ids), None)
    mt = params.max_tokens
    if mt is not None and mt > room:
        if max_tokens_given:
            raise context_too_long(limits.max_model_len, len(ids), mt)
        params = params.replace(max_tokens=room, min_tokens=min(params.min_tokens, room))
    return _Prompt(text, ids, params)


async def _submit(ctx: ServeContext, prompts: list[_Prompt], prefix: str, arrival: float
                  ) -> tuple[str, RequestStream]:
    request_id = f"{prefix}-{uuid.uuid4().hex}"
    ids = [f"{request_id}-{i}" for i in range(len(prompts))]
    try:
        stream = await ctx.engine.add_requests(
            [(rid, p.engine_input(), p.params) for rid, p in zip(ids, prompts, strict=True)], arrival)
    except ValueError as e:
        raise bad_request(str(e), "prompt") from None
    except QueueFullError as e:
        raise queue_full(e.waiting, e.limit) from None
    except EngineError as e:
        raise engine_failed(str(e)) from None
    return request_id, stream


# ---- chat ---------------------------------------------------------------------------------------------

async def chat_completions(ctx: ServeContext, request: Request, body: Any) -> Response:
    arrival = time.monotonic()
    req = parse_chat(body, ctx.limits)
    ctx.check_model(req.model)
    text = render_chat(ctx.tokenizer, req.messages, req.add_generation_prompt, req.tools, req.template_kwargs)
    ids = ctx.tokenizer.encode(text, add_special_tokens=False)
    prompt = fit_prompt(ctx.limits, text, ids, req.params, req.max_tokens_given)
    request_id, stream = await _submit(ctx, [prompt], "chatcmpl", arrival)
    top = req.params.logprobs
    if req.stream:
        gen = chat_sse(stream, request, request_id=request_id, model=ctx.model_name, top=top,
                       n=req.params.n, include_usage=req.include_usage, token_text=ctx.token_text)
        return StreamingResponse(gen, media_type="text/event-stream", headers=_SSE_HEADERS)
    collected = await _collect(stream, request)
    if collected is None:
        return Response(status_code=499)  # the client is gone; nobody reads this
    choices = collected[request_id + "-0"][1]
    body = fmt.chat_response(request_id, ctx.model_name, choices, len(ids), top or 0, ctx.token_text)
    return JSONResponse(body)


def render_chat(tok: Tokenizer, messages: list[Json], add_generation_prompt: bool, tools: list[Json] | None,
                 kwargs: Json) -> str:
    try:
        return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                       **kwargs)
    except Exception as e:  # noqa: BLE001 - templates are model-supplied code; any failure is about the input
        raise bad_request(f"could not apply the chat template to these messages: {e}", "messages") from None


# ---- completions --------------------------------------------------------------------------------------

async def completions(ctx: ServeContext, request: Request, body: Any) -> Response:
    arrival = time.monotonic()
    req = parse_completion(body, ctx.limits)
    ctx.check_model(req.model)
    prompts = [_completion_prompt(ctx, p, req.params, req.max_tokens_given) for p in req.prompts]
    request_id, stream = await _submit(ctx, prompts, "cmpl", arrival)
    top, n = req.params.logprobs, req.params.n
    if req.stream:
        echo = [p.text for p in prompts] if req.echo else None
        gen = completion_sse(stream, request, request_id=request_id, model=ctx.model_name, top=top, n=n,
                             include_usage=req.include_usage, echo=echo,
                             prompt_token_ids=[p.token_ids for p in prompts], token_text=ctx.token_text)
        return StreamingResponse(gen, media_type="text/event-stream", headers=_SSE_HEADERS)
    collected = await _collect(stream, request)
    if collected is None:
        return Response(status_code=499)
    choices: list[Json] = []
    completion_tokens = 0
    for p, rid in zip(prompts, stream.request_ids, strict=True):
        prompt_lps, seqs = collected[rid]
        for c in seqs:
            completion_tokens += len(c.token_ids)
            choices.append(_completion_choice(ctx, p, c, top, prompt_lps if req.echo else None, req.echo, n,
                                              stream.index[rid]))
    return JSONResponse(fmt.completion_response(request_id, ctx.model_name, choices,
                                                sum(len(p.token_ids) for p in prompts), completion_tokens))


def _completion_prompt(ctx: ServeContext, prompt: str | list[int], params: SamplingParams,
                       max_tokens_given: bool) -> _Prompt:
    if isinstance(prompt, str):
        text, ids = prompt, ctx.tokenizer.encode(prompt)
    else:
        text, ids = ctx.tokenizer.decode(prompt, skip_special_tokens=False), prompt
    return fit_prompt(ctx.limits, text, ids, params, max_tokens_given)


def _completion_choice(ctx: ServeContext, p: _Prompt, c: fmt.Choice, top: int | None,
                       prompt_lps: list[Any] | None, echo: bool, n: int, prompt_index: int) -> Json:
    text = (p.text if echo else "") + c.text
    lps = None
    if top is not None and c.logprobs is not None:
        lps = fmt.completion_logprobs(c.token_ids, c.logprobs, top, ctx.token_text,
                                      text_offset=len(p.text) if echo else 0)
        if echo and prompt_lps is not None:
            lps = fmt.merge_completion_logprobs(
                fmt.completion_logprobs(p.token_ids, prompt_lps, top, ctx.token_text), lps)
    return fmt.completion_choice(prompt_index * n + c.index, text, lps, c.finish_reason, c.stop_reason)


# ---- collecting a whole response ----------------------------------------------------------------------

Collected = dict[str, tuple[list[Any] | None, list[fmt.Choice]]]  # request id -> (prompt logprobs, choices)


async def _collect(stream: RequestStream, request: Request) -> Collected | None:
    """Gathers every update into whole choices; None if the client disconnected first (aborted)."""
    out: Collected = {rid: (None, []) for rid in stream.request_ids}
    try:
        async for update in updates_until_disconnect(stream, _watchable(request)):
            choices = out[update.request_id][1]
            if update.prompt_logprobs is not None:
                out[update.request_id] = (update.prompt_logprobs, choices)
            for d in update.seqs:
                while len(choices) <= d.index:
                    choices.append(fmt.Choice(len(choices)))
                _extend(choices[d.index], d)
        return out if stream.finished else None
    except EngineError as e:
        raise engine_failed(str(e)) from None
    finally:
        stream.abort()


def _extend(c: fmt.Choice, d: Any) -> None:
    c.text += d.text
    c.token_ids.extend(d.token_ids)
    if d.logprobs is not None:
        c.logprobs = (c.logprobs or []) + d.logprobs
    if d.finish_reason is not None:
        c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason


def _watchable(request: Request) -> Request | None:
    """Disconnect polling reads the ASGI receive channel; only do it once the body has been read."""
    return request if getattr(request, "_body", None) is not None else None
