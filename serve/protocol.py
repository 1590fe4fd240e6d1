"""OpenAI request bodies: JSON in, typed and validated requests out.

Parsing is explicit (a reader per JSON type) so each error names its field and nothing reaches the
engine that it might choke on: types are checked here, value ranges by `SamplingParams` (its ValueError
becomes a 400 naming the field), and token-id bounds against the model's vocabulary, since an
out-of-range id in a batched device array would fail every request sharing the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from rtp_jax.config import MAX_LOGPROBS, SamplingParams
from serve.errors import bad_request, model_not_found

Json = dict[str, Any]

_ROLES = ("system", "user", "assistant", "tool", "developer", "function")
_MAX_STOPS = 16
_MAX_N = 16


class Fields:
    """Typed readers over one JSON object; `null` reads as the default, as in OpenAI's API."""

    def __init__(self, body: Any, where: str = "request body") -> None:
        if not isinstance(body, dict):
            raise bad_request(f"{where} must be a JSON object, got {_json_type(body)}")
        self.body: Json = body

    def raw(self, name: str) -> Any:
        return self.body.get(name)

    def boolean(self, name: str, default: bool) -> bool:
        v = self.body.get(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise bad_request(f"'{name}' must be a boolean, got {_json_type(v)}", name)
        return v

    def integer(self, name: str, default: int | None = None, lo: int | None = None,
                hi: int | None = None) -> int | None:
        v = self.body.get(name)
        if v is None:
            return default
        if isinstance(v, float) and v.is_integer():
            v = int(v)  # some clients send 16.0
        if not isinstance(v, int) or isinstance(v, bool):
            raise bad_request(f"'{name}' must be an integer, got {_json_type(v)}", name)
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise bad_request(f"'{name}' must be in [{lo}, {hi}], got {v}", name)
        return v

    def number(self, name: str, default: float | None = None) -> float | None:
        v = self.body.get(name)
        if v is None:
            return default
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise bad_request(f"'{name}' must be a number, got {_json_type(v)}", name)
        if not math.isfinite(v):
            raise bad_request(f"'{name}' must be finite, got {v}", name)
        return float(v)

    def string(self, name: str, default: str | None = None) -> str | None:
        v = self.body.get(name)
        if v is None:
            return default
        if not isinstance(v, str):
            raise bad_request(f"'{name}' must be a string, got {_json_type(v)}", name)
        return v

    def obj(self, name: str) -> Json | None:
        v = self.body.get(name)
        if v is not None and not isinstance(v, dict):
            raise bad_request(f"'{name}' must be an object, got {_json_type(v)}", name)
        return v

    def stop_strings(self, name: str = "stop") -> list[str]:
        v = self.body.get(name)
        if v is None:
            return []
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
            raise bad_request(f"'{name}' must be a non-empty string or a list of them", name)
        if len(items) > _MAX_STOPS:
            raise bad_request(f"'{name}' may hold at most {_MAX_STOPS} strings, got {len(items)}", name)
        return items

    def token_ids(self, name: str, vocab_size: int, default: list[int] | None = None) -> list[int] | None:
        v = self.body.get(name)
        if v is None:
            return default
        return token_id_list(v, vocab_size, name)


def token_id_list(v: Any, vocab_size: int, name: str) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        raise bad_request(f"'{name}' must be a list of integer token ids", name)
    bad = [t for t in v if not 0 <= t < vocab_size]
    if bad:
        raise bad_request(f"'{name}' holds token ids outside [0, {vocab_size}): {bad[:3]}", name)
    return v


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(v), type(v).__name__)


# ---- the sampling fields shared by both endpoints ------------------------------------------------------

@dataclass(frozen=True)
class ModelLimits:
    """What validation needs to know about the served model."""

    vocab_size: int
    max_model_len: int


