"""OpenAI-shaped errors: every failure a client can cause becomes one of these, never a 500.

The body is OpenAI's `{"error": {"message", "type", "param", "code"}}`, which the official clients turn
into typed exceptions (BadRequestError, NotFoundError, RateLimitError, ...).
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error answered to the client with `status` and OpenAI's error body."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(message, status=400, param=param)


def model_not_found(model: str) -> APIError:
    return APIError(f"The model `{model}` does not exist.", status=404, param="model", code="model_not_found")


def queue_full(waiting: int, limit: int) -> APIError:
    return APIError(
        f"The server is overloaded: {waiting} requests are already waiting (--max-queue-len {limit}). "
        "Retry later.",
        status=429, type="rate_limit_error", code="queue_full",
    )


def unauthorized() -> APIError:
    return APIError("Invalid or missing API key (send `Authorization: Bearer <key>`).", status=401,
                    code="invalid_api_key")


def engine_failed(detail: str) -> APIError:
    """The engine failed while running this request; the server itself keeps serving (503: retriable)."""
    return APIError(f"The engine failed while running this request: {detail}", status=503,
                    type="server_error", code="engine_error")


def context_too_long(max_model_len: int, prompt_len: int, max_tokens: int | None) -> APIError:
    """vLLM's wording, so clients that parse it (and people) see the lengths."""
    if max_tokens is None:
        detail = f"However, your prompt has {prompt_len} tokens (at least one more must be generated)."
    else:
        detail = (f"However, you requested {prompt_len + max_tokens} tokens ({prompt_len} in the prompt, "
                  f"{max_tokens} for the completion).")
    return APIError(
        f"This model's maximum context length is {max_model_len} tokens. {detail} "
        "Please reduce the length of the prompt or completion.",
        status=400, param="max_tokens" if max_tokens is not None else "messages",
        code="context_length_exceeded",
    )
