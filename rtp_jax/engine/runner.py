"""ModelRunner: turns a scheduled batch into padded device inputs, runs the step, reads results.

Shapes are padded to power-of-two buckets (tokens T, sequences S, blocks per sequence, scored prompt
positions N; a multi-step decode's S also at the midpoints 3 * 2^k from 96 up) so XLA compiles a handful
of programs; padding tokens write to an out-of-range cache slot (dropped) and padded sequences have zero
length.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from rtp_jax.config import MAX_LOGPROBS
from rtp_jax.engine.sampler import SamplingFlags, build_sampling_tensors
from rtp_jax.engine.scheduler import ScheduledSeq
from rtp_jax.engine.step import KVCaches, Logprobs, StepInputs
from rtp_jax.models.attention import AttentionMetadata

log = logging.getLogger(__name__)

# Prompts with nothing cached before them and at least this many (padded) tokens, alone in their step,
# run the `fresh_fn` program: cuDNN's dense attention beats the paged kernel there (H200, 2048 tokens:
# 94 vs 159 us per layer); smaller ones are not worth another compiled program per token bucket.
FRESH_MIN_TOKENS = 1024


class ProgramShape(NamedTuple):
    """One compiled program: `kind` "mixed", "decode" (`steps` > 1) or "fresh"; padded tokens, sequence
    slots and block-table width."""

    kind: str
    tokens: int
    seqs: int
    width: int
    steps: int = 1


# Multi-step decode programs (T == S) take sequence buckets from here up at the midpoints 3 * 2^k too (96,
# 192, 384, 768, ...): a decode step of that many rows has compute-bound GEMMs (H200: ~15 GFLOP per row), so
# padding 555 sequences to 1024 would cost ~5 ms a step; below this the step reads weights and padding is
# nearly free. Mixed steps keep power-of-two slots: their GEMMs run over the token bucket, and the slots
# only size sampling, so midpoints there would add compiled programs and save nothing.
FINE_SEQ_BUCKETS_FROM = 96
# Sequence slots of the smallest multi-step decode program (mixed steps start at 4). One slot for batch 1 was
# no faster on an H200 (233.9 vs 233.6 tok/s, bench/notes_bench.md), and XLA turns a one-row cache scatter
# with dropped out-of-range writes (the reference backend's `write_kv`) into a copy of the whole cache.
MIN_DECODE_SEQS = 4


def bucket(n: int, minimum: int, maximum: int) -> int:
    """Smallest power of two >= n (at least `minimum`), capped at `maximum` (itself a valid bucket)."""
    b = max(minimum, 1 << max(n - 1, 0).bit_length())
    return min(b, maximum) if n <= maximum else n


def seq_bucket(n: int, minimum: int, maximum: int) -> int:
    """`bucket`, plus the midpoints 3 * 2^k >= FINE_SEQ_BUCKETS_FROM: sequence slots (the T of a decode
    step); never above the power-of-two bucket, so a step's token bucket still covers its slots."""
    mid = 3 * (1 << max(n - 1, 0).bit_length()) // 4
    if max(n, FINE_SEQ_BUCKETS_FROM, minimum) <= mid <= maximum:
        return mid
    return bucket(n, minimum, maximum)


@dataclass
class HostLogprobs:
    """Numpy copy of `Logprobs` for the rows the host reads."""

    target: np.ndarray
    rank: np.ndarray
    top_ids: np.ndarray
    top: np.ndarray

    @classmethod
    def from_device(cls, lp: Logprobs | None) -> HostLogprobs | None:
        if lp is None:
            return None
        return cls(*(np.asarray(x) for x in lp))


@dataclass
class InFlight:
    """A dispatched call whose outputs are still on the device."""

    tokens: jax.Array  # int32[K, S] or int32[S] (mixed step)
    logprobs: Any  # Logprobs | None, device
    prompt_logprobs: Any  # Logprobs | None, device
    spans: list[tuple[int, int, int]]
    multi: bool


