"""The server against the official `openai` client: chat, completions, streaming, logprobs, n, stop, seed."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from live_server import MAX_MODEL_LEN, MODEL_NAME, LiveServer


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello world!"}]


def test_health_and_models(live_server: LiveServer, client: openai.OpenAI) -> None:
    assert httpx.get(live_server.url + "/health").status_code == 200
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert models.data[0].model_extra["max_model_len"] == MAX_MODEL_LEN


def test_chat_completion(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=8, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    c = r.choices[0]
    assert c.message.role == "assistant" and isinstance(c.message.content, str)
    assert c.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_matches_non_stream(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL_NAME, messages=CHAT, max_completion_tokens=12, temperature=0, ignore_eos=True)
    whole = client.chat.completions.create(**{k: v for k, v in kw.items() if k != "ignore_eos"},
                                           extra_body={"ignore_eos": True})
    chunks = list(client.chat.completions.create(
        **{k: v for k, v in kw.items() if k != "ignore_eos"}, extra_body={"ignore_eos": True},
        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_and_stream(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=10, temperature=0)
    whole = client.completions.create(**kw)
    assert whole.object == "text_completion" and whole.usage.completion_tokens <= 10
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completion_token_prompt_and_batch(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt=[[5, 6, 7, 8], [9, 10]], max_tokens=3,
                                  temperature=0, n=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == 6


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob, abs=1e-4)
        assert [t.logprob for t in item.top_logprobs] == sorted((t.logprob for t in item.top_logprobs),
                                                                reverse=True)


def test_completion_logprobs_with_echo(client: openai.OpenAI, live_server: LiveServer) -> None:
    prompt = "Hello world"
    n_prompt = len(live_server.engine.tokenizer.encode(prompt))
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4, temperature=0, logprobs=2,
                                  echo=True, extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.text.startswith(prompt)
    lp = c.logprobs
    assert len(lp.tokens) == n_prompt + 4 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_n_and_seed(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL_NAME, prompt="Once upon", max_tokens=8, temperature=1.0, seed=1234)
    a = client.completions.create(**kw, n=2)
    b = client.completions.create(**kw, n=2)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    texts = {client.completions.create(**{**kw, "seed": s}).choices[0].text for s in range(4)}
    assert len(texts) > 1


def test_stop_strings(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL_NAME, prompt="Hello", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    assert len(full) > 6
    stop = full[3:5]
    cut = full[: full.index(stop)]
    r = client.completions.create(**kw, stop=[stop])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(**kw, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_min_tokens_and_stop_token_ids(client: openai.OpenAI, live_server: LiveServer) -> None:
    greedy = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=6, temperature=0,
                                       logprobs=0, extra_body={"ignore_eos": True})
    first = greedy.choices[0].logprobs.tokens[0]
    body = {"prompt": first, "add_special_tokens": False}
    ids = httpx.post(live_server.url + "/tokenize", json=body).json()["tokens"]
    r = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=6, temperature=0,
                                  extra_body={"stop_token_ids": ids[:1]})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1
    r = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=6, temperature=0,
                                  extra_body={"stop_token_ids": ids[:1], "min_tokens": 3})
    assert r.usage.completion_tokens >= 3


def test_concurrent_streams(live_server: LiveServer) -> None:
    idle = live_server.engine.core.kv.num_free_blocks

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, int]:
        stream = await client.completions.create(model=MODEL_NAME, prompt=f"request number {i}",
                                                 max_tokens=12, temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True},
                                                 stream_options={"include_usage": True})
        text, usage = "", 0
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return text, usage

    async def main() -> list[tuple[str, int]]:
        async with openai.AsyncOpenAI(base_url=live_server.url + "/v1", api_key="x", max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(36)))

    results = asyncio.run(main())
    assert all(usage == 12 for _, usage in results)
    # Requests 3 and 3 again: same prompt, greedy -> same text even when batched differently.
    again = asyncio.run(_single(live_server, "request number 3"))
    assert again == results[3][0]
    live_server.wait_kv_idle(idle)


async def _single(live_server: LiveServer, prompt: str) -> str:
    async with openai.AsyncOpenAI(base_url=live_server.url + "/v1", api_key="x", max_retries=0) as client:
        r = await client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0,
                                            extra_body={"ignore_eos": True})
        return r.choices[0].text
