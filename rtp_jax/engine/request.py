"""A request's state as the engine core sees it: token ids in, token ids (and logprobs) out."""

from __future__ import annotations

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import overload

from rtp_jax.config import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"  # EOS, a stop token or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or max_model_len
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


@dataclass(frozen=True)
class Logprob:
    """One token's log probability and its rank in the model's distribution (1 = most likely)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per position: token id -> Logprob (the chosen/actual token plus the top-k alternatives).
PositionLogprobs = dict[int, Logprob]


class TokenView(Sequence[int]):
    """prompt + output as one read-only sequence, without concatenating them (hot path)."""

    __slots__ = ("_prompt", "_output")

    def __init__(self, prompt: list[int], output: list[int]) -> None:
        self._prompt, self._output = prompt, output

    def __len__(self) -> int:
        return len(self._prompt) + len(self._output)

    @overload
    def __getitem__(self, i: int) -> int: ...
    @overload
    def __getitem__(self, i: slice) -> list[int]: ...

    def __getitem__(self, i: int | slice) -> int | list[int]:
        n = len(self._prompt)
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            if stop <= n:
                return self._prompt[start:stop]
            if start >= n:
                return self._output[start - n:stop - n]
            return self._prompt[start:] + self._output[: stop - n]
        if i < 0:
            i += len(self)
        return self._prompt[i] if i < n else self._output[i - n]


@dataclass
class Request:
    """Mutable per-request state owned by the engine core.

    `num_computed_tokens` counts tokens whose KV is in the cache; the tokens still to feed are
    `all_token_ids[num_computed_tokens:]`. After a preemption it drops to 0 and the prompt and the
    outputs so far are recomputed together, so the request continues exactly where it was.
    `num_pending` counts tokens sampled by a step still in flight (overlapped scheduling): they exist on
    the device but are not in `output_token_ids` yet; the next step feeds the last of them from there.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # the per-request PRNG seed (drawn by the engine when params.seed is None)
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    logprobs: list[PositionLogprobs] = field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] = field(default_factory=list)
    first_token_time: float | None = None
    num_pending: int = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_view(self) -> TokenView:
        return TokenView(self.prompt_token_ids, self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_total_tokens(self) -> int:
        """Tokens known on the host plus those sampled by the step in flight."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        """Output tokens including those of the step in flight (sampling step counter, max_tokens)."""
        return len(self.output_token_ids) + self.num_pending

    @property
    def needs_host_tokens(self) -> bool:
        """Sampling reads the output tokens themselves (penalties), so no step may be scheduled while
        one that samples for this request is in flight."""
        p = self.params
        return p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs are still owed for positions this request has not yet reported."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def stop_token_ids(self) -> set[int]:
        ids = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            ids.update(self.eos_token_ids)
        return ids
