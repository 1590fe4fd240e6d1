"""Engine-level properties: batching, chunked prefill and preemption never change a request's output."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtp_jax import LLM, SamplingParams


@pytest.fixture(scope="module")
def llama_path(tiny_hf_model: Callable[..., Path]) -> Path:
    return tiny_hf_model("llama")


def _prompts(n: int, seed: int = 1) -> list[dict[str, list[int]]]:
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(3, 512, int(rng.integers(3, 90))).tolist()} for _ in range(n)]


def test_batched_chunked_preempted_equals_alone(llama_path: Path) -> None:
    """Greedy and seeded-sampling outputs of each request alone equal its outputs inside a batch of
    mixed-length requests run with chunked prefill (16-token budget) and a KV pool so small that the
    scheduler must preempt (and later recompute) running requests."""
    prompts = _prompts(8)
    params = [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True) if i % 2 == 0
        else SamplingParams(temperature=0.9, top_p=0.9, seed=100 + i, max_tokens=24, ignore_eos=True)
        for i in range(len(prompts))
    ]
    alone_llm = LLM(str(llama_path), dtype="float32", max_model_len=128)
    alone = [alone_llm.generate(p, sp, use_tqdm=False)[0].outputs[0].token_ids
             for p, sp in zip(prompts, params, strict=True)]

    # 8 blocks of 16 tokens hold one full-length sequence, far less than 8 requests need at once.
    tight = LLM(str(llama_path), dtype="float32", max_model_len=128, max_num_batched_tokens=16,
                max_num_seqs=8, num_kv_blocks=10, enable_prefix_caching=False)
    batched = [o.outputs[0].token_ids for o in tight.generate(prompts, params, use_tqdm=False)]

    assert tight.engine.core.scheduler.num_preemptions > 0, "the test must force preemption"
    assert batched == alone
    assert tight.engine.core.kv.num_free_blocks == 10 - 1, "every block returns to the pool"


def test_prefix_cache_hit_gives_same_output(llama_path: Path) -> None:
    """A second request sharing a long prefix reuses cached blocks and still produces the same tokens."""
    llm = LLM(str(llama_path), dtype="float32", max_model_len=128)
    prompt = _prompts(1, seed=7)[0]["prompt_token_ids"][:3] + list(range(100, 160))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    first = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0].token_ids
    hits_before = llm.engine.core.kv.prefix_cache_hits
    second = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0].token_ids
    assert llm.engine.core.kv.prefix_cache_hits - hits_before >= 48
    assert first == second


def test_prefix_shared_within_one_step(llama_path: Path) -> None:
    """Two identical prompts admitted in the same step: the second hits the blocks the first allocated in
    that step (the engine hashes them after the launch, but a lookup registers what is pending first), and
    both produce the tokens the prompt gives alone."""
    llm = LLM(str(llama_path), dtype="float32", max_model_len=128)
    prompt = {"prompt_token_ids": _prompts(1, seed=9)[0]["prompt_token_ids"][:3] + list(range(200, 260))}
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    kv = llm.engine.core.kv
    assert kv.defer_hashing
    both = [o.outputs[0].token_ids for o in llm.generate([prompt, prompt], params, use_tqdm=False)]
    assert kv.prefix_cache_hits >= 48, "the second prompt must hit in the same step"
    alone = LLM(str(llama_path), dtype="float32", max_model_len=128, enable_prefix_caching=False)
    want = alone.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    assert both == [want, want]


def test_n_sequences_and_seeds(llama_path: Path) -> None:
    """n=3 returns three sequences; a seeded request repeats exactly; different seeds differ."""
    llm = LLM(str(llama_path), dtype="float32", max_model_len=128)
    p = {"prompt_token_ids": [5, 6, 7, 8]}
    sp = SamplingParams(temperature=1.0, n=3, seed=3, max_tokens=12, ignore_eos=True)
    a = llm.generate(p, sp, use_tqdm=False)[0]
    b = llm.generate(p, sp, use_tqdm=False)[0]
    assert [c.index for c in a.outputs] == [0, 1, 2]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) == 3


def test_stop_conditions(llama_path: Path) -> None:
    """max_tokens gives 'length'; a stop token id or a stop string ends with 'stop' and the stop text
    is removed from the output; EOS stops unless ignore_eos."""
    llm = LLM(str(llama_path), dtype="float32", max_model_len=128)
    p = {"prompt_token_ids": [11, 12, 13]}
    free = llm.generate(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    out = free.outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 20

    stop_tok = out.token_ids[5]
    first = out.token_ids.index(stop_tok)
    by_id = llm.generate(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                           stop_token_ids=[stop_tok]), use_tqdm=False)[0].outputs[0]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == stop_tok
    assert by_id.token_ids == out.token_ids[: first + 1]

    text = out.text
    stop_str = text[len(text) // 2: len(text) // 2 + 3]
    assert len(stop_str) == 3
    by_str = llm.generate(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=[stop_str]),
                          use_tqdm=False)[0].outputs[0]
    assert by_str.finish_reason == "stop" and by_str.stop_reason == stop_str
    assert by_str.text == text[: text.index(stop_str)]

    eos = llm.get_tokenizer().eos_token_ids[0]
    forced = llm.generate(p, SamplingParams(temperature=0, max_tokens=5, stop_token_ids=[], min_tokens=0,
                                            ignore_eos=False), use_tqdm=False)[0].outputs[0]
    assert eos not in forced.token_ids[:-1]


def test_logprobs_structure(llama_path: Path) -> None:
    """logprobs=k gives, per generated token, a dict holding the sampled token plus the top k, ranks from 1;
    prompt_logprobs starts with None and then holds each actual prompt token."""
    llm = LLM(str(llama_path), dtype="float32", max_model_len=128)
    prompt = [20, 21, 22, 23, 24]
    o = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=4, logprobs=3,
                     prompt_logprobs=2, ignore_eos=True), use_tqdm=False)[0]
    c = o.outputs[0]
    assert len(c.logprobs) == 4
    for tok, entry in zip(c.token_ids, c.logprobs, strict=True):
        assert tok in entry and entry[tok].rank == 1  # greedy picks the most likely token
        assert 3 <= len(entry) <= 4
        assert all(v.logprob <= 0 for v in entry.values())
    total = sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs, strict=True))
    assert c.cumulative_logprob == pytest.approx(total)
    assert o.prompt_logprobs[0] is None and len(o.prompt_logprobs) == len(prompt)
    for tok, entry in zip(prompt[1:], o.prompt_logprobs[1:], strict=True):
        assert tok in entry and 2 <= len(entry) <= 3


def test_bad_input_raises_and_engine_keeps_serving(llama_path: Path) -> None:
    """Invalid sampling params name the field; an over-long prompt, an empty one, and token ids that are
    not integers in [0, vocab) raise ValueError without queueing anything; numpy ids are accepted as plain
    ints; and the engine then serves a valid request normally."""
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=1000)
    llm = LLM(str(llama_path), dtype="float32", max_model_len=64)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": list(range(3, 103))}],
                     use_tqdm=False)
    for bad in ([1, 99999], [1, -1], [1, 2.5], [1, "a"], [1, None], [[1, 2], [3]], [2**70]):
        with pytest.raises(ValueError, match="token ids"):
            llm.generate({"prompt_token_ids": bad}, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    ids = np.array([5, 6, 7], np.int32)  # numpy ids are accepted and stored as plain ints
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert out.prompt_token_ids == [5, 6, 7] and all(type(t) is int for t in out.prompt_token_ids)
    out = llm.generate("Hello", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3


def test_unknown_model_path_says_what_was_expected(tmp_path: Path) -> None:
    """A path that is neither an HF directory nor a GGUF file gets an error naming what was expected."""
    with pytest.raises((ValueError, FileNotFoundError), match="config.json"):
        LLM(str(tmp_path / "nope"))
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ValueError):
        LLM(str(tmp_path / "junk.gguf"))


def test_multi_step_decode_equals_single_steps(llama_path: Path) -> None:
    """K decode steps per device call give exactly the tokens and logprobs of one step per call, for
    greedy and seeded requests, with a stop string ending a sequence in the middle of a K-step call."""
    prompts = _prompts(5, seed=3)
    params = [SamplingParams(temperature=0, max_tokens=19, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=1.0, seed=5, max_tokens=23, ignore_eos=True, logprobs=0),
              SamplingParams(temperature=0.7, top_k=20, seed=6, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0.8, min_p=0.05, seed=8, max_tokens=17, ignore_eos=True)]
    runs = {}
    for k in (1, 8):
        llm = LLM(str(llama_path), dtype="float32", max_model_len=128, num_decode_steps=k)
        outs = llm.generate(prompts, params, use_tqdm=False)
        runs[k] = [(o.outputs[0].token_ids, o.outputs[0].text,
                    [{t: round(lp.logprob, 5) for t, lp in e.items()} for e in o.outputs[0].logprobs or []])
                   for o in outs]
        core = llm.engine.core
        calls = {"steps": core.num_steps, "calls": core.num_device_calls}
    assert runs[8] == runs[1]
    assert calls["calls"] * 3 < calls["steps"], f"multi-step decode must have run: {calls}"

    # A stop string reached inside a K-step call still ends the text (and tokens) at its token.
    text = runs[1][3][1]
    stop = text[len(text) // 3: len(text) // 3 + 2]
    llm = LLM(str(llama_path), dtype="float32", max_model_len=128, num_decode_steps=8)
    out = llm.generate(prompts[3], params[3].replace(stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.text == text[: text.index(stop)] and out.finish_reason == "stop"
    assert len(out.token_ids) < 30


@pytest.mark.parametrize("k", [8, pytest.param(1, marks=pytest.mark.slow)])
def test_async_scheduling_equals_sync(llama_path: Path, k: int) -> None:
    """Overlapped scheduling (step N + 1 launched before step N's tokens are read, its input tokens fed on
    the device) gives exactly the outputs of synchronous stepping for a batch mixing greedy, seeded,
    stop tokens, stop strings, EOS, penalties (which fall back to waiting), logprobs, n=2, single-token
    requests and chunked prefill under a pool small enough to preempt, with multi-step decode (the
    default, K = 8) and, marked slow (~45 s of compiles), with single steps."""
    prompts = _prompts(9, seed=11)
    base = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    kw = dict(dtype="float32", max_model_len=128, max_num_batched_tokens=32, max_num_seqs=8, num_kv_blocks=14,
              enable_prefix_caching=False, num_decode_steps=k)
    sync_llm = LLM(str(llama_path), async_scheduling=False, **kw)
    free = sync_llm.generate(prompts[1], base, use_tqdm=False)[0].outputs[0]
    params = [
        base,
        base.replace(stop_token_ids=[free.token_ids[4]]),
        base.replace(stop=[free.text[len(free.text) // 2: len(free.text) // 2 + 2]]),
        SamplingParams(temperature=0.9, seed=4, max_tokens=17, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0, max_tokens=15, ignore_eos=True, repetition_penalty=1.3,
                       presence_penalty=0.5),
        SamplingParams(temperature=1.0, seed=9, n=2, max_tokens=11, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, prompt_logprobs=1),
        SamplingParams(temperature=0, max_tokens=25, ignore_eos=False, min_tokens=3),
        SamplingParams(temperature=0.8, top_k=10, seed=2, max_tokens=30, ignore_eos=True),
    ]

    def run(llm: LLM) -> list[tuple]:
        outs = llm.generate(prompts, params, use_tqdm=False)
        core = llm.engine.core
        assert core.kv.num_free_blocks == 14 - 1, "every block returns to the pool"
        assert not core.has_unfinished()
        return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason,
                  [{t: round(lp.logprob, 5) for t, lp in e.items()} for e in c.logprobs or []])
                 for c in o.outputs] for o in outs], core

    ref, sync_core = run(sync_llm)  # the engine that produced `free`: its programs are compiled
    got, core = run(LLM(str(llama_path), async_scheduling=True, **kw))
    assert got == ref, f"num_decode_steps={k}"
    assert core.scheduler.num_preemptions > 0, "the test must force preemption"
    assert sync_core.num_overlapped_calls == 0
    # Calls overlap except while the penalty request runs (its sampling reads its own tokens).
    assert core.num_overlapped_calls >= 5, (core.num_overlapped_calls, core.num_device_calls)


def test_precompile_leaves_nothing_to_compile(llama_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """After `precompile=True`, greedy and plain-sampled batches of any size (prefill chunks, mixed steps,
    multi-step decodes) run without a single XLA compile, and give the same tokens as a lazily
    compiling engine; the precompile pass logs its progress and how many programs it compiled."""
    import logging

    import jax

    kw = dict(dtype="float32", max_model_len=64, max_num_batched_tokens=32, max_num_seqs=4)
    prompts = _prompts(6, seed=5)
    prompts = [{"prompt_token_ids": p["prompt_token_ids"][:40]} for p in prompts]
    params = [SamplingParams(temperature=0, max_tokens=9, ignore_eos=True) if i % 2
              else SamplingParams(temperature=0.8, seed=i, max_tokens=13, ignore_eos=True) for i in range(6)]
    lazy_llm = LLM(str(llama_path), **kw)
    lazy = [o.outputs[0].token_ids for o in lazy_llm.generate(prompts, params, use_tqdm=False)]

    with caplog.at_level(logging.INFO, logger="rtp_jax.engine.runner"):
        llm = LLM(str(llama_path), precompile=True, **kw)
    logged = [r.getMessage() for r in caplog.records if r.name == "rtp_jax.engine.runner"]
    assert logged[0].startswith("precompiling "), logged
    done = [m for m in logged if m.startswith("precompile done: ")]
    assert len(done) == 1 and int(done[0].split()[2]) > 0, logged
    compiles: list[str] = []
    counting = [True]

    def listener(event: str, duration: float, **_: object) -> None:
        if counting[0] and "backend_compile" in event:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    finally:
        counting[0] = False
    assert llm.engine.core.num_device_calls > 5
    assert compiles == [], f"{len(compiles)} programs compiled after precompile"
    assert got == lazy
    # Control: a fresh engine without precompile does compile on the same workload in this process.
    counting[0] = True
    try:
        LLM(str(llama_path), **kw).generate(prompts, params, use_tqdm=False)
    finally:
        counting[0] = False
    assert compiles, "the listener must see compiles of a lazily compiling engine"


class _FakeDevice:
    """A device whose memory statistics the test sets (CPU devices report none)."""

    def __init__(self, in_use: int, limit: int = 80 << 30) -> None:
        self.stats = {"bytes_limit": limit, "bytes_in_use": in_use}

    def memory_stats(self) -> dict[str, int]:
        return self.stats


def test_kv_pool_size_ignores_small_differences_in_memory_in_use(llama_path: Path) -> None:
    """The KV pool's block count (baked into every compiled program's input shapes) changes in steps of
    1/64 of device memory: sweeping the memory in use over 4 GiB of an 80 GiB device in 8 MiB steps
    gives at most 4 GiB / 1.25 GiB + 1 distinct counts, each held over at least a 1.25 GiB stretch
    (bar the sweep's ends), so a restart with a few MB more in use keeps its compiled programs."""
    from rtp_jax.engine.args import EngineArgs
    from rtp_jax.engine.core import plan_num_blocks
    from rtp_jax.loader import load_model_config

    config = EngineArgs(model=str(llama_path), max_model_len=256).engine_config(load_model_config(llama_path))
    step, sweep, granule = 8 << 20, 4 << 30, (80 << 30) // 64
    counts = [plan_num_blocks(config, _FakeDevice((16 << 30) + d)) for d in range(0, sweep, step)]
    runs = [len(list(g)) for _, g in itertools.groupby(counts)]
    assert len(runs) <= sweep // granule + 1, runs
    assert all(r * step >= granule for r in runs[1:-1]), runs
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1] > 0


