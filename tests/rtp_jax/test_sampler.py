"""Tests for rtp_jax.engine.sampler against numpy references; small shapes, fixed seeds, CPU-fast."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from rtp_jax.config import SamplingParams
from rtp_jax.engine.sampler import (
    SamplingFlags,
    SamplingTensors,
    apply_penalties,
    build_sampling_tensors,
    compute_logprobs,
    process_logits,
    sample,
)

_sample = jax.jit(sample, static_argnames="flags")
_process = jax.jit(process_logits, static_argnames="flags")
_penalties = jax.jit(apply_penalties)
_logprobs = jax.jit(compute_logprobs, static_argnames="num_top")


def _batch(
    params: list[SamplingParams],
    *,
    seeds: list[int] | None = None,
    steps: list[int] | None = None,
    prompt: list[list[int]] | None = None,
    output: list[list[int]] | None = None,
    banned: list[list[int]] | None = None,
    num_rows: int | None = None,
) -> tuple[SamplingTensors, SamplingFlags]:
    n = len(params)
    tensors = build_sampling_tensors(
        params,
        seeds if seeds is not None else list(range(n)),
        steps if steps is not None else [0] * n,
        prompt if prompt is not None else [[] for _ in range(n)],
        output if output is not None else [[] for _ in range(n)],
        banned if banned is not None else [[] for _ in range(n)],
        num_rows if num_rows is not None else n,
    )
    return tensors, SamplingFlags.from_params(params)


def _logits(rng: np.random.Generator, rows: int, vocab: int, scale: float = 2.0) -> np.ndarray:
    return (rng.standard_normal((rows, vocab)) * scale).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# numpy references


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


def _ref_filtered_probs(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """[V] -> the distribution sampling should follow: softmax(l / T), then top-k, top-p, min-p (HF order)."""
    x = logits.astype(np.float64) / p.temperature
    keep = np.ones(x.shape, bool)
    order = np.argsort(-x, kind="stable")
    if p.top_k > 0:
        keep[order[p.top_k:]] = False
    if p.top_p < 1.0:
        probs = _softmax(np.where(keep, x, -np.inf))[order]
        before = np.cumsum(probs) - probs  # mass of strictly more likely tokens
        keep[order[before >= p.top_p]] = False
    if p.min_p > 0.0:
        probs = _softmax(np.where(keep, x, -np.inf))
        keep &= probs >= p.min_p * probs.max()
    return _softmax(np.where(keep, x, -np.inf))


def _ref_penalties(logits: np.ndarray, prompt: list[int], output: list[int], p: SamplingParams) -> np.ndarray:
    """[V] -> vLLM penalties: repetition over prompt + output, then frequency and presence over output."""
    out = logits.astype(np.float64).copy()
    for tok in set(prompt) | set(output):
        rp = p.repetition_penalty
        out[tok] = out[tok] / rp if out[tok] > 0 else out[tok] * rp
    for tok in set(output):
        out[tok] -= p.frequency_penalty * output.count(tok) + p.presence_penalty
    return out


# ---------------------------------------------------------------------------------------------------------
# greedy and degenerate filters


def test_greedy_equals_argmax():
    """All-greedy batches return the argmax of the raw logits."""
    logits = _logits(np.random.default_rng(0), 8, 64)
    tensors, flags = _batch([SamplingParams(temperature=0.0)] * 8)
    assert flags.all_greedy
    np.testing.assert_array_equal(_sample(logits, tensors, flags), logits.argmax(-1))


def test_greedy_rows_ignore_seed_step_and_their_filters():
    """Temperature-0 rows give the argmax whatever their seed, step or filter settings, in a sampled batch."""
    logits = _logits(np.random.default_rng(1), 8, 64)
    greedy = SamplingParams(temperature=0.0, top_k=3, top_p=0.5, min_p=0.3)
    params = [greedy, SamplingParams(temperature=1.5)] * 4
    for seed in range(3):
        tensors, flags = _batch(params, seeds=[seed * 100 + i for i in range(8)], steps=[seed] * 8)
        assert not flags.all_greedy
        tokens = np.asarray(_sample(logits, tensors, flags))
        np.testing.assert_array_equal(tokens[0::2], logits[0::2].argmax(-1))


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_p=1e-6),
     SamplingParams(temperature=1.0, min_p=1.0)],
    ids=["top_k=1", "top_p=1e-6", "min_p=1"],
)
def test_filters_that_keep_one_token_equal_greedy(params: SamplingParams):
    """top_k=1, a tiny top_p and min_p=1 each leave only the argmax, whatever the seed."""
    rows = 64
    logits = np.repeat(_logits(np.random.default_rng(2), 1, 64), rows, axis=0)
    tensors, flags = _batch([params] * rows, seeds=list(range(rows)))
    np.testing.assert_array_equal(_sample(logits, tensors, flags), logits.argmax(-1))


# ---------------------------------------------------------------------------------------------------------
# seeded reproducibility


def test_seeded_row_is_independent_of_batch():
    """A seeded row draws the same token alone, permuted, or among rows that switch on other stages."""
    rng = np.random.default_rng(3)
    vocab = 128
    probe = [SamplingParams(temperature=0.9), SamplingParams(temperature=1.3, top_p=0.9),
             SamplingParams(temperature=1.0, min_p=0.05), SamplingParams(temperature=0.7, top_k=20)]
    probe_seeds = [11, 2**40 + 7, 5, 2**63 - 1]
    probe_steps = [0, 3, 17, 100]
    probe_logits = _logits(rng, len(probe), vocab)
    alone = [
        int(_sample(probe_logits[i: i + 1],
                    *_batch([probe[i]], seeds=[probe_seeds[i]], steps=[probe_steps[i]]))[0])
        for i in range(len(probe))
    ]

    others = [SamplingParams(temperature=0.0, repetition_penalty=1.3),
              SamplingParams(temperature=1.0, top_k=3, presence_penalty=0.5, frequency_penalty=0.2),
              SamplingParams(temperature=2.0, min_p=0.3, top_p=0.5)]
    params = probe + others
    seeds = probe_seeds + [1, 2, 3]
    steps = probe_steps + [4, 5, 6]
    logits = np.concatenate([probe_logits, _logits(rng, len(others), vocab)])
    padding_logits = _logits(rng, 16 - len(params), vocab)
    out = [list(rng.integers(0, vocab, 9)) for _ in params]
    banned = [[] for _ in probe] + [[0, 1], [2], []]
    for perm in (np.arange(len(params)), rng.permutation(len(params)), rng.permutation(len(params))):
        tensors, flags = _batch([params[i] for i in perm], seeds=[seeds[i] for i in perm],
                                steps=[steps[i] for i in perm], output=[out[i] for i in perm],
                                prompt=[out[i] for i in perm], banned=[banned[i] for i in perm], num_rows=16)
        assert flags.needs_penalties and flags.needs_sort and flags.needs_min_p
        tokens = np.asarray(_sample(np.concatenate([logits[perm], padding_logits]), tensors, flags))
        where = {int(row): pos for pos, row in enumerate(perm)}
        assert [int(tokens[where[i]]) for i in range(len(probe))] == alone


def test_key_depends_on_seed_and_step():
    """Different steps (same seed) and different seeds (same step) give different draws."""
    logits = np.zeros((256, 1024), np.float32)  # uniform: any repeat of a whole stream is a key collision
    params = [SamplingParams(temperature=1.0)] * 256
    by_step = np.asarray(_sample(logits, *_batch(params, seeds=[7] * 256, steps=list(range(256)))))
    by_seed = np.asarray(_sample(logits, *_batch(params, seeds=list(range(256)), steps=[7] * 256)))
    assert len(set(by_step.tolist())) > 200 and len(set(by_seed.tolist())) > 200


# ---------------------------------------------------------------------------------------------------------
# distributions

_CHI2_LIMIT = 40.0  # chi-square quantile 1 - 1e-6 for 7 degrees of freedom is ~39.3; fewer dof is looser


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.6),
        SamplingParams(temperature=1.0, top_k=3),
        SamplingParams(temperature=1.0, top_p=0.7),
        SamplingParams(temperature=1.5, min_p=0.15),
        SamplingParams(temperature=1.3, top_k=6, top_p=0.85, min_p=0.05),
    ],
    ids=["T=1", "T=0.6", "top_k=3", "top_p=0.7", "min_p=0.15", "all"],
)
@pytest.mark.parametrize("vary", ["seed", "step"])
def test_empirical_distribution_matches_reference(params: SamplingParams, vary: str):
    """Over many keys (varying the seed or the step), token frequencies follow the numpy-filtered softmax."""
    n, vocab = 20000, 8
    row = np.array([1.2, -0.3, 0.4, 2.0, -1.5, 0.9, 0.0, -0.7], np.float32)
    expected = _ref_filtered_probs(row, params)
    ids = list(range(n))
    tensors, flags = _batch([params] * n, seeds=ids if vary == "seed" else [123] * n,
                            steps=ids if vary == "step" else [9] * n)
    tokens = np.asarray(_sample(np.tile(row, (n, 1)), tensors, flags))
    counts = np.bincount(tokens, minlength=vocab)
    support = expected > 0
    assert counts[~support].sum() == 0, f"sampled filtered-out tokens: {counts} vs {expected}"
    chi2 = (((counts - n * expected)[support]) ** 2 / (n * expected[support])).sum()
    assert chi2 < _CHI2_LIMIT, f"chi2={chi2:.1f}: counts {counts} vs expected {np.round(n * expected)}"


def test_reference_filters_are_not_vacuous():
    """The distribution test's filter settings really remove tokens (else it would only check softmax)."""
    row = np.array([1.2, -0.3, 0.4, 2.0, -1.5, 0.9, 0.0, -0.7], np.float32)
    kept = [int((_ref_filtered_probs(row, SamplingParams(temperature=1.0, **kw)) > 0).sum())
            for kw in ({"top_k": 3}, {"top_p": 0.7}, {"min_p": 0.15})]
    assert all(1 < k < 8 for k in kept), kept


