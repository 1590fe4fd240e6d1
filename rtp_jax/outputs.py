"""vLLM-shaped results of the offline API and the server."""

from __future__ import annotations

from dataclasses import dataclass, field

from rtp_jax.engine.request import Logprob, PositionLogprobs

__all__ = ["CompletionOutput", "Logprob", "RequestOutput"]


@dataclass
class CompletionOutput:
    """One of the `n` sequences of a request.

    `text` is everything decoded so far (stop string removed unless asked to keep it); `stream_text_len`
    is how much of it is final: a tail that might still grow into a stop string is held back from
    streams until the next token settles it.
    """

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    stream_text_len: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's state after a step. `prompt_logprobs` is [None, {token: Logprob}, ...] when asked."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    finished: bool = False
    arrival_time: float = 0.0
    first_token_time: float | None = None
    num_cached_tokens: int = 0