def sampling_params(f: Fields, limits: ModelLimits, *, max_tokens_default: int | None,
                    logprobs: int | None, prompt_logprobs: int | None = None) -> SamplingParams:
    """SamplingParams from the OpenAI/vLLM fields; `logprobs` is already resolved per endpoint."""
    max_tokens = f.integer("max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = f.integer("max_tokens", max_tokens_default, 1)
    top_k = f.integer("top_k", 0)
    # top_k >= vocab keeps every token; mapping it to "off" keeps huge values out of int32 arrays.
    top_k = 0 if top_k is not None and top_k >= limits.vocab_size else top_k
    kw: Json = dict(
        n=f.integer("n", 1, 1, _MAX_N),
        temperature=f.number("temperature", 1.0),
        top_p=f.number("top_p", 1.0),
        top_k=top_k,
        min_p=f.number("min_p", 0.0),
        repetition_penalty=f.number("repetition_penalty", 1.0),
        presence_penalty=f.number("presence_penalty", 0.0),
        frequency_penalty=f.number("frequency_penalty", 0.0),
        seed=f.integer("seed"),
        max_tokens=max_tokens,
        min_tokens=f.integer("min_tokens", 0),
        stop=f.stop_strings(),
        stop_token_ids=f.token_ids("stop_token_ids", limits.vocab_size, []),
        ignore_eos=f.boolean("ignore_eos", False),
        include_stop_str_in_output=f.boolean("include_stop_str_in_output", False),
        skip_special_tokens=f.boolean("skip_special_tokens", True),
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
    )
    if kw["seed"] is not None and kw["seed"] < 0:
        kw["seed"] %= 2**63  # OpenAI accepts any 64-bit seed; the engine wants a non-negative one
    best_of = f.integer("best_of")
    if best_of is not None and best_of != kw["n"]:
        raise bad_request("'best_of' other than n is not supported", "best_of")
    _reject_unsupported(f)
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        raise bad_request(str(e), _param_of(str(e))) from None


def _reject_unsupported(f: Fields) -> None:
    """Fields we cannot honour fail loudly rather than being silently ignored."""
    if f.raw("logit_bias"):
        raise bad_request("'logit_bias' is not supported", "logit_bias")
    if f.raw("suffix"):
        raise bad_request("'suffix' is not supported", "suffix")
    fmt = f.raw("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") in ("text", None)):
        raise bad_request("only response_format {'type': 'text'} is supported", "response_format")


def _param_of(message: str) -> str | None:
    """SamplingParams messages start with the field name."""
    head = message.split(" ", 1)[0].strip("'()")
    return head if head.isidentifier() else None


def stream_usage(f: Fields) -> bool:
    opts = f.obj("stream_options")
    if opts is None:
        return False
    return Fields(opts, "'stream_options'").boolean("include_usage", False)


# ---- /v1/completions -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CompletionRequest:
    model: str | None
    prompts: list[str | list[int]]  # one entry per prompt; token-id prompts stay lists
    params: SamplingParams
    stream: bool
    include_usage: bool
    echo: bool
    max_tokens_given: bool
    prompt_logprobs_for_echo: bool = False


def parse_completion(body: Any, limits: ModelLimits) -> CompletionRequest:
    f = Fields(body)
    prompts = _prompts(f.raw("prompt"), limits.vocab_size)
    logprobs = f.integer("logprobs", None, 0, MAX_LOGPROBS)
    echo = f.boolean("echo", False)
    # echo with logprobs scores the prompt tokens too, as OpenAI's legacy API does.
    prompt_lp = f.integer("prompt_logprobs", None, 0, MAX_LOGPROBS)
    echo_lp = echo and logprobs is not None
    if echo_lp:
        prompt_lp = max(prompt_lp or 0, logprobs)
    params = sampling_params(f, limits, max_tokens_default=16, logprobs=logprobs, prompt_logprobs=prompt_lp)
    return CompletionRequest(
        model=f.string("model"), prompts=prompts, params=params, stream=f.boolean("stream", False),
        include_usage=stream_usage(f), echo=echo,
        max_tokens_given=f.raw("max_tokens") is not None or f.raw("max_completion_tokens") is not None,
        prompt_logprobs_for_echo=echo_lp,
    )


