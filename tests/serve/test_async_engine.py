"""AsyncEngine and app behaviour that needs a controllable engine: failures, backpressure, auth.

A scripted fake stands in for LLMEngine (same methods and the `.core` attributes the server reads), so
these tests are deterministic and run without JAX compiles.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from live_server import serve_in_thread

from rtp_jax.config import SamplingParams
from rtp_jax.outputs import CompletionOutput, RequestOutput
from rtp_jax.tokenizer import Tokenizer
from serve.app import build_app
from serve.async_engine import AsyncEngine, EngineError, QueueFullError


class FakeEngine:
    """Emits token 300 per step per request until max_tokens; `fail_next` makes the next step raise;
    `gate` (when set) makes step wait, so requests pile up in `waiting` deterministically."""

    def __init__(self, tokenizer: Tokenizer | None = None, max_num_seqs: int = 2) -> None:
        self.tokenizer = tokenizer
        self.max_num_seqs = max_num_seqs
        self.outputs: dict[str, tuple[RequestOutput, SamplingParams]] = {}
        self.fail_next = False
        self.gate: threading.Event | None = None
        self.abort_delay_s = 0.0
        scheduler = SimpleNamespace(waiting=[], running=[])
        kv = SimpleNamespace(usage=0.0, num_free_blocks=10, prefix_cache_queries=0, prefix_cache_hits=0)
        config = SimpleNamespace(model=SimpleNamespace(vocab_size=512),
                                 scheduler=SimpleNamespace(max_model_len=64))
        self.core = SimpleNamespace(scheduler=scheduler, kv=kv, config=config, num_steps=0)

    def add_request(self, request_id: str, prompt: dict, params: SamplingParams) -> RequestOutput:
        if prompt["prompt_token_ids"] == [13]:
            raise ValueError("token 13 is unlucky")
        out = RequestOutput(request_id, prompt.get("prompt"), list(prompt["prompt_token_ids"]),
                            [CompletionOutput(i) for i in range(params.n)])
        self.outputs[request_id] = (out, params)
        self.core.scheduler.waiting.append(request_id)
        return out

    def abort_request(self, request_id: str) -> None:
        time.sleep(self.abort_delay_s)
        self.outputs.pop(request_id, None)
        for q in (self.core.scheduler.waiting, self.core.scheduler.running):
            if request_id in q:
                q.remove(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.outputs)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.outputs)

    def step(self) -> list[RequestOutput]:
        if self.gate is not None:
            self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("device on fire")
        s = self.core.scheduler
        while s.waiting and len(s.running) < self.max_num_seqs:
            s.running.append(s.waiting.pop(0))
        self.core.num_steps += 1
        changed = []
        for rid in list(s.running):
            out, params = self.outputs[rid]
            for c in out.outputs:
                c.token_ids.append(300)
                c.text += "x"
                c.stream_text_len = len(c.text)
                if len(c.token_ids) >= (params.max_tokens or 4):
                    c.finish_reason = "length"
            changed.append(out)
            if all(c.finished for c in out.outputs):
                out.finished = True
                s.running.remove(rid)
                self.outputs.pop(rid)
        return changed


def _run(coro):  # noqa: ANN001, ANN202 - test helper
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_stream_and_engine_failure_keeps_serving() -> None:
    fake = FakeEngine()
    engine = AsyncEngine(fake)  # type: ignore[arg-type]
    engine.start()
    try:
        async def main() -> None:
            stream = await engine.add_request("a", {"prompt_token_ids": [1, 2]}, SamplingParams(max_tokens=3))
            texts = [d.text async for u in stream for d in u.seqs]
            assert "".join(texts) == "xxx" and stream.finished

            with pytest.raises(ValueError, match="unlucky"):
                await engine.add_request("b", {"prompt_token_ids": [13]}, SamplingParams())

            fake.fail_next = True
            stream = await engine.add_request("c", {"prompt_token_ids": [1]}, SamplingParams(max_tokens=3))
            with pytest.raises(EngineError, match="device on fire"):
                async for _ in stream:
                    pass
            assert not fake.outputs  # the failed request was aborted in the engine

            stream = await engine.add_request("d", {"prompt_token_ids": [1]}, SamplingParams(max_tokens=2))
            assert sum([len(d.token_ids) async for u in stream for d in u.seqs]) == 2

        _run(main())
        assert engine.is_alive
    finally:
        engine.shutdown()
    assert not engine.is_alive


def test_failed_requests_are_aborted_before_their_clients_hear_of_it() -> None:
    """After an engine step fails, the request in flight is gone from the engine by the time its client
    sees the error (aborts first, then the errors), even when aborting is slow."""
    fake = FakeEngine()
    fake.abort_delay_s = 0.2  # with the error posted first, the client would look while the abort sleeps
    engine = AsyncEngine(fake)  # type: ignore[arg-type]
    engine.start()
    try:
        async def main() -> None:
            fake.fail_next = True
            stream = await engine.add_request("e", {"prompt_token_ids": [1]}, SamplingParams(max_tokens=3))
            with pytest.raises(EngineError, match="device on fire"):
                async for _ in stream:
                    pass
            assert not fake.outputs, "the client heard of the failure before its request was aborted"

        _run(main())
        assert engine.is_alive
    finally:
        engine.shutdown()


def test_backpressure_burst() -> None:
    fake = FakeEngine(max_num_seqs=1)
    fake.gate = threading.Event()  # the first step blocks: every later add sees a growing queue
    engine = AsyncEngine(fake, max_queue_len=3)  # type: ignore[arg-type]
    engine.start()
    try:
        async def main() -> list[object]:
            first = await engine.add_request("r0", {"prompt_token_ids": [1]}, SamplingParams(max_tokens=1))
            await asyncio.sleep(0.1)  # the engine thread is now inside the gated step
            adds = [engine.add_request(f"r{i}", {"prompt_token_ids": [1]}, SamplingParams(max_tokens=1))
                    for i in range(1, 7)]
            pending = asyncio.gather(*adds, return_exceptions=True)
            await asyncio.sleep(0.1)
            fake.gate.set()
            results = await pending
            async for _ in first:
                pass
            return results

        results = _run(main())
        # r0 is in the (gated) step, so it is neither waiting nor counted; r1..r3 fill the queue.
        refused = [r for r in results if isinstance(r, QueueFullError)]
        assert len(refused) == 3 and all(r.limit == 3 for r in refused)
    finally:
        fake.gate.set()
        engine.shutdown()


def test_shutdown_fails_inflight_requests() -> None:
    fake = FakeEngine()
    fake.gate = threading.Event()
    engine = AsyncEngine(fake)  # type: ignore[arg-type]
    engine.start()

    async def main() -> None:
        stream = await engine.add_request("a", {"prompt_token_ids": [1]}, SamplingParams(max_tokens=5))
        await asyncio.sleep(0.05)
        threading.Thread(target=engine.shutdown).start()
        await asyncio.sleep(0.05)
        fake.gate.set()
        with pytest.raises(EngineError):
            async for _ in stream:
                pass

    _run(main())


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_path(tiny_model_dir)


def test_http_engine_failure_and_api_key(tokenizer: Tokenizer) -> None:
    fake = FakeEngine(tokenizer)
    app = build_app(fake, "fake", api_key="sekret")  # type: ignore[arg-type]
    server, thread, url = serve_in_thread(app)
    auth = {"Authorization": "Bearer sekret"}
    body = {"prompt": [1, 2], "max_tokens": 3}
    try:
        r = httpx.post(url + "/v1/completions", json=body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/health").status_code == 200  # health stays open for load balancers
        r = httpx.post(url + "/v1/completions", json=body, headers=auth)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "xxx"

        fake.fail_next = True
        r = httpx.post(url + "/v1/completions", json=body, headers=auth)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_error"
        fake.fail_next = True
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, headers=auth) as r:
            lines = [x for x in r.iter_lines() if x]
        assert '"engine_error"' in lines[-2] and lines[-1] == "data: [DONE]"
        r = httpx.post(url + "/v1/completions", json={**body, "prompt": [13]}, headers=auth)
        assert r.status_code == 400 and "unlucky" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/completions", json=body, headers=auth)
        assert r.status_code == 200
    finally:
        server.should_exit = True
        thread.join(10)