def test_kv_pool_size_from_the_weights_ignores_transient_memory(llama_path: Path) -> None:
    """Given the weights' bytes, memory in use beyond them up to the tolerance (the smaller of 4 granules
    and half the utilization headroom: 4 GiB of this 80 GiB device at 0.9) leaves the block count
    unchanged, whatever the granule boundaries (loader buffers not yet freed and library workspaces differ
    between a cold- and a warm-cache start); more (another model on the device) is taken off in whole
    granules, so the pool shrinks rather than outgrow the memory really free."""
    from rtp_jax.engine.args import EngineArgs
    from rtp_jax.engine.core import plan_num_blocks
    from rtp_jax.loader import load_model_config

    config = EngineArgs(model=str(llama_path), max_model_len=256).engine_config(load_model_config(llama_path))
    weights = (16 << 30) + 12345
    counts = {plan_num_blocks(config, _FakeDevice(weights + d), weights)
              for d in range(0, 4 << 30, 64 << 20)}
    assert len(counts) == 1
    (steady,) = counts
    crowded = plan_num_blocks(config, _FakeDevice(weights + (20 << 30)), weights)
    unplanned = plan_num_blocks(config, _FakeDevice(weights + (20 << 30)))
    assert 0 < crowded < steady and crowded <= unplanned


