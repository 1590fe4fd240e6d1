"""ModelRunner: turns a scheduled batch into padded device inputs, runs the step, reads results.

Shapes are padded to power-of-two buckets (tokens T, sequences S, blocks per sequence, scored prompt
positions N) so XLA compiles a handful of programs; padding tokens write to an out-of-range cache
slot (dropped) and padded sequences have zero length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from flax import nnx

from rtp_jax.config import MAX_LOGPROBS
from rtp_jax.engine.sampler import SamplingFlags, build_sampling_tensors
from rtp_jax.engine.scheduler import ScheduledSeq
from rtp_jax.engine.step import KVCaches, Logprobs, StepInputs
from rtp_jax.models.attention import AttentionMetadata


def bucket(n: int, minimum: int, maximum: int) -> int:
    """Smallest power of two >= n (at least `minimum`), capped at `maximum` (itself a valid bucket)."""
    b = max(minimum, 1 << max(n - 1, 0).bit_length())
    return min(b, maximum) if n <= maximum else n


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
    """

    def __init__(self, state: nnx.State, kv_caches: KVCaches, step_fn: Callable[..., Any],
                 decode_fn: Callable[..., Any] | None, *, block_size: int, num_blocks: int,
                 max_blocks_per_seq: int, max_num_batched_tokens: int, max_num_seqs: int,
                 bucket_block_tables: bool = True) -> None:
        self.state_leaves, self._state_treedef = jax.tree.flatten(state)
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_blocks_per_seq = max_blocks_per_seq
        self.max_tokens = max_num_batched_tokens
        self.max_seqs = max_num_seqs
        self.bucket_block_tables = bucket_block_tables
        self._step = step_fn
        self._decode = decode_fn

    @property
    def state(self) -> nnx.State:
        """The model state (weights), rebuilt from the flat leaves the steps take."""
        return jax.tree.unflatten(self._state_treedef, self.state_leaves)

    @property
    def can_multi_step(self) -> bool:
        return self._decode is not None

    def build_inputs(self, seqs: Sequence[ScheduledSeq], block_tables: Sequence[list[int]],
                     lookahead: int = 0) -> tuple[StepInputs, list[tuple[int, int, int]]]:
        """Host arrays for one step. Returns the inputs and, per sequence that scores prompt
        logprobs, (sequence index, first scored position, count). With `lookahead` > 0 (multi-step
        decode) there is one row per sequence (T == S) and block tables cover `lookahead` more tokens."""
        bs = self.block_size
        num_tokens = sum(s.num_new_tokens for s in seqs)
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
        lp_idx: list[int] = []
        lp_targets: list[int] = []
        spans: list[tuple[int, int, int]] = []

        offset = 0
        for i, (s, table) in enumerate(zip(seqs, block_tables, strict=True)):
            n, start, end = s.num_new_tokens, s.start, s.start + s.num_new_tokens
            pos = np.arange(start, end, dtype=np.int32)
            input_ids[offset:offset + n] = s.request.token_view()[start:end]
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
        return StepInputs(input_ids, positions, md, sample_idx, lp_idx_np, lp_tg_np), spans

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

    def execute(self, seqs: Sequence[ScheduledSeq], block_tables: Sequence[list[int]],
                seeds: Sequence[int], num_decode_steps: int = 1) -> StepResult:
        """Runs one mixed step, or `num_decode_steps` > 1 decode steps of a pure-decode batch."""
        multi = num_decode_steps > 1
        inputs, spans = self.build_inputs(seqs, block_tables, lookahead=num_decode_steps - 1 if multi else 0)
        reqs = [s.request for s in seqs]
        params = [r.params for r in reqs]
        banned = [
            sorted(r.stop_token_ids()) if len(r.output_token_ids) < r.params.min_tokens else []
            for r in reqs
        ]
        st = build_sampling_tensors(
            params, list(seeds), [len(r.output_token_ids) for r in reqs],
            [r.prompt_token_ids for r in reqs], [r.output_token_ids for r in reqs], banned,
            num_rows=inputs.sample_idx.shape[0],
        )
        flags = SamplingFlags.from_params(params)
        if multi:
            assert self._decode is not None
            self.kv_caches, dec = self._decode(self.state_leaves, self.kv_caches, inputs, st, flags,
                                               num_decode_steps)
            return StepResult(np.asarray(dec.tokens), HostLogprobs.from_device(dec.logprobs), None, [])
        prompt_top = max((r.params.prompt_logprobs or 0 for r in reqs if r.wants_prompt_logprobs), default=0)
        prompt_top = min(MAX_LOGPROBS, 1 << max(prompt_top - 1, 0).bit_length()) if prompt_top else 0
        self.kv_caches, out = self._step(self.state_leaves, self.kv_caches, inputs, st, flags, prompt_top)
        lp = HostLogprobs.from_device(out.logprobs)
        if lp is not None:
            lp = HostLogprobs(*(x[None] for x in (lp.target, lp.rank, lp.top_ids, lp.top)))
        return StepResult(np.asarray(out.tokens)[None], lp, HostLogprobs.from_device(out.prompt_logprobs),
                          spans)
