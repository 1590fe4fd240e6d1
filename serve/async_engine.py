"""AsyncEngine: the single-threaded LLMEngine on its own thread, asyncio streams on the other side.

    async_engine = AsyncEngine(engine, metrics, max_queue_len=256); async_engine.start()
    stream = await async_engine.add_request(request_id, prompt, params)  # ValueError/QueueFull/EngineError
    async for update in stream: ...     # RequestUpdate deltas; a request's last has .finished
    stream.abort()                      # idempotent; frees the KV blocks on the engine's next loop turn

Ownership: only the engine thread touches the LLMEngine. Adds and aborts cross to it through a
thread-safe command queue; it answers through `loop.call_soon_threadsafe` into each request's own
asyncio.Queue. Updates are deltas computed on the engine thread (new streamable text, new tokens,
new logprobs), so the event loop never reads engine objects that the engine is still mutating.
When no request is in flight the thread blocks on the command queue: an idle server burns no CPU.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from rtp_jax.config import SamplingParams
from rtp_jax.engine.llm_engine import LLMEngine
from rtp_jax.engine.request import PositionLogprobs
from rtp_jax.outputs import RequestOutput
from serve.metrics import ServerMetrics

log = logging.getLogger(__name__)

_NO_PROGRESS_WAIT_S = 0.005  # a step that scheduled nothing must not spin


class QueueFullError(Exception):
    def __init__(self, waiting: int, limit: int) -> None:
        super().__init__(f"{waiting} requests waiting (limit {limit})")
        self.waiting, self.limit = waiting, limit


class EngineError(Exception):
    """The engine failed (or stopped) while this request was in it."""


@dataclass(frozen=True)
class SeqDelta:
    """What one of a request's n sequences added since the last update."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass(frozen=True)
class RequestUpdate:
    request_id: str
    seqs: list[SeqDelta]
    finished: bool
    num_prompt_tokens: int
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # once, with the first tokens
    error: str | None = None


@dataclass
class _Cursor:
    text: int = 0
    tokens: int = 0
    logprobs: int = 0
    done: bool = False


@dataclass
class _Tracked:
    """Engine-thread state of one request: where to post, what was already sent, timing."""

    request_id: str
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestUpdate]
    arrival: float
    cursors: list[_Cursor] = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: list[float] = field(default_factory=list)
    sent_prompt_logprobs: bool = False

    def post(self, update: RequestUpdate) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, update)
        except RuntimeError:  # the request's event loop is closed: nobody is listening any more
            pass


@dataclass
class _Add:
    tracked: _Tracked
    prompt: dict[str, Any]
    params: SamplingParams
    future: asyncio.Future[None]


@dataclass
class _Abort:
    request_id: str


class _Stop:
    pass


class RequestStream:
    """The loop side of one or more requests (a completions call may carry several prompts) sharing
    one queue: iterate their updates; `abort()` stops whatever is still running."""

    def __init__(self, request_ids: list[str], updates: asyncio.Queue[RequestUpdate],
                 engine: AsyncEngine) -> None:
        self.request_ids = request_ids
        self.index = {rid: i for i, rid in enumerate(request_ids)}
        self._unfinished = set(request_ids)
        self._updates = updates
        self._engine = engine

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestUpdate:
        update = await self.next()
        if update is None:
            raise StopAsyncIteration
        return update

    async def next(self, timeout: float | None = None) -> RequestUpdate | None:
        """The next update of any request; None when all are over. TimeoutError after `timeout`."""
        if self.finished:
            return None
        update = await asyncio.wait_for(self._updates.get(), timeout)
        if update.error is not None:
            self.abort()
            raise EngineError(update.error)
        if update.finished:
            self._unfinished.discard(update.request_id)
        return update

    def abort(self) -> None:
        """Stops the requests still running (client gone, error); safe to call twice."""
        for rid in self._unfinished:
            self._engine.abort(rid)
        self._unfinished.clear()