def test_weight_bytes_count_the_shards_on_one_device() -> None:
    """The planner's weight bytes are those of the state's arrays on the device asked about."""
    from rtp_jax.engine.core import _weight_bytes_on

    dev = jax.devices()[0]
    state = {"a": jnp.zeros((4, 8), jnp.bfloat16), "b": {"c": jnp.zeros((3,), jnp.float32)}, "n": 7}
    assert _weight_bytes_on(state, dev) == 4 * 8 * 2 + 3 * 4


def test_batch_limit_defaults_follow_the_use(llama_path: Path) -> None:
    """Unset limits: offline generation on a big GPU gets 1024 sequences x 16384 tokens (vLLM's `LLM`
    defaults there), a server or a small GPU 256 x 2048, the CPU 64 x 512; a token budget set alone caps
    the default sequence count so the two stay consistent."""
    from rtp_jax.engine.args import EngineArgs, default_batch_limits
    from rtp_jax.loader import load_model_config

    gib = 1 << 30
    assert default_batch_limits(True, 105 * gib, offline=True) == (1024, 16384)
    assert default_batch_limits(True, 105 * gib, offline=False) == (256, 2048)
    assert default_batch_limits(True, 30 * gib, offline=True) == (256, 2048)
    assert default_batch_limits(False, 0, offline=True) == (64, 512)
    model = load_model_config(llama_path)
    args = EngineArgs(model=str(llama_path), offline=True, max_num_batched_tokens=32)
    sc = args.engine_config(model).scheduler
    assert (sc.max_num_seqs, sc.max_num_batched_tokens) == (32, 32)