def _prompts(v: Any, vocab_size: int) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids, or a list of token-id lists."""
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list) or not v:
        raise bad_request("'prompt' must be a string, a list of strings or a list of token ids", "prompt")
    if all(isinstance(p, str) for p in v):
        return list(v)
    if all(isinstance(p, int) and not isinstance(p, bool) for p in v):
        return [token_id_list(v, vocab_size, "prompt")]
    if all(isinstance(p, list) and p for p in v):
        return [token_id_list(p, vocab_size, "prompt") for p in v]
    raise bad_request("'prompt' must be a string, a list of strings, a list of token ids, or a list of "
                      "non-empty token-id lists", "prompt")


# ---- /v1/chat/completions ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChatRequest:
    model: str | None
    messages: list[Json]
    params: SamplingParams
    stream: bool
    include_usage: bool
    max_tokens_given: bool
    add_generation_prompt: bool = True
    tools: list[Json] | None = None
    template_kwargs: Json = field(default_factory=dict)


def parse_chat(body: Any, limits: ModelLimits) -> ChatRequest:
    f = Fields(body)
    messages = _messages(f.raw("messages"))
    want_lp = f.boolean("logprobs", False)
    top = f.integer("top_logprobs", None, 0, MAX_LOGPROBS)
    if top is not None and not want_lp and top > 0:
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    params = sampling_params(f, limits, max_tokens_default=None, logprobs=(top or 0) if want_lp else None)
    tools = f.raw("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise bad_request("'tools' must be a list of objects", "tools")
    return ChatRequest(
        model=f.string("model"), messages=messages, params=params, stream=f.boolean("stream", False),
        include_usage=stream_usage(f),
        max_tokens_given=f.raw("max_tokens") is not None or f.raw("max_completion_tokens") is not None,
        add_generation_prompt=f.boolean("add_generation_prompt", True), tools=tools,
        template_kwargs=_template_kwargs(f.obj("chat_template_kwargs")),
    )


def _messages(v: Any) -> list[Json]:
    if not isinstance(v, list):
        raise bad_request("'messages' must be a list of message objects", "messages")
    if not v:
        raise bad_request("'messages' must not be empty", "messages")
    return [_message(m, i) for i, m in enumerate(v)]


def _message(m: Any, i: int) -> Json:
    where = f"messages[{i}]"
    f = Fields(m, f"'{where}'")
    role = f.raw("role")
    if role not in _ROLES:
        raise bad_request(f"'{where}.role' must be one of {list(_ROLES)}, got {role!r}", "messages")
    content = f.raw("content")
    if isinstance(content, list):
        content = "".join(_text_part(p, f"{where}.content[{j}]") for j, p in enumerate(content))
    elif content is None:
        if role != "assistant":
            raise bad_request(f"'{where}.content' is required for role {role!r}", "messages")
    elif not isinstance(content, str):
        raise bad_request(f"'{where}.content' must be a string or a list of text parts", "messages")
    return {**m, "content": content if content is not None else ""}


def _text_part(p: Any, where: str) -> str:
    if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
        raise bad_request(f"'{where}' must be {{'type': 'text', 'text': ...}} (only text is supported)",
                          "messages")
    return p["text"]


_RESERVED_TEMPLATE_VARS = frozenset({"messages", "tools", "add_generation_prompt", "chat_template"})


def _template_kwargs(v: Json | None) -> Json:
    """Extra chat-template variables (e.g. enable_thinking); the template's own inputs stay ours."""
    if not v:
        return {}
    bad = [k for k in v if k in _RESERVED_TEMPLATE_VARS or not k.isidentifier()]
    if bad:
        raise bad_request(f"'chat_template_kwargs' may not set {bad}", "chat_template_kwargs")
    return dict(v)


# ---- /tokenize, /detokenize ----------------------------------------------------------------------------

def check_model(f: Fields, served: str) -> None:
    model = f.string("model")
    if model is not None and model != served:
        raise model_not_found(model)
