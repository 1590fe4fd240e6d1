"""The Starlette app: OpenAI's routes plus vLLM's /health, /metrics, /tokenize and /detokenize.

    app = build_app(engine, "my-model", max_queue_len=256)   # engine: an LLMEngine built by the caller
    uvicorn.run(app, host="127.0.0.1", port=8000)

The app's lifespan starts the AsyncEngine's thread and stops it on shutdown. Every route goes through
`_endpoint`, which checks the API key, parses the JSON body and turns APIError into OpenAI's error body,
so a bad request is always a 4xx and never reaches the engine.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rtp_jax.engine.llm_engine import LLMEngine
from serve import generate
from serve.async_engine import AsyncEngine
from serve.errors import APIError, bad_request, unauthorized
from serve.generate import ServeContext
from serve.metrics import CONTENT_TYPE, ServerMetrics
from serve.protocol import Fields, ModelLimits, parse_chat

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE_LEN = 1024
_MAX_BODY_BYTES = 64 << 20

Handler = Callable[[ServeContext, Request, Any], Awaitable[Response]]


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    if len(raw) > _MAX_BODY_BYTES:
        raise APIError(f"request body is larger than {_MAX_BODY_BYTES} bytes", status=413)
    if not raw.strip():
        raise bad_request("the request body is empty; expected a JSON object")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and bad UTF-8 are ValueErrors
        raise bad_request(f"the request body is not valid JSON: {e}") from None


def _endpoint(ctx: ServeContext, handler: Handler, *, body: bool, api_key: str | None) -> Callable:
    async def endpoint(request: Request) -> Response:
        try:
            if api_key is not None and not _authorized(request, api_key):
                raise unauthorized()
            return await handler(ctx, request, await _json_body(request) if body else None)
        except APIError as e:
            return error_response(e)

    return endpoint


def _authorized(request: Request, api_key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


# ---- small routes -------------------------------------------------------------------------------------

async def health(ctx: ServeContext, request: Request, body: Any) -> Response:
    if not ctx.engine.is_alive:
        return JSONResponse({"status": "engine stopped"}, status_code=503)
    return JSONResponse({"status": "ok"})


async def models(ctx: ServeContext, request: Request, body: Any) -> Response:
    card = {"id": ctx.model_name, "object": "model", "created": 0, "owned_by": "rtp-jax",
            "root": ctx.model_name, "parent": None, "max_model_len": ctx.limits.max_model_len,
            "vocab_size": ctx.limits.vocab_size}  # rtp-jax extra: lets `bench serve` send token-id prompts
    return JSONResponse({"object": "list", "data": [card]})


def _metrics_route(metrics: ServerMetrics) -> Handler:
    async def metrics_endpoint(ctx: ServeContext, request: Request, body: Any) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return metrics_endpoint


async def tokenize(ctx: ServeContext, request: Request, body: Any) -> Response:
    """vLLM's /tokenize: {"prompt": str} or {"messages": [...]} -> {"count", "max_model_len", "tokens"}."""
    f = Fields(body)
    ctx.check_model(f.string("model"))
    if f.raw("messages") is not None:
        chat = parse_chat({"messages": f.raw("messages"),
                           "add_generation_prompt": f.raw("add_generation_prompt")}, ctx.limits)
        text = generate.render_chat(ctx.tokenizer, chat.messages, chat.add_generation_prompt, None, {})
        ids = ctx.tokenizer.encode(text, add_special_tokens=f.boolean("add_special_tokens", False))
    else:
        prompt = f.string("prompt")
        if prompt is None:
            raise bad_request("'prompt' (a string) or 'messages' is required", "prompt")
        ids = ctx.tokenizer.encode(prompt, add_special_tokens=f.boolean("add_special_tokens", True))
    strs = [ctx.token_text(t) for t in ids] if f.boolean("return_token_strs", False) else None
    return JSONResponse({"count": len(ids), "max_model_len": ctx.limits.max_model_len, "tokens": ids,
                         "token_strs": strs})


async def detokenize(ctx: ServeContext, request: Request, body: Any) -> Response:
    f = Fields(body)
    ctx.check_model(f.string("model"))
    ids = f.token_ids("tokens", ctx.limits.vocab_size)
    if ids is None:
        raise bad_request("'tokens' (a list of token ids) is required", "tokens")
    return JSONResponse({"prompt": ctx.tokenizer.decode(ids, skip_special_tokens=False)})


# ---- the app ------------------------------------------------------------------------------------------

async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 in OpenAI's shape, so clients parse every error the same way."""
    assert isinstance(exc, HTTPException)
    return error_response(APIError(str(exc.detail), status=exc.status_code,
                                   code="not_found" if exc.status_code == 404 else None))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return error_response(APIError(f"internal server error: {type(exc).__name__}", status=500,
                                   type="server_error"))


def build_app(engine: LLMEngine, served_model_name: str, max_queue_len: int | None = DEFAULT_MAX_QUEUE_LEN,
              api_key: str | None = None) -> Starlette:
    """The server app around an already built engine; the engine thread runs for the app's lifespan."""
    metrics = ServerMetrics(served_model_name)
    async_engine = AsyncEngine(engine, metrics, max_queue_len=max_queue_len)
    vocab = max(engine.core.config.model.vocab_size, 1)
    limits = ModelLimits(vocab_size=vocab, max_model_len=engine.core.config.scheduler.max_model_len)
    ctx = ServeContext(async_engine, engine.tokenizer, served_model_name, limits)

    def route(path: str, handler: Handler, method: str, *, protected: bool = True) -> Route:
        endpoint = _endpoint(ctx, handler, body=method == "POST", api_key=api_key if protected else None)
        return Route(path, endpoint, methods=[method])

    routes = [
        route("/health", health, "GET", protected=False),
        route("/metrics", _metrics_route(metrics), "GET", protected=False),
        route("/v1/models", models, "GET"),
        route("/v1/chat/completions", generate.chat_completions, "POST"),
        route("/v1/completions", generate.completions, "POST"),
        route("/tokenize", tokenize, "POST"),
        route("/detokenize", detokenize, "POST"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async_engine.start()
        try:
            yield
        finally:
            async_engine.shutdown()

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _internal_error})
    app.state.ctx = ctx
    app.state.metrics = metrics
    return app
