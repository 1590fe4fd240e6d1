"""On-device sampling: penalties, banned tokens, temperature, top-k / top-p / min-p, seeded draws, logprobs.

Contract (everything here runs inside the engine's jitted step; shapes are static):

- The host builds a `SamplingTensors` (numpy) with `build_sampling_tensors` and a static `SamplingFlags` with
  `SamplingFlags.from_params`; the flags are part of the jit cache key, so a batch compiles only the stages it
  needs (no sort unless some row uses top-k/top-p, no [S, V] scatters unless some row uses penalties).
- `sample(logits [S, V], tensors, flags) -> i32[S]`. Row order of work, following vLLM:
  penalties (on raw logits) -> banned tokens -> greedy rows take argmax; sampled rows: / temperature ->
  top-k -> top-p -> min-p -> Gumbel-max draw with the row's own key.
- A row's PRNG key is `fold_in(threefry_key(seed), step)`: it depends only on the request's seed and how many
  tokens it has generated, so a seeded request yields the same tokens whatever batch or row it lands in.
  Every stage is also exact (bit-for-bit) for rows whose setting is "off", so the flags other rows switch on
  cannot change a row's result.
- `compute_logprobs(logits [N, V], target_ids [N], num_top)` gives logprobs of the RAW model distribution
  (vLLM v1 default: before penalties and temperature), the target's rank and the top `num_top` alternatives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rtp_jax.config import MAX_LOGPROBS, SamplingParams

# Temperatures below this are greedy; matches `SamplingParams.greedy`.
GREEDY_EPS = 1e-5
# Static sizes for the number of top logprobs, so a batch compiles one of a handful of programs.
LOGPROB_BUCKETS = (0, 1, 5, MAX_LOGPROBS)
# The engine pads token lists with this id; the sampler drops it before every scatter.
PAD_ID = -1


class SamplingTensors(NamedTuple):
    """Per-row sampling state, S = padded number of sequences (a pytree: a NamedTuple of arrays).

    Padding rows (past the real sequences) are greedy with every filter and penalty off.
    """

    temperature: jax.Array  # f32[S]; < GREEDY_EPS => greedy
    top_k: jax.Array  # i32[S]; <= 0 or >= V => off
    top_p: jax.Array  # f32[S]; >= 1 => off
    min_p: jax.Array  # f32[S]; <= 0 => off
    repetition_penalty: jax.Array  # f32[S]; 1 => off
    presence_penalty: jax.Array  # f32[S]; 0 => off
    frequency_penalty: jax.Array  # f32[S]; 0 => off
    seed: jax.Array  # u32[S, 2]; threefry key data (high word, low word) of the request's 64-bit seed
    step: jax.Array  # i32[S]; tokens generated so far (folded into the key)
    prompt_tokens: jax.Array  # i32[S, Lp]; padded with -1; read only for the repetition penalty
    output_tokens: jax.Array  # i32[S, Lo]; padded with -1; read only for penalties
    banned_tokens: jax.Array  # i32[S, B]; padded with -1; forced to -inf this step (min_tokens, bad words)


@dataclass(frozen=True)
class SamplingFlags:
    """Static (hashable) switches for one batch; a jit static argument.

    `needs_logprobs` tells "no logprobs" apart from "logprobs=0" (the sampled token's logprob only);
    `num_logprobs` is the largest requested number of top logprobs, rounded up to a `LOGPROB_BUCKETS` entry.
    """

    needs_penalties: bool = False
    needs_sort: bool = False
    needs_min_p: bool = False
    all_greedy: bool = True
    needs_logprobs: bool = False
    num_logprobs: int = 0

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams]) -> SamplingFlags:
        # Filters of greedy rows are ignored (the builder switches them off), so they must not cost a sort.
        sampled = [p for p in params if not p.greedy]
        requested = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            needs_penalties=any(_has_penalties(p) for p in params),
            needs_sort=any(p.top_k > 0 or p.top_p < 1.0 for p in sampled),
            needs_min_p=any(p.min_p > 0.0 for p in sampled),
            all_greedy=not sampled,
            needs_logprobs=bool(requested),
            num_logprobs=bucket_num_logprobs(max(requested, default=0)),
        )


def bucket_num_logprobs(n: int) -> int:
    """Smallest entry of LOGPROB_BUCKETS >= n (n <= MAX_LOGPROBS, as SamplingParams validates)."""
    for b in LOGPROB_BUCKETS:
        if n <= b:
            return b
    raise ValueError(f"num_logprobs {n} exceeds MAX_LOGPROBS ({MAX_LOGPROBS})")


def _has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def _pow2_bucket(n: int) -> int:
    """Next power of two >= max(n, 1): token-list widths take few values, so few programs compile."""
    return 1 << max(n - 1, 0).bit_length()


def _pad_token_rows(rows: Sequence[Sequence[int]], keep: Sequence[bool], num_rows: int) -> np.ndarray:
    """Packs the kept rows into i32[num_rows, pow2 width], -1 elsewhere; unkept rows stay empty."""
    width = _pow2_bucket(max((len(r) for r, k in zip(rows, keep, strict=True) if k), default=0))
    out = np.full((num_rows, width), PAD_ID, np.int32)
    for i, (r, k) in enumerate(zip(rows, keep, strict=True)):
        if k and len(r):
            out[i, : len(r)] = r
    return out


def build_sampling_tensors(
    params: Sequence[SamplingParams],
    seeds: Sequence[int],
    steps: Sequence[int],
    prompt_tokens: Sequence[Sequence[int]],
    output_tokens: Sequence[Sequence[int]],
    banned: Sequence[Sequence[int]],
    num_rows: int,
) -> SamplingTensors:
    """Host-side (numpy only) tensors for `num_rows` rows; rows past len(params) are greedy padding.

    seeds: one per row, in [0, 2**64) (the engine draws one for unseeded requests). steps: tokens generated
    so far. Token lists are copied only for rows that use them (prompt: repetition penalty; output: any
    penalty), so a batch without penalties ships [S, 1] arrays.
    """
    n = len(params)
    for name, seq in (("seeds", seeds), ("steps", steps), ("prompt_tokens", prompt_tokens),
                      ("output_tokens", output_tokens), ("banned", banned)):
        if len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries, expected one per params ({n})")
    if num_rows < n:
        raise ValueError(f"num_rows ({num_rows}) is smaller than the number of sequences ({n})")

    def column(values: Sequence[float | int], fill: float | int, dtype: type) -> np.ndarray:
        out = np.full((num_rows,), fill, dtype)
        out[:n] = values
        return out

    # Greedy rows get their filters switched off so they never depend on them (nor trigger a sort).
    filters = [(0.0, 0, 1.0, 0.0) if p.greedy else (p.temperature, max(p.top_k, 0), p.top_p, p.min_p)
               for p in params]
    temps, top_ks, top_ps, min_ps = zip(*filters, strict=True) if filters else ((), (), (), ())
    temperature = column(temps, 0.0, np.float32)
    top_k = column(top_ks, 0, np.int32)
    top_p = column(top_ps, 1.0, np.float32)
    min_p = column(min_ps, 0.0, np.float32)
    seed = np.zeros((num_rows, 2), np.uint32)
    seed[:n, 0] = [(s >> 32) & 0xFFFFFFFF for s in seeds]
    seed[:n, 1] = [s & 0xFFFFFFFF for s in seeds]
    return SamplingTensors(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=column([p.repetition_penalty for p in params], 1.0, np.float32),
        presence_penalty=column([p.presence_penalty for p in params], 0.0, np.float32),
        frequency_penalty=column([p.frequency_penalty for p in params], 0.0, np.float32),
        seed=seed,
        step=column(list(steps), 0, np.int32),
        prompt_tokens=_pad_token_rows(prompt_tokens, [p.repetition_penalty != 1.0 for p in params], num_rows),
        output_tokens=_pad_token_rows(output_tokens, [_has_penalties(p) for p in params], num_rows),
        banned_tokens=_pad_token_rows(banned, [True] * n, num_rows),
    )


# ----------------------------------------------------------------------------------------------------------
# Device side: pure functions of arrays, jittable with `flags` static.


def _scatter_index(tokens: jax.Array, vocab: int) -> jax.Array:
    """Maps padding (-1) and out-of-vocab ids to `vocab`, an index every scatter below drops."""
    return jnp.where((tokens >= 0) & (tokens < vocab), tokens, vocab)


def token_counts(tokens: jax.Array, vocab: int) -> jax.Array:
    """tokens: i32[S, L] padded with -1 -> i32[S, V] occurrences per row (scatter-add, no [S, L, V])."""
    rows = jnp.arange(tokens.shape[0])[:, None]
    zeros = jnp.zeros((tokens.shape[0], vocab), jnp.int32)
    return zeros.at[rows, _scatter_index(tokens, vocab)].add(1, mode="drop")


def apply_penalties(logits: jax.Array, t: SamplingTensors) -> jax.Array:
    """logits: f32[S, V] -> f32[S, V] with vLLM's penalties.

    Repetition (tokens in prompt or output): positive logits / rp, negative logits * rp.
    Then frequency (- fp * count in output) and presence (- pp once if in output).
    Rows with penalties off come back bit-identical (x / 1, x - 0).
    """
    vocab = logits.shape[-1]
    rows = jnp.arange(logits.shape[0])[:, None]
    out_counts = token_counts(t.output_tokens, vocab)
    in_output = out_counts > 0
    in_prompt = jnp.zeros(logits.shape, bool).at[rows, _scatter_index(t.prompt_tokens, vocab)].set(
        True, mode="drop"
    )
    rp = t.repetition_penalty[:, None]
    repeated = jnp.where(logits > 0, logits / rp, logits * rp)
    logits = jnp.where(in_prompt | in_output, repeated, logits)
    logits = logits - t.frequency_penalty[:, None] * out_counts.astype(logits.dtype)
    return logits - t.presence_penalty[:, None] * in_output.astype(logits.dtype)


def apply_banned(logits: jax.Array, banned: jax.Array) -> jax.Array:
    """logits: f32[S, V], banned: i32[S, B] padded with -1 -> banned entries set to -inf."""
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, _scatter_index(banned, logits.shape[-1])].set(-jnp.inf, mode="drop")


def apply_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits: f32[S, V] (already / temperature) -> tokens outside the top-k, then the top-p nucleus, at -inf.

    One sort of the values (no index payload) per call. Both filters keep a prefix of the sorted row, so
    each reduces to a per-row threshold logit; tokens tied with the threshold are all kept. top-p is taken
    over the top-k-renormalised distribution (vLLM and HF order) and always keeps the most likely token.
    """
    vocab = logits.shape[-1]
    ranked = jnp.sort(logits, axis=-1, descending=True)  # [S, V]
    k = jnp.where((top_k <= 0) | (top_k >= vocab), vocab, top_k)  # [S]; off => keep all
    in_top_k = jnp.arange(vocab)[None, :] < k[:, None]  # [S, V] over sorted positions
    probs = jax.nn.softmax(jnp.where(in_top_k, ranked, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # exclusive cumsum: mass of strictly better tokens
    n_top_p = jnp.sum(mass_before < top_p[:, None], axis=-1)  # >= 1 since mass_before[0] == 0 < top_p
    n_keep = jnp.where(top_p >= 1.0, k, jnp.minimum(k, n_top_p))  # [S] in [1, V]
    threshold = jnp.take_along_axis(ranked, (n_keep - 1)[:, None], axis=-1)  # [S, 1]
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def apply_min_p(logits: jax.Array, min_p: jax.Array) -> jax.Array:
    """Drops tokens with prob < min_p * max_prob, compared in logit space: l < l_max + log(min_p).

    Needs no softmax, and since the max token survives top-k/top-p, the result does not depend on whether
    those ran first. min_p <= 0 => log = -inf => every token kept.
    """
    log_min_p = jnp.log(jnp.maximum(min_p, 0.0))[:, None]  # [S, 1]
    cutoff = jnp.max(logits, axis=-1, keepdims=True) + log_min_p
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def row_keys(seed: jax.Array, step: jax.Array) -> jax.Array:
    """seed: u32[S, 2] threefry key data, step: i32[S] -> typed key array [S]: fold_in(key(seed), step)."""
    keys = jax.random.wrap_key_data(seed, impl="threefry2x32")
    return jax.vmap(jax.random.fold_in)(keys, step)


def gumbel_noise(seed: jax.Array, step: jax.Array, vocab: int) -> jax.Array:
    """f32[S, V] Gumbel(0, 1) noise; row i depends only on (seed[i], step[i]), never on S or the row index."""
    return jax.vmap(lambda key: jax.random.gumbel(key, (vocab,), jnp.float32))(row_keys(seed, step))


def process_logits(logits: jax.Array, t: SamplingTensors, flags: SamplingFlags) -> jax.Array:
    """logits: [S, V] -> f32[S, V] the sampling distribution's logits (masked tokens at -inf).

    Greedy rows keep the penalised, unscaled logits; their argmax is the greedy token.
    """
    logits = logits.astype(jnp.float32)
    if flags.needs_penalties:
        logits = apply_penalties(logits, t)
    logits = apply_banned(logits, t.banned_tokens)
    if flags.all_greedy:
        return logits
    greedy = t.temperature < GREEDY_EPS
    logits = logits / jnp.where(greedy, 1.0, t.temperature)[:, None]
    if flags.needs_sort:
        logits = apply_top_k_top_p(logits, t.top_k, t.top_p)
    if flags.needs_min_p:
        logits = apply_min_p(logits, t.min_p)
    return logits


def sample(logits: jax.Array, t: SamplingTensors, flags: SamplingFlags) -> jax.Array:
    """logits: [S, V] -> i32[S] sampled token ids.

    Sampled rows use Gumbel-max: argmax(logits + G) with G ~ Gumbel(0, 1) is a draw from softmax(logits),
    with no normalisation, no cumsum and no second pass over the vocabulary.
    """
    logits = process_logits(logits, t, flags)
    greedy_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if flags.all_greedy:
        return greedy_tokens
    noisy = logits + gumbel_noise(t.seed, t.step, logits.shape[-1])
    sampled_tokens = jnp.argmax(noisy, axis=-1).astype(jnp.int32)
    return jnp.where(t.temperature < GREEDY_EPS, greedy_tokens, sampled_tokens)


def compute_logprobs(
    logits: jax.Array, target_ids: jax.Array, num_top: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Logprobs of the raw model distribution (before penalties and temperature, as vLLM v1 by default).

    logits: [N, V], target_ids: i32[N] (ids outside [0, V), e.g. padding, give meaningless values),
    num_top: static, >= 0. Returns (target_logprob f32[N], target_rank i32[N] with 1 = most likely and tokens
    tied with the target counted ahead of it (as vLLM), top_ids i32[N, num_top],
    top_logprobs f32[N, num_top]).
    """
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [N, V]
    ids = jnp.clip(target_ids, 0, logits.shape[-1] - 1)[:, None]
    target = jnp.take_along_axis(logprobs, ids, axis=-1)  # [N, 1]
    rank = jnp.sum(logprobs >= target, axis=-1).astype(jnp.int32)  # counts the target itself
    if num_top > 0:
        top_logprobs, top_ids = jax.lax.top_k(logprobs, num_top)
    else:
        top_logprobs = jnp.zeros((logits.shape[0], 0), jnp.float32)
        top_ids = jnp.zeros((logits.shape[0], 0), jnp.int32)
    return target[:, 0], rank, top_ids.astype(jnp.int32), top_logprobs