# ---------------------------------------------------------------------------------------------------------
# penalties and banned tokens


def test_penalties_match_reference():
    """Repetition, presence and frequency penalties equal the numpy vLLM reference on random inputs."""
    rng = np.random.default_rng(4)
    rows, vocab = 6, 50
    logits = _logits(rng, rows, vocab)
    params = [SamplingParams(temperature=0.0, repetition_penalty=float(rng.uniform(0.5, 2.0)),
                             presence_penalty=float(rng.uniform(-2, 2)),
                             frequency_penalty=float(rng.uniform(-2, 2))) for _ in range(rows - 1)]
    params.append(SamplingParams(temperature=0.0))  # no penalties: must come back unchanged
    # Small id range so tokens repeat (frequency counts > 1) and overlap between prompt and output.
    prompt = [list(rng.integers(0, 20, rng.integers(0, 12))) for _ in range(rows)]
    output = [list(rng.integers(0, 20, rng.integers(0, 12))) for _ in range(rows)]
    tensors, flags = _batch(params, prompt=prompt, output=output)
    assert flags.needs_penalties
    got = np.asarray(_penalties(logits, tensors))
    want = np.stack([_ref_penalties(logits[i], prompt[i], output[i], params[i]) for i in range(rows)])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[-1], logits[-1])
    np.testing.assert_array_equal(_sample(logits, tensors, flags), want.argmax(-1))


