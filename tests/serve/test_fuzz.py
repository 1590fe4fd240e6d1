"""Property: no request body, however malformed, gets a 5xx (or kills the server).

Bodies mix plausible and hostile values for every field the endpoints read (wrong JSON types, huge
and negative numbers, NaN, empty and nested containers); generation is kept to a few tokens.
"""

from __future__ import annotations

import json
import math

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_server import MODEL_NAME, LiveServer

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-3, 3), st.text(max_size=6),
)


def _containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=3))


junk = st.recursive(_scalars, _containers, max_leaves=8)
ids = st.lists(st.integers(0, 511), min_size=1, max_size=8)

# Plausible values per field (mostly accepted); `bodies` then overwrites a few fields with junk.
COMMON = {
    "model": st.just(MODEL_NAME),
    "n": st.integers(1, 3),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.05, 1),
    "top_k": st.one_of(st.integers(-1, 50), st.integers(2**31, 2**40)),
    "min_p": st.floats(0, 1),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.5, 2),
    "seed": st.integers(-(2**63), 2**64 - 1),
    "stop": st.one_of(st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=3)),
    "stop_token_ids": st.lists(st.integers(0, 511), max_size=3),
    "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 2),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "skip_special_tokens": st.booleans(),
    "include_stop_str_in_output": st.booleans(),
    "best_of": st.none(),
    "logit_bias": st.none(),
    "response_format": st.just({"type": "text"}),
}

COMPLETION = {
    **COMMON,
    "prompt": st.one_of(st.text(min_size=1, max_size=20),
                        st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=2),
                        ids, st.lists(ids, min_size=1, max_size=2)),
    "echo": st.booleans(),
    "logprobs": st.integers(0, 5),
    "prompt_logprobs": st.integers(0, 3),
    "suffix": st.none(),
}

_message = st.fixed_dictionaries({
    "role": st.sampled_from(["user", "system", "assistant"]),
    "content": st.one_of(st.text(max_size=12), st.lists(st.fixed_dictionaries(
        {"type": st.just("text"), "text": st.text(max_size=6)}), max_size=2)),
})
CHAT = {
    **COMMON,
    "messages": st.lists(_message, min_size=1, max_size=3),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 5),
    "add_generation_prompt": st.booleans(),
    "chat_template_kwargs": st.just({"enable_thinking": False}),
    "tools": st.just([{"type": "function", "function": {"name": "f"}}]),
}
REQUIRED = {"prompt", "messages"}


def bodies(fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy[dict]:
    """Plausible bodies with 0-2 fields replaced by junk; max_tokens small unless junk says otherwise."""
    required = {k: v for k, v in fields.items() if k in REQUIRED}
    optional = {k: v for k, v in fields.items() if k not in REQUIRED}
    plausible = st.fixed_dictionaries(required, optional=optional)
    overrides = st.dictionaries(st.sampled_from(sorted(fields) + ["max_tokens"]), junk, max_size=2)
    return st.builds(lambda body, mt, bad: {**body, "max_tokens": mt, **bad}, plausible, st.integers(1, 3),
                     overrides)


def _post(live_server: LiveServer, path: str, body: object) -> None:
    raw = json.dumps(body, allow_nan=True)  # NaN/Infinity too: Python clients can send them
    with httpx.stream("POST", live_server.url + path, content=raw, timeout=120,
                      headers={"content-type": "application/json"}) as r:
        text = "".join(r.iter_text())
    assert r.status_code < 500, (r.status_code, text, body)
    if r.status_code >= 400:
        assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}
    elif body.get("stream") is True:
        assert text.rstrip().endswith("data: [DONE]"), text
        assert '"error"' not in text, text


_SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@_SETTINGS
@given(body=bodies(COMPLETION))
def test_fuzz_completions(live_server: LiveServer, body: dict) -> None:
    _post(live_server, "/v1/completions", body)


@_SETTINGS
@given(body=bodies(CHAT))
def test_fuzz_chat(live_server: LiveServer, body: dict) -> None:
    _post(live_server, "/v1/chat/completions", body)


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=junk)
def test_fuzz_whole_body(live_server: LiveServer, body: object) -> None:
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        _post(live_server, path, body)


def test_server_alive_after_fuzz(live_server: LiveServer) -> None:
    assert httpx.get(live_server.url + "/health").status_code == 200
    assert live_server.ctx.engine.is_alive and not math.isnan(live_server.engine.core.kv.usage)


pytestmark = pytest.mark.filterwarnings("ignore")