def test_llm_builds_its_engine_with_offline_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """`LLM` asks for the offline batch limits unless the caller says otherwise."""
    import rtp_jax.llm as llm_mod

    seen = []
    monkeypatch.setattr(llm_mod, "build_engine", lambda args: seen.append(args.offline))
    LLM("some/model")
    LLM("some/model", offline=False)
    assert seen == [True, False]


def test_midpoint_sequence_buckets_give_the_same_outputs(llama_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With the 3 * 2^k sequence buckets starting at 6 (instead of 96), 5 requests run their K-step decode
    programs in 6 slots, not 8 (their mixed steps keep 8), and produce exactly the power-of-two engine's
    tokens."""
    import rtp_jax.engine.runner as runner_mod

    prompts = _prompts(5, seed=4)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    plain = LLM(str(llama_path), dtype="float32", max_model_len=128, num_decode_steps=8)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    monkeypatch.setattr(runner_mod, "FINE_SEQ_BUCKETS_FROM", 6)
    llm = LLM(str(llama_path), dtype="float32", max_model_len=128, num_decode_steps=8)
    runner = llm.engine.core.runner
    slots: dict[bool, set[int]] = {True: set(), False: set()}  # multi-step decode -> slot counts
    build = runner.build_inputs

    def recording(seqs: Any, tables: Any, lookahead: int = 0) -> Any:
        inputs, spans = build(seqs, tables, lookahead)
        slots[lookahead > 0].add(inputs.seq_rows.shape[0])
        return inputs, spans

    monkeypatch.setattr(runner, "build_inputs", recording)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == want
    assert slots == {True: {6}, False: {8}}, slots
    shapes = runner.bucket_shapes(8)
    assert {p.seqs for p in shapes if p.kind == "decode"} == {4, 6, 8, 12, 16, 24, 32, 48, 64}  # 64 seqs
    assert {p.seqs for p in shapes if p.kind == "mixed"} == {4, 8, 16, 32, 64}


def test_a_finished_request_leaves_no_reference_cycles(llama_path: Path) -> None:
    """Once warm, a generate call leaves nothing for Python's cyclic GC: a request's objects (and the device
    arrays they hold) are freed by reference counting as it finishes, not whenever a collection runs."""
    import gc

    llm = LLM(str(llama_path), dtype="float32", max_model_len=128)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    prompts = _prompts(2, seed=11)
    for _ in range(2):  # compiles the programs these shapes need (tracing leaves cycles), cold and cached
        llm.generate(prompts, params, use_tqdm=False)
    gc.collect()
    flags = gc.get_debug()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        llm.generate(prompts, params, use_tqdm=False)
        gc.collect()
        leftovers = list(gc.garbage)
    finally:
        gc.set_debug(flags)
        gc.garbage.clear()
    assert leftovers == [], sorted({type(o).__name__ for o in leftovers})
