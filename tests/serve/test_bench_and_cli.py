"""`rtp-jax serve` and `rtp-jax bench serve` wiring, the workload generator, and a small benchmark run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from live_server import LiveServer

from serve import cli
from serve.workload import poisson_arrivals, sharegpt_lengths, synthetic_requests


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtp-jax")
    sub = parser.add_subparsers(dest="command")
    cli.register(sub)
    bench = sub.add_parser("bench").add_subparsers(dest="bench_command")
    cli.register_bench(bench)
    return parser


def test_serve_args() -> None:
    ns = _parser().parse_args(["serve", "--model", "/m/tiny", "--port", "9001", "--max-queue-len", "7",
                               "--dtype", "float32", "--max-model-len", "128", "--api-key", "k"])
    assert ns.func is cli.run_server and ns.port == 9001 and ns.max_queue_len == 7 and ns.api_key == "k"
    assert cli.served_model_name(ns) == "tiny"
    default = _parser().parse_args(["serve"])
    assert default.model is None and cli.served_model_name(default) == cli.DEFAULT_MODEL_NAME
    assert default.host == "127.0.0.1" and default.port == 8000


def test_workload_is_seeded_and_shaped() -> None:
    a = synthetic_requests(50, seed=3, vocab_size=512)
    b = synthetic_requests(50, seed=3, vocab_size=512)
    assert [r.prompt_token_ids for r in a] == [r.prompt_token_ids for r in b]
    assert all(4 <= r.input_len <= 1024 and 4 <= r.output_len <= 1024 for r in a)
    assert all(16 <= t < 512 for r in a for t in r.prompt_token_ids)
    inputs, outputs = sharegpt_lengths(20000, np.random.default_rng(0))
    assert 150 < np.median(inputs) < 190 and 120 < np.median(outputs) < 160
    gaps = np.diff(poisson_arrivals(20000, 10.0, np.random.default_rng(0)))
    assert abs(gaps.mean() - 0.1) < 0.005
    assert not poisson_arrivals(5, float("inf"), np.random.default_rng(0)).any()


def test_summary_tpot_is_per_token_after_the_first() -> None:
    """TPOT is (E2E - TTFT) / (output tokens - 1) per request, as vLLM's benchmark reports it, whatever
    the chunking of the stream (ITL stays the per-chunk gap); one-token outputs have no TPOT."""
    from serve.bench_serving import RequestResult, summarize

    results = [RequestResult(ok=True, input_len=8, output_len=11, ttft=0.1, e2e=1.1, itl=[0.5, 0.5]),
               RequestResult(ok=True, input_len=8, output_len=1, ttft=0.2, e2e=0.2),
               RequestResult(ok=False, input_len=8, error="HTTP 400")]
    s = summarize(results, duration=2.0)
    assert s["completed"] == 2 and s["failed"] == 1
    assert s["tpot_ms"]["p50"] == pytest.approx(100.0) and s["tpot_ms"]["mean"] == pytest.approx(100.0)
    assert s["itl_ms"]["p50"] == pytest.approx(500.0)


def test_bench_serve_against_live_server(live_server: LiveServer, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    ns = _parser().parse_args(["bench", "serve", "--base-url", live_server.url, "--num-prompts", "12",
                               "--max-input-len", "48", "--max-output-len", "16", "--max-concurrency", "6",
                               "--request-rate", "50", "--output-json", str(out)])
    assert ns.func(ns) == 0, "the CLI exits 0 when every request succeeded"
    saved = json.loads(out.read_text())
    assert saved["completed"] == 12 and saved["failed"] == 0
    expected = synthetic_requests(12, 0, live_server.ctx.limits.vocab_size, 48, 16)
    assert saved["total_output_tokens"] == sum(r.output_len for r in expected)  # exact lengths (ignore_eos)
    assert saved["total_input_tokens"] == sum(r.input_len for r in expected)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        assert set(saved[key]) == {"p50", "p95", "p99", "mean"} and saved[key]["p99"] >= saved[key]["p50"] > 0
    assert saved["request_throughput"] > 0 and saved["output_token_throughput"] > 0