def test_prompt_only_counts_for_repetition_penalty():
    """Presence/frequency look at output tokens only: prompt tokens leave those rows' logits unchanged."""
    logits = _logits(np.random.default_rng(5), 1, 16)
    tensors, flags = _batch([SamplingParams(presence_penalty=1.0, frequency_penalty=1.0)],
                            prompt=[[1, 2, 3]], output=[[]])
    np.testing.assert_array_equal(_penalties(logits, tensors), logits)


def test_banned_tokens_are_never_sampled():
    """Banned ids are never drawn (hot temperature, many seeds); a greedy row falls back to the runner-up."""
    n, vocab = 4000, 16
    row = _logits(np.random.default_rng(6), 1, vocab)[0]
    order = np.argsort(-row)
    banned_ids = [int(t) for t in order[:5]]
    params = [SamplingParams(temperature=2.0)] * (n - 1) + [SamplingParams(temperature=0.0)]
    tensors, flags = _batch(params, seeds=list(range(n)), banned=[banned_ids] * n)
    tokens = np.asarray(_sample(np.tile(row, (n, 1)), tensors, flags))
    assert not np.isin(tokens, banned_ids).any()
    assert tokens[-1] == order[5]
    assert len(set(tokens[:-1].tolist())) == vocab - len(banned_ids)  # every other token still reachable


