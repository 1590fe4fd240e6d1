"""Scheduler properties on simulated steps (no model): budgets hold, FCFS admission, everything finishes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rtp_jax.cache import KVCacheManager
from rtp_jax.config import SamplingParams, SchedulerConfig
from rtp_jax.engine.request import Request, RequestStatus
from rtp_jax.engine.scheduler import Scheduler

BLOCK = 4


def _run(prompt_lens: list[int], out_lens: list[int], budget: int, max_seqs: int, num_blocks: int,
         max_len: int, overlap: bool = False) -> tuple[Scheduler, list[Request], list[str]]:
    """Steps the scheduler as the engine core does. With `overlap`, step N + 1 is scheduled before step
    N's tokens are appended (they are pending, as with overlapped scheduling)."""
    kv = KVCacheManager(num_blocks, BLOCK, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_len, budget, max_seqs), kv)
    reqs = [Request(str(i), list(range(1, n + 1)), SamplingParams(max_tokens=o), seed=0)
            for i, (n, o) in enumerate(zip(prompt_lens, out_lens, strict=True))]
    for r in reqs:
        sched.add(r)
    admitted: list[str] = []
    in_flight: list[Request] = []  # requests the last dispatched step samples for

    def collect() -> None:
        for r in in_flight:
            r.num_pending -= 1
            if r.is_finished:
                continue
            r.output_token_ids.append(7)
            if len(r.output_token_ids) >= r.params.max_tokens or r.num_tokens >= max_len:
                sched.finish(r, RequestStatus.FINISHED_LENGTH)
        in_flight.clear()

    for _ in range(10_000):
        if not sched.num_unfinished:
            break
        out = sched.schedule()
        assert out.num_tokens <= budget
        assert len(out.seqs) <= max_seqs
        assert len({s.request.request_id for s in out.seqs}) == len(out.seqs)
        for s in out.seqs:
            if s.start == 0 and s.request.num_preemptions == 0 and s.request.request_id not in admitted:
                admitted.append(s.request.request_id)
            # Every scheduled token has a slot in the request's blocks.
            assert len(kv.block_table(s.request.request_id)) * BLOCK >= s.start + s.num_new_tokens
            # Only the newest token may still be on the device.
            assert s.start + s.num_new_tokens - s.request.num_tokens <= 1
        assert out.seqs or out.preempted or in_flight, "scheduler made no progress"
        samplers = [s.request for s in out.seqs if s.samples]
        sched.advance(out)
        if overlap:
            collect()  # the previous step's tokens, after the next step was dispatched
        in_flight.extend(samplers)
        if not overlap:
            collect()
    collect()
    return sched, reqs, admitted


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    lens=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12)), min_size=1, max_size=12),
    budget=st.integers(8, 48),
    max_seqs=st.integers(1, 8),
    spare_blocks=st.integers(0, 20),
    overlap=st.booleans(),
)
def test_schedule_invariants(lens: list[tuple[int, int]], budget: int, max_seqs: int,
                             spare_blocks: int, overlap: bool) -> None:
    """Under any workload, with or without a step in flight while scheduling, the token budget and
    max_num_seqs hold, scheduled tokens always have KV slots, requests are first admitted in arrival
    order, every request finishes with exactly its output length, and the pool ends empty."""
    max_len = 64
    max_seqs = min(max_seqs, budget)
    num_blocks = max_len // BLOCK + 1 + spare_blocks  # at least one full-length sequence fits
    sched, reqs, admitted = _run([a for a, _ in lens], [b for _, b in lens], budget, max_seqs, num_blocks,
                                 max_len, overlap)
    assert not sched.num_unfinished
    assert admitted == sorted(admitted, key=int)
    for r, (n, o) in zip(reqs, lens, strict=True):
        assert r.status == RequestStatus.FINISHED_LENGTH
        assert len(r.output_token_ids) == min(o, max_len - n)
    assert sched.kv.num_free_blocks == num_blocks - 1


@pytest.mark.parametrize("overlap", [False, True])
def test_preemption_recomputes_from_scratch(overlap: bool) -> None:
    """When the pool runs dry the newest running request is preempted, loses its computed tokens, and is
    readmitted first; it still finishes with its full output (also when preempted with a token in flight)."""
    sched, reqs, _ = _run([30, 30], [20, 20], budget=64, max_seqs=2, num_blocks=17, max_len=64,
                          overlap=overlap)
    assert sched.num_preemptions > 0
    assert [len(r.output_token_ids) for r in reqs] == [20, 20]
    assert reqs[1].num_preemptions > 0 and reqs[0].num_preemptions == 0