class AsyncEngine:
    def __init__(self, engine: LLMEngine, metrics: ServerMetrics | None = None,
                 max_queue_len: int | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_queue_len = max_queue_len  # waiting sequences beyond which adds get QueueFullError
        self._commands: queue.Queue[_Add | _Abort | _Stop] = queue.Queue()
        self._tracked: dict[str, _Tracked] = {}
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None  # set if the engine thread itself died

    # ---- lifecycle (any thread) -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="rtp-jax-engine", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._commands.put(_Stop())
            self._thread.join(timeout)
            self._thread = None

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- loop side ----------------------------------------------------------------------------------------
    async def add_request(self, request_id: str, prompt: dict[str, Any], params: SamplingParams,
                          arrival: float | None = None) -> RequestStream:
        return await self.add_requests([(request_id, prompt, params)], arrival)

    async def add_requests(self, requests: list[tuple[str, dict[str, Any], SamplingParams]],
                           arrival: float | None = None) -> RequestStream:
        """Queues (request_id, prompt, params) once the engine accepted all of them; if any is refused none
        stays queued. Raises what `LLMEngine.add_request` raises (ValueError), QueueFullError when too
        many are waiting, EngineError when the engine is down."""
        if not self.is_alive:
            raise EngineError("the engine is not running")
        loop = asyncio.get_running_loop()
        arrival = arrival if arrival is not None else time.monotonic()
        updates: asyncio.Queue[RequestUpdate] = asyncio.Queue()
        futures: list[asyncio.Future[None]] = []
        for rid, prompt, params in requests:
            futures.append(loop.create_future())
            self._commands.put(_Add(_Tracked(rid, loop, updates, arrival), prompt, params, futures[-1]))
        stream = RequestStream([r[0] for r in requests], updates, self)
        try:
            results = await asyncio.gather(*futures, return_exceptions=True)
        except asyncio.CancelledError:
            stream.abort()  # the client left while the adds were in flight
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            stream.abort()
            raise errors[0]
        return stream

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    # ---- engine thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                busy = self.engine.has_unfinished_requests()
                if not self._drain_commands(block=not busy):
                    break
                if self.engine.has_unfinished_requests():
                    self._step()
                self._record_state()
        except BaseException as e:  # a bug here must not leave clients hanging forever
            log.exception("engine thread died")
            self.error = e
            self._fail_all(f"engine thread died: {e!r}")
        finally:
            self._fail_all("the engine stopped")

    def _drain_commands(self, block: bool) -> bool:
        """Applies queued adds and aborts; blocks for the first one when idle. False on stop."""
        try:
            cmd = self._commands.get(block=block)
        except queue.Empty:
            return True
        while True:
            if isinstance(cmd, _Stop):
                return False
            if isinstance(cmd, _Add):
                self._add(cmd)
            else:
                self._abort(cmd.request_id)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _add(self, cmd: _Add) -> None:
        t = cmd.tracked
        waiting = len(self.engine.core.scheduler.waiting)
        error: BaseException | None = None
        if self.max_queue_len is not None and waiting >= self.max_queue_len:
            error = QueueFullError(waiting, self.max_queue_len)
            if self.metrics:
                self.metrics.rejected.inc()
        else:
            try:
                out = self.engine.add_request(t.request_id, cmd.prompt, cmd.params)
            except ValueError as e:
                error = e
            except Exception as e:  # noqa: BLE001 - an engine bug fails this request, not the server
                log.exception("add_request failed")
                error = EngineError(repr(e))
            else:
                t.cursors = [_Cursor() for _ in out.outputs]
                t.last_token_at = [0.0] * len(out.outputs)
                self._tracked[t.request_id] = t
                if self.metrics:
                    self.metrics.prompt_tokens.inc(len(out.prompt_token_ids))
        t.loop.call_soon_threadsafe(self._settle, cmd.future, error, t.request_id)

    def _settle(self, future: asyncio.Future[None], error: BaseException | None, request_id: str) -> None:
        """Runs on the request's loop: resolves its add; aborts it if the waiter is gone."""
        if future.cancelled():
            if error is None:
                self.abort(request_id)
        elif error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    def _abort(self, request_id: str) -> None:
        self._tracked.pop(request_id, None)
        self.engine.abort_request(request_id)

    def _step(self) -> None:
        steps_before = self.engine.core.num_steps
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving new ones
            log.exception("engine step failed")
            self._fail_all(f"{type(e).__name__}: {e}")
            return
        now = time.monotonic()
        for out in outputs:
            t = self._tracked.get(out.request_id)
            if t is not None:
                self._dispatch(t, out, now)
        if not outputs and self.engine.core.num_steps == steps_before:
            time.sleep(_NO_PROGRESS_WAIT_S)

    def _dispatch(self, t: _Tracked, out: RequestOutput, now: float) -> None:
        seqs = [d for c, cur in zip(out.outputs, t.cursors, strict=True)
                if (d := _delta(c, cur)) is not None]
        new_tokens = sum(len(d.token_ids) for d in seqs)
        prompt_lp = None
        if new_tokens and out.prompt_logprobs is not None and not t.sent_prompt_logprobs:
            prompt_lp, t.sent_prompt_logprobs = list(out.prompt_logprobs), True
        self._observe(t, seqs, new_tokens, now, out.finished)
        if out.finished:
            self._tracked.pop(t.request_id, None)
        if seqs or out.finished:
            t.post(RequestUpdate(t.request_id, seqs, out.finished, len(out.prompt_token_ids), prompt_lp))

    def _observe(self, t: _Tracked, seqs: list[SeqDelta], new_tokens: int, now: float,
                 finished: bool) -> None:
        m = self.metrics
        if m is None:
            return
        if new_tokens and t.first_token_at is None:
            t.first_token_at = now
            m.ttft.observe(now - t.arrival)
        for d in seqs:
            if d.token_ids:
                last = t.last_token_at[d.index]
                if last:
                    m.itl.observe(now - last)
                t.last_token_at[d.index] = now
            if d.finish_reason is not None:
                m.request_finished(d.finish_reason)
        m.generation_tokens.inc(new_tokens)
        if finished:
            m.e2e.observe(now - t.arrival)

    def _record_state(self) -> None:
        if self.metrics is None:
            return
        core = self.engine.core
        self.metrics.set_engine_state(len(core.scheduler.running), len(core.scheduler.waiting), core.kv.usage,
                                      core.kv.prefix_cache_queries, core.kv.prefix_cache_hits)

    def _fail_all(self, message: str) -> None:
        # Abort every request in the engine before telling any client: a client that sees its error must
        # find its request gone (and its KV blocks freed), not still running until this loop gets there.
        tracked = list(self._tracked.items())
        self._tracked.clear()
        for rid, _ in tracked:
            try:
                self.engine.abort_request(rid)
            except Exception:  # noqa: BLE001 - best effort: the engine is already in trouble
                log.exception("abort after engine failure failed")
        for rid, t in tracked:
            t.post(RequestUpdate(rid, [], True, 0, error=message))
        while True:  # adds still queued will never be processed: release their waiters
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, _Add) and not cmd.tracked.loop.is_closed():
                cmd.tracked.loop.call_soon_threadsafe(self._settle, cmd.future, EngineError(message),
                                                      cmd.tracked.request_id)


def _delta(c: Any, cur: _Cursor) -> SeqDelta | None:
    """New text (only the part safe to stream), tokens and logprobs of one sequence; None if nothing."""
    if cur.done:
        return None
    safe = len(c.text) if c.finished else c.stream_text_len
    text = c.text[cur.text:safe] if safe > cur.text else ""
    tokens = c.token_ids[cur.tokens:]
    lps = c.logprobs[cur.logprobs:] if c.logprobs is not None else None
    if not text and not tokens and not c.finished:
        return None
    cur.text, cur.tokens = max(cur.text, safe), len(c.token_ids)
    cur.logprobs = len(c.logprobs) if c.logprobs is not None else 0
    cur.done = c.finished
    return SeqDelta(c.index, text, tokens, lps, c.finish_reason, c.stop_reason)