@dataclass
class StepResult:
    """Host copy of one runner call. Row k of `tokens` is decode step k (one row for a mixed step)."""

    tokens: np.ndarray  # int32[K, S] (rows of sequences that did not sample are meaningless)
    logprobs: HostLogprobs | None  # fields [K, S, ...]
    prompt_logprobs: HostLogprobs | None
    # (sequence index, first prompt position scored, count), in the row order of prompt_logprobs.
    prompt_lp_spans: list[tuple[int, int, int]]


class ModelRunner:
    """Owns the device state (weights as a flat list of arrays, donated KV caches) and the step
    programs; turns scheduled sequences into padded host arrays and reads back sampled tokens.

    `step_fn(state_leaves, kv_caches, inputs, sampling, flags, prompt_top)` runs one mixed step;
    `decode_fn(..., flags, num_steps)` runs K pure-decode steps (None where unsupported, e.g. pp).
    `bucket_block_tables`: pad block-table width to a power of two (the reference attention's cost
    grows with it); the Pallas kernel reads only live pages, so it takes the full width and saves
    compilations.

    Overlapped scheduling: each call leaves every sampling sequence's last token in a device array
    (`last_tokens`, one row per request, `max_num_seqs` rows), so the next call can be dispatched before
    the host has read this one's tokens; `dispatch` returns at once and `collect` reads the results.
    `last_tokens=None` (pipeline parallelism, whose step takes no such array) means the host must know
    every input token. `fresh_fn` (same signature as `step_fn`; None: not offered) serves a step that is
    one prompt from position 0 of at least `FRESH_MIN_TOKENS` padded tokens.
    """

    def __init__(self, state: nnx.State, kv_caches: KVCaches, step_fn: Callable[..., Any],
                 decode_fn: Callable[..., Any] | None, *, block_size: int, num_blocks: int,
                 max_blocks_per_seq: int, max_num_batched_tokens: int, max_num_seqs: int,
                 bucket_block_tables: bool = True, last_tokens: jax.Array | None = None,
                 fresh_fn: Callable[..., Any] | None = None) -> None:
        self.state_leaves, self._state_treedef = jax.tree.flatten(state)
        self.kv_caches = kv_caches
        self.last_tokens = last_tokens
        self._rows: dict[str, int] = {}  # request id -> row of last_tokens
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_blocks_per_seq = max_blocks_per_seq
        self.max_tokens = max_num_batched_tokens
        self.max_seqs = max_num_seqs
        self.bucket_block_tables = bucket_block_tables
        self._step = step_fn
        self._decode = decode_fn
        self._fresh = fresh_fn if last_tokens is not None else None

    @property
    def state(self) -> nnx.State:
        """The model state (weights), rebuilt from the flat leaves the steps take."""
        return jax.tree.unflatten(self._state_treedef, self.state_leaves)

    @property
    def can_multi_step(self) -> bool:
        return self._decode is not None

    @property
    def can_overlap(self) -> bool:
        """Steps can take input tokens from the previous step's device outputs."""
        return self.last_tokens is not None

    def release(self, request_id: str) -> None:
        """Frees the request's row of last_tokens (finished, aborted or preempted). Unknown ids: no-op."""
        row = self._rows.pop(request_id, None)
        if row is not None:
            self._free_rows.append(row)

    def _row(self, request_id: str) -> int:
        row = self._rows.get(request_id)
        if row is None:
            row = self._rows[request_id] = self._free_rows.pop()
        return row

    def build_inputs(self, seqs: Sequence[ScheduledSeq], block_tables: Sequence[list[int]],
                     lookahead: int = 0) -> tuple[StepInputs, list[tuple[int, int, int]]]:
        """Host arrays for one step. Returns the inputs and, per sequence that scores prompt
        logprobs, (sequence index, first scored position, count). With `lookahead` > 0 (multi-step
        decode) there is one row per sequence (T == S) and block tables cover `lookahead` more tokens."""
        bs = self.block_size
        num_tokens = sum(s.num_new_tokens for s in seqs)
        if lookahead:
            s_pad = seq_bucket(len(seqs), MIN_DECODE_SEQS, self.max_seqs)
        else:
            s_pad = bucket(len(seqs), 4, self.max_seqs)
        t_pad = s_pad if lookahead else bucket(num_tokens, 16, self.max_tokens)
        if self.bucket_block_tables:
            max_blocks = max(-(-(s.start + s.num_new_tokens + lookahead) // bs) for s in seqs)
            b_pad = bucket(max_blocks, 4, self.max_blocks_per_seq)
        else:
            b_pad = self.max_blocks_per_seq

        input_ids = np.zeros(t_pad, np.int32)
        positions = np.zeros(t_pad, np.int32)
        slots = np.full(t_pad, self.num_blocks * bs, np.int32)  # out of range: dropped
        qsl = np.zeros(s_pad + 1, np.int32)
        kv_lens = np.zeros(s_pad, np.int32)
        tables = np.zeros((s_pad, b_pad), np.int32)
        sample_idx = np.zeros(s_pad, np.int32)
        feed_rows = np.full(t_pad, -1, np.int32)
        seq_rows = np.full(s_pad, self.max_seqs, np.int32)  # out of range: dropped
        lp_idx: list[int] = []
        lp_targets: list[int] = []
        spans: list[tuple[int, int, int]] = []

        offset = 0
        for i, (s, table) in enumerate(zip(seqs, block_tables, strict=True)):
            n, start, end = s.num_new_tokens, s.start, s.start + s.num_new_tokens
            pos = np.arange(start, end, dtype=np.int32)
            req = s.request
            known = max(min(end, req.num_tokens), start)  # tokens past num_tokens are still on the device
            input_ids[offset:offset + known - start] = req.token_view()[start:known]
            if known < end:  # only the last sampled token is fed; a K-step decode computed the others
                assert end - known == 1 and req.request_id in self._rows, (req.request_id, start, end, known)
                feed_rows[offset + n - 1] = self._rows[req.request_id]
            if s.samples and self.last_tokens is not None:
                seq_rows[i] = self._row(req.request_id)
            positions[offset:offset + n] = pos
            table_np = np.asarray(table[:b_pad], np.int32)
            slots[offset:offset + n] = table_np[pos // bs] * bs + pos % bs
            tables[i, : len(table_np)] = table_np
            qsl[i + 1] = offset + n
            kv_lens[i] = end
            sample_idx[i] = offset + n - 1
            first, count = self._prompt_lp_range(s)
            if count:
                spans.append((i, first, count))
                lp_idx.extend(range(offset + first - start, offset + first - start + count))
                lp_targets.extend(s.request.prompt_token_ids[first + 1: first + 1 + count])
            offset += n
        qsl[len(seqs) + 1:] = offset

        n_pad = 0 if not lp_idx else bucket(len(lp_idx), 16, self.max_tokens)
        lp_idx_np = np.zeros(n_pad, np.int32)
        lp_tg_np = np.zeros(n_pad, np.int32)
        lp_idx_np[: len(lp_idx)] = lp_idx
        lp_tg_np[: len(lp_targets)] = lp_targets
        md = AttentionMetadata(slots, kv_lens, tables, qsl, np.int32(len(seqs)))
        inputs = StepInputs(input_ids, positions, md, sample_idx, lp_idx_np, lp_tg_np, feed_rows, seq_rows)
        return inputs, spans

    def dummy_inputs(self, num_tokens: int, num_seqs: int, num_blocks: int) -> StepInputs:
        """All-padding inputs of padded shape (tokens, seqs, block-table width): what `build_inputs`
        produces for a batch in those buckets (no scored prompt positions), so one program serves both."""
        md = AttentionMetadata(np.full(num_tokens, self.num_blocks * self.block_size, np.int32),
                               np.zeros(num_seqs, np.int32), np.zeros((num_seqs, num_blocks), np.int32),
                               np.zeros(num_seqs + 1, np.int32), np.int32(0))
        empty = np.zeros(0, np.int32)
        return StepInputs(np.zeros(num_tokens, np.int32), np.zeros(num_tokens, np.int32), md,
                          np.zeros(num_seqs, np.int32), empty, empty, np.full(num_tokens, -1, np.int32),
                          np.full(num_seqs, self.max_seqs, np.int32))

    def bucket_shapes(self, num_decode_steps: int) -> list[ProgramShape]:
        """Every program a batch can select: mixed steps for each power-of-two sequence bucket and each token
        bucket at least as large, K-step decodes (T == S, `seq_bucket`'s slots) for each power of two K up to
        `num_decode_steps`, and
        fresh-prompt steps (one sequence slot bucket) for each token bucket from `FRESH_MIN_TOKENS`."""
        def buckets(maximum: int, minimum: int, fn: Callable[[int, int, int], int] = bucket) -> list[int]:
            return sorted({fn(n, minimum, maximum) for n in range(1, maximum + 1)})

        seqs, toks = buckets(self.max_seqs, 4), buckets(self.max_tokens, 16)
        decode_seqs = buckets(self.max_seqs, MIN_DECODE_SEQS, seq_bucket)
        widths = [self.max_blocks_per_seq]
        if self.bucket_block_tables:
            widths = buckets(self.max_blocks_per_seq, 4)
        ks = [1 << i for i in range(1, num_decode_steps.bit_length()) if 1 << i <= num_decode_steps]
        if self._decode is None:
            ks = []
        shapes = [ProgramShape("mixed", t, s, b) for s in seqs for b in widths for t in toks if t >= s]
        shapes += [ProgramShape("decode", s, s, b, k) for s in decode_seqs for b in widths for k in ks]
        if self._fresh is not None:
            big = [t for t in toks if t >= FRESH_MIN_TOKENS]
            shapes += [ProgramShape("fresh", t, seqs[0], b) for b in widths for t in big]
        return shapes

    def precompile(self, flags: Sequence[SamplingFlags], num_decode_steps: int,
                   max_workers: int = 8) -> int:
        """Compiles, in parallel threads, the program of every bucket shape for each of `flags`, so no
        request waits on XLA later. Returns the number of programs compiled. Not for pipeline stages."""
        from concurrent.futures import ThreadPoolExecutor

        if self.last_tokens is None:
            raise ValueError("precompile is not supported with pipeline_parallel_size > 1")
        fns = {"mixed": self._step, "decode": self._decode, "fresh": self._fresh}
        jobs = []
        for p in self.bucket_shapes(num_decode_steps):
            inp = self.dummy_inputs(p.tokens, p.seqs, p.width)
            st = build_sampling_tensors([], [], [], [], [], [], num_rows=p.seqs)
            jobs += [(fns[p.kind], inp, st, f, p.steps if p.kind == "decode" else 0) for f in flags]
        args = (self.state_leaves, self.kv_caches, self.last_tokens)
        # Cold, this takes minutes on a GPU (an 8B model: ~150 programs of several seconds of XLA each), so
        # a server that is not yet listening says how far it got.
        log.info("precompiling %d programs (%d shapes x %d sampling modes) in %d threads", len(jobs),
                 len(jobs) // max(len(flags), 1), len(flags), max_workers)
        t0, done, compiled = time.perf_counter(), 0, 0
        every = max(1, len(jobs) // 10)
        with ThreadPoolExecutor(max_workers) as pool:
            for fresh in pool.map(lambda j: j[0].compile(*args, *j[1:]), jobs):
                done, compiled = done + 1, compiled + fresh
                if done % every == 0 and done < len(jobs):
                    log.info("precompiled %d/%d programs, %.0f s", done, len(jobs), time.perf_counter() - t0)
        log.info("precompile done: %d programs compiled (%d already were) in %.1f s", compiled,
                 len(jobs) - compiled, time.perf_counter() - t0)
        return compiled

    @staticmethod
    def _prompt_lp_range(s: ScheduledSeq) -> tuple[int, int]:
        """Prompt positions p in this chunk whose next prompt token's logprob is still owed.

        Position p predicts prompt token p + 1, which is entry p + 1 of `request.prompt_logprobs`
        (entry 0 is None); after a preemption the entries already reported are not scored again.
        """
        req = s.request
        if not req.wants_prompt_logprobs:
            return 0, 0
        first = max(s.start, len(req.prompt_logprobs) - 1, 0)
        last = min(s.start + s.num_new_tokens, req.num_prompt_tokens - 1)  # exclusive
        return first, max(last - first, 0)

    def dispatch(self, seqs: Sequence[ScheduledSeq], block_tables: Sequence[list[int]],
                 seeds: Sequence[int], num_decode_steps: int = 1) -> InFlight:
        """Builds the inputs and launches one mixed step, or `num_decode_steps` > 1 decode steps of a
        pure-decode batch; returns without waiting for the device."""
        multi = num_decode_steps > 1
        inputs, spans = self.build_inputs(seqs, block_tables, lookahead=num_decode_steps - 1 if multi else 0)
        reqs = [s.request for s in seqs]
        params = [r.params for r in reqs]
        banned = [sorted(r.stop_token_ids()) if r.num_output_tokens < r.params.min_tokens else []
                  for r in reqs]
        st = build_sampling_tensors(
            params, list(seeds), [r.num_output_tokens for r in reqs],
            [r.prompt_token_ids for r in reqs], [r.output_token_ids for r in reqs], banned,
            num_rows=inputs.sample_idx.shape[0],
        )
        flags = SamplingFlags.from_params(params)
        if multi:
            assert self._decode is not None
            self.kv_caches, self.last_tokens, dec = self._decode(
                self.state_leaves, self.kv_caches, self.last_tokens, inputs, st, flags, num_decode_steps)
            return InFlight(dec.tokens, dec.logprobs, None, [], True)
        prompt_top = max((r.params.prompt_logprobs or 0 for r in reqs if r.wants_prompt_logprobs), default=0)
        prompt_top = min(MAX_LOGPROBS, 1 << max(prompt_top - 1, 0).bit_length()) if prompt_top else 0
        if self.last_tokens is None:  # pipeline stages: host inputs only
            self.kv_caches, out = self._step(self.state_leaves, self.kv_caches, inputs, st, flags, prompt_top)
        else:
            fresh = (self._fresh is not None and len(seqs) == 1 and seqs[0].start == 0
                     and inputs.input_ids.shape[0] >= FRESH_MIN_TOKENS)
            self.kv_caches, self.last_tokens, out = (self._fresh if fresh else self._step)(
                self.state_leaves, self.kv_caches, self.last_tokens, inputs, st, flags, prompt_top)
        return InFlight(out.tokens, out.logprobs, out.prompt_logprobs, spans, False)

    @staticmethod
    def collect(f: InFlight) -> StepResult:
        """Waits for a dispatched call and copies its results to the host."""
        lp = HostLogprobs.from_device(f.logprobs)
        if f.multi:
            return StepResult(np.asarray(f.tokens), lp, None, [])
        if lp is not None:
            lp = HostLogprobs(*(x[None] for x in (lp.target, lp.rank, lp.top_ids, lp.top)))
        prompt_lp = HostLogprobs.from_device(f.prompt_logprobs)
        return StepResult(np.asarray(f.tokens)[None], lp, prompt_lp, f.spans)
