"""Bad requests, backpressure, disconnects, metrics and the tokenizer routes of the live server."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from live_server import MAX_MODEL_LEN, MODEL_NAME, LiveServer
from prometheus_client.parser import text_string_to_metric_families

CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
MSGS = [{"role": "user", "content": "hi"}]


def assert_openai_error(r: httpx.Response, status: int | None = None) -> dict:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    if status is not None:
        assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


BAD_BODIES = [
    (CMPL, b"{not json", None),
    (CMPL, b"", None),
    (CMPL, b"[1, 2]", None),
    (CMPL, b'"just a string"', None),
    (CMPL, {"prompt": 5}, "prompt"),
    (CMPL, {"prompt": []}, "prompt"),
    (CMPL, {"prompt": [1, "a"]}, "prompt"),
    (CMPL, {"prompt": [[1], [-3]]}, "prompt"),
    (CMPL, {"prompt": [10**9]}, "prompt"),
    (CMPL, {"prompt": "hi", "temperature": "hot"}, "temperature"),
    (CMPL, {"prompt": "hi", "temperature": -1}, "temperature"),
    (CMPL, {"prompt": "hi", "top_p": 0}, "top_p"),
    (CMPL, {"prompt": "hi", "top_p": 1.5}, "top_p"),
    (CMPL, {"prompt": "hi", "top_k": -5}, "top_k"),
    (CMPL, {"prompt": "hi", "min_p": 2}, "min_p"),
    (CMPL, {"prompt": "hi", "presence_penalty": 9}, "presence_penalty"),
    (CMPL, {"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty"),
    (CMPL, {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    (CMPL, {"prompt": "hi", "max_tokens": True}, "max_tokens"),
    (CMPL, {"prompt": "hi", "max_tokens": 10**6}, "max_tokens"),
    (CMPL, {"prompt": "hi", "n": 0}, "n"),
    (CMPL, {"prompt": "hi", "n": 1000}, "n"),
    (CMPL, {"prompt": "hi", "logprobs": 50}, "logprobs"),
    (CMPL, {"prompt": "hi", "stop": [""]}, "stop"),
    (CMPL, {"prompt": "hi", "stop": 3}, "stop"),
    (CMPL, {"prompt": "hi", "stop_token_ids": [10**12]}, "stop_token_ids"),
    (CMPL, {"prompt": "hi", "min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    (CMPL, {"prompt": "hi", "seed": 1.5}, "seed"),
    (CMPL, {"prompt": "hi", "stream": "yes"}, "stream"),
    (CMPL, {"prompt": "hi", "stream_options": {"include_usage": 1}}, "include_usage"),
    (CMPL, {"prompt": "hi", "logit_bias": {"1": 5}}, "logit_bias"),
    (CMPL, {"prompt": "hi", "model": 7}, "model"),
    (CMPL, {"prompt": [1] * MAX_MODEL_LEN}, None),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": "hi"}, "messages"),
    (CHAT, {}, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
    (CHAT, {"messages": [{"role": "user"}]}, "messages"),
    (CHAT, {"messages": ["hi"]}, None),
    (CHAT, {"messages": MSGS, "top_logprobs": 3}, "top_logprobs"),
    (CHAT, {"messages": MSGS, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"messages": MSGS, "max_completion_tokens": -1}, "max_completion_tokens"),
    (CHAT, {"messages": MSGS, "response_format": {"type": "json_schema"}}, "response_format"),
    (CHAT, {"messages": MSGS, "chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ("/tokenize", {}, "prompt"),
    ("/detokenize", {"tokens": ["a"]}, "tokens"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD_BODIES, ids=[f"{i}" for i in range(len(BAD_BODIES))])
def test_bad_request_is_4xx_with_openai_body(live_server: LiveServer, path: str, body: object,
                                             param: str | None) -> None:
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(live_server.url + path, headers={"content-type": "application/json"}, timeout=30, **kw)
    err = assert_openai_error(r, 400)
    if param is not None:
        assert err["param"] == param, err
    assert httpx.get(live_server.url + "/health").status_code == 200


def test_context_length_message_has_lengths(live_server: LiveServer) -> None:
    r = httpx.post(live_server.url + CMPL, json={"prompt": [1] * 200, "max_tokens": 100})
    msg = assert_openai_error(r, 400)["message"]
    assert str(MAX_MODEL_LEN) in msg and "200" in msg and "300" in msg


def test_default_max_tokens_fits_context(live_server: LiveServer) -> None:
    r = httpx.post(live_server.url + CMPL, json={"prompt": [7] * (MAX_MODEL_LEN - 3), "ignore_eos": True},
                   timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_unknown_model_and_route(live_server: LiveServer) -> None:
    r = httpx.post(live_server.url + CHAT, json={"model": "gpt-9", "messages": MSGS})
    err = assert_openai_error(r, 404)
    assert err["code"] == "model_not_found" and "gpt-9" in err["message"]
    assert_openai_error(httpx.get(live_server.url + "/v1/nope"), 404)
    assert_openai_error(httpx.get(live_server.url + CHAT), 405)


def test_queue_full_is_429(live_server: LiveServer) -> None:
    engine = live_server.ctx.engine
    saved = engine.max_queue_len
    engine.max_queue_len = 0  # any waiting count is "too many": deterministic without racing the engine
    try:
        r = httpx.post(live_server.url + CMPL, json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2})
        err = assert_openai_error(r, 429)
        assert "max-queue-len" in err["message"] and err["type"] == "rate_limit_error"
    finally:
        engine.max_queue_len = saved
    assert httpx.post(live_server.url + CMPL, json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_stream_disconnect_frees_kv(live_server: LiveServer) -> None:
    idle = live_server.engine.core.kv.num_free_blocks
    body = {"prompt": "a long story", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as client, client.stream("POST", live_server.url + CMPL, json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = 0
        for line in lines:
            if line.startswith("data: {"):
                got += 1
            if got == 3:
                break
        assert live_server.engine.core.kv.num_free_blocks < idle  # the request holds blocks now
    # The client closed its stream mid-generation: the server aborts and frees the blocks.
    live_server.wait_kv_idle(idle, timeout=20)
    assert live_server.engine.num_unfinished_requests == 0


def _generated_tokens(live_server: LiveServer) -> float:
    return live_server.app.state.metrics.generation_tokens._value.get()


def test_non_stream_disconnect_frees_kv(live_server: LiveServer) -> None:
    idle = live_server.engine.core.kv.num_free_blocks
    before = _generated_tokens(live_server)
    # 16 x 240 tokens: far more work (with preemptions, the pool holds ~6 such sequences) than 0.3 s allow.
    body = {"prompt": "a long story", "max_tokens": 240, "ignore_eos": True, "n": 16}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live_server.url + CMPL, json=body, timeout=httpx.Timeout(10, read=0.3))
    live_server.wait_kv_idle(idle, timeout=20)
    assert live_server.engine.num_unfinished_requests == 0
    assert _generated_tokens(live_server) - before < 16 * 240  # aborted, not run to the end


def test_metrics(live_server: LiveServer) -> None:
    for _ in range(2):  # the second identical prompt hits the prefix cache
        r = httpx.post(live_server.url + CMPL, json={"prompt": "metrics please " * 8, "max_tokens": 4,
                                                     "ignore_eos": True}, timeout=60)
        assert r.status_code == 200
    text = httpx.get(live_server.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(family: str, sample: str) -> float:
        return sum(s.value for s in families[family].samples if s.name == sample)

    assert value("rtp_jax:time_to_first_token_seconds", "rtp_jax:time_to_first_token_seconds_count") >= 2
    assert value("rtp_jax:inter_token_latency_seconds", "rtp_jax:inter_token_latency_seconds_count") >= 6
    assert value("rtp_jax:e2e_request_latency_seconds", "rtp_jax:e2e_request_latency_seconds_count") >= 2
    assert value("rtp_jax:prompt_tokens", "rtp_jax:prompt_tokens_total") >= 2
    assert value("rtp_jax:generation_tokens", "rtp_jax:generation_tokens_total") >= 8
    assert value("rtp_jax:prefix_cache_hits", "rtp_jax:prefix_cache_hits_total") > 0
    assert value("rtp_jax:prefix_cache_queries", "rtp_jax:prefix_cache_queries_total") > 0
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert f"rtp_jax:{gauge}" in families
    assert families["rtp_jax:num_requests_running"].samples[0].labels["model_name"] == MODEL_NAME


def test_tokenize_round_trip(live_server: LiveServer) -> None:
    text = "Hello world! 你好 🙂"
    r = httpx.post(live_server.url + "/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert r["count"] == len(r["tokens"]) == len(r["token_strs"]) and r["max_model_len"] == MAX_MODEL_LEN
    back = httpx.post(live_server.url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == text
    chat = httpx.post(live_server.url + "/tokenize", json={"messages": MSGS}).json()
    rendered = live_server.engine.tokenizer.apply_chat_template(MSGS)
    assert chat["tokens"] == live_server.engine.tokenizer.encode(rendered, add_special_tokens=False)


def test_sse_wire_format(live_server: LiveServer) -> None:
    body = {"messages": MSGS, "max_tokens": 3, "stream": True, "n": 2}
    with httpx.stream("POST", live_server.url + CHAT, json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert {c["choices"][0]["index"] for c in chunks} == {0, 1}
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert sum(1 for c in chunks if c["choices"][0]["finish_reason"]) == 2


def test_idle_engine_thread_sleeps(live_server: LiveServer) -> None:
    """With nothing in flight the engine thread blocks on its command queue instead of spinning."""
    steps = live_server.engine.core.num_steps
    t0 = time.thread_time()
    time.sleep(0.5)
    assert live_server.engine.core.num_steps == steps
    assert time.thread_time() - t0 < 0.1
