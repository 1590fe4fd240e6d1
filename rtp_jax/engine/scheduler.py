"""FCFS continuous batching under a token budget, with chunked prefill and recompute preemption.

Each step the running requests go first (one decode token each, or the next chunk of an unfinished
prefill), then waiting requests are admitted while the token budget, `max_num_seqs` and free KV blocks
allow. When a running request cannot get a block, the most recently admitted running request is
preempted: its blocks are freed and it rejoins the front of the queue, to be recomputed later from
its prompt plus the tokens it had already produced.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from rtp_jax.cache import KVCacheManager
from rtp_jax.config import SchedulerConfig
from rtp_jax.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledSeq:
    """One sequence in this step: tokens [start, start + num_new_tokens) of the request's tokens (the
    last one may still be on the device, sampled by the step in flight)."""

    request: Request
    start: int
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """The chunk reaches the end of the known tokens, so this step samples the next one."""
        return self.start + self.num_new_tokens == self.request.num_total_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    seqs: tuple[ScheduledSeq, ...]
    preempted: tuple[str, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0  # total, for metrics and tests

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Marks a request finished (or aborted) and returns its blocks to the pool at once."""
        request.status = status
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.free(request.request_id)

    def _finishes_with_pending(self, req: Request) -> bool:
        """The tokens in flight take the request to max_tokens or max_model_len."""
        max_tokens = req.params.max_tokens
        return ((max_tokens is not None and req.num_output_tokens >= max_tokens)
                or req.num_total_tokens >= self.config.max_model_len)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request.request_id)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        seqs: list[ScheduledSeq] = []
        preempted: list[str] = []

        # Preemption takes victims from the tail, so walking by index never skips a request.
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if req.num_pending and self._finishes_with_pending(req):
                i += 1  # its last token is in flight: nothing left to compute
                continue
            num_new = min(req.num_total_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate_slots(req.request_id, req.token_view(), req.num_computed_tokens,
                                             num_new, num_pending_tokens=req.num_pending):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                seqs.append(ScheduledSeq(req, req.num_computed_tokens, num_new))
                budget -= num_new
                i += 1

        # Admitting new work right after a preemption would just thrash the pool.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            tokens = req.token_view()
            req.num_computed_tokens = self.kv.get_computed_blocks(req.request_id, tokens)
            num_new = min(req.num_total_tokens - req.num_computed_tokens, budget)
            if not self.kv.allocate_slots(req.request_id, tokens, req.num_computed_tokens, num_new,
                                          num_pending_tokens=req.num_pending):
                self.kv.free(req.request_id)  # drop the prefix hits too: it waits holding nothing
                req.num_computed_tokens = 0
                break
            self.waiting.popleft()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            seqs.append(ScheduledSeq(req, req.num_computed_tokens, num_new))
            budget -= num_new
        return SchedulerOutput(tuple(seqs), tuple(preempted))

    def advance(self, out: SchedulerOutput, num_decode_steps: int = 1) -> None:
        """Records that the step was dispatched: scheduled tokens will have their KV in the cache, and each
        sequence that samples has `num_decode_steps` tokens pending (a K-step decode also computes the KV
        of the first K - 1 tokens it samples)."""
        extra = num_decode_steps - 1
        for s in out.seqs:
            req = s.request
            req.num_computed_tokens = s.start + s.num_new_tokens + (extra if s.samples else 0)
            if s.samples:
                req.num_pending += num_decode_steps