def test_padding_rows_are_greedy_and_finite():
    """Rows past the real sequences carry no NaN or -inf-everywhere logits and return the raw argmax."""
    rng = np.random.default_rng(7)
    params = [SamplingParams(temperature=0.8, top_k=4, top_p=0.9, min_p=0.1, repetition_penalty=1.2,
                             presence_penalty=0.3, frequency_penalty=0.3)] * 3
    tensors, flags = _batch(params, output=[[1, 1, 2]] * 3, prompt=[[3]] * 3, banned=[[0]] * 3, num_rows=8)
    logits = _logits(rng, 8, 32)
    processed = np.asarray(_process(logits, tensors, flags))
    assert not np.isnan(processed).any()
    np.testing.assert_array_equal(processed[3:], logits[3:])
    tokens = np.asarray(_sample(logits, tensors, flags))
    np.testing.assert_array_equal(tokens[3:], logits[3:].argmax(-1))
    assert ((tokens >= 0) & (tokens < 32)).all()


# ---------------------------------------------------------------------------------------------------------
# logprobs


@pytest.mark.parametrize("num_top", [0, 1, 5])
def test_compute_logprobs_matches_numpy(num_top: int):
    """Target logprob = numpy log_softmax, rank = 1 + count of more likely tokens, top-k sorted descending."""
    rng = np.random.default_rng(8)
    n, vocab = 5, 40
    logits = _logits(rng, n, vocab, scale=3.0)
    targets = rng.integers(0, vocab, n).astype(np.int32)
    targets[0] = logits[0].argmax()
    lp, rank, top_ids, top_lp = map(np.asarray, _logprobs(logits, targets, num_top))
    x = logits.astype(np.float64)
    ref = x - x.max(-1, keepdims=True)
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    np.testing.assert_allclose(lp, ref[np.arange(n), targets], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(rank, 1 + (ref > ref[np.arange(n), targets][:, None]).sum(-1))
    assert rank[0] == 1
    assert top_ids.shape == (n, num_top) and top_lp.shape == (n, num_top)
    ref_top = np.argsort(-ref, axis=-1, kind="stable")[:, :num_top]
    np.testing.assert_array_equal(top_ids, ref_top)
    np.testing.assert_allclose(top_lp, np.take_along_axis(ref, ref_top, -1), rtol=1e-5, atol=1e-5)


def test_logprobs_are_of_raw_logits():
    """Logprobs ignore penalties and temperature: same logits give the same values whatever sampled them."""
    logits = _logits(np.random.default_rng(9), 2, 16)
    lp, _, _, _ = _logprobs(logits, np.array([3, 4], np.int32), 0)
    lp_scaled, _, _, _ = _logprobs(logits / 0.5, np.array([3, 4], np.int32), 0)
    assert not np.allclose(lp, lp_scaled)  # so the first call really is the unscaled distribution
    np.testing.assert_allclose(lp, jax.nn.log_softmax(logits)[np.arange(2), [3, 4]], rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# host-side builder and flags


def test_builder_shapes_dtypes_and_padding():
    """Token lists pad to power-of-two widths (min 1); rows without penalties ship no tokens; seeds split."""
    params = [SamplingParams(repetition_penalty=1.1), SamplingParams(presence_penalty=0.5),
              SamplingParams()]
    t = build_sampling_tensors(params, [5, 2**40 + 3, 0], [1, 2, 3], [[1] * 5, [2] * 9, [3] * 40],
                               [[4] * 3, [5] * 2, [6] * 70], [[], [7, 8, 9], []], num_rows=4)
    assert t.prompt_tokens.shape == (4, 8)  # only row 0 (repetition penalty) needs its prompt
    assert t.output_tokens.shape == (4, 4)  # rows 0 and 1 need outputs; row 2 has no penalties
    assert t.banned_tokens.shape == (4, 4)
    assert (t.prompt_tokens[1:] == -1).all() and (t.output_tokens[2:] == -1).all()
    assert t.seed.dtype == np.uint32 and t.seed.shape == (4, 2)
    np.testing.assert_array_equal(t.seed[:3], [[0, 5], [256, 3], [0, 0]])
    assert t.temperature[3] == 0.0 and t.repetition_penalty[3] == 1.0 and t.top_p[3] == 1.0
    assert {f: getattr(t, f).dtype for f in ("temperature", "top_k", "step")} == {
        "temperature": np.float32, "top_k": np.int32, "step": np.int32}
    empty = build_sampling_tensors([], [], [], [], [], [], num_rows=2)
    assert empty.prompt_tokens.shape == (2, 1) and empty.banned_tokens.shape == (2, 1)
    with pytest.raises(ValueError):
        build_sampling_tensors(params, [0], [0], [[]], [[]], [[]], num_rows=4)
    with pytest.raises(ValueError):
        build_sampling_tensors(params, [0] * 3, [0] * 3, [[]] * 3, [[]] * 3, [[]] * 3, num_rows=2)


def test_builder_seed_matches_jax_key():
    """The seed words are jax's own threefry key data for that seed (so jax.random.key(seed) agrees)."""
    t = build_sampling_tensors([SamplingParams()], [1234], [0], [[]], [[]], [[]], num_rows=1)
    np.testing.assert_array_equal(t.seed[0], jax.random.key_data(jax.random.key(1234, impl="threefry2x32")))


def test_flags_from_params():
    """Flags switch on only the stages some sampled row needs, and bucket the logprob count."""
    assert SamplingFlags.from_params([SamplingParams(temperature=0.0, top_k=5, min_p=0.5)]) == SamplingFlags()
    f = SamplingFlags.from_params([SamplingParams(top_p=0.9, logprobs=3), SamplingParams(temperature=0.0,
                                                                                          logprobs=0)])
    assert (f.needs_sort, f.needs_min_p, f.needs_penalties, f.all_greedy) == (True, False, False, False)
    assert (f.needs_logprobs, f.num_logprobs) == (True, 5)
    f = SamplingFlags.from_params([SamplingParams(temperature=0.0, logprobs=0, frequency_penalty=0.1)])
    assert (f.needs_logprobs, f.num_logprobs, f.needs_penalties, f.all_greedy) == (True, 0, True, True)
    assert SamplingFlags.from_params([SamplingParams(logprobs=20)]).num_logprobs == 20
    assert hash(f) == hash(SamplingFlags.from_params([SamplingParams(temperature=0.0, logprobs=0,
                                                                     frequency_penalty=0.1)]))
