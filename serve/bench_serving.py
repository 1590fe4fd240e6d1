"""`rtp-jax bench serve`: load a running OpenAI-compatible server the way vLLM's benchmark_serving does.

Requests come from `serve.workload` (seeded, ShareGPT-like lengths) and are sent as streaming
completions with `ignore_eos` and `max_tokens` = the sampled output length, so every output has an
exact length. Arrivals are Poisson at `--request-rate` (inf: all at once), optionally capped at
`--max-concurrency` in flight. Reports TTFT / TPOT / ITL / E2E percentiles and request and token
throughput. TPOT is vLLM's per-token figure, (E2E - TTFT) / (output tokens - 1) per request; ITL is the gap
between streamed chunks, so with multi-step decoding (`--num-decode-steps`), where a chunk carries up to K
tokens, it is the time per K tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from serve.workload import SyntheticRequest, poisson_arrivals, synthetic_requests

PERCENTILES = (50, 95, 99)


@dataclass
class RequestResult:
    ok: bool
    input_len: int
    output_len: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


async def _one(client: httpx.AsyncClient, url: str, model: str | None, req: SyntheticRequest,
               use_ids: bool) -> RequestResult:
    body: dict[str, Any] = {
        "prompt": req.prompt_token_ids if use_ids else req.prompt_text, "max_tokens": req.output_len,
        "ignore_eos": True, "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    result = RequestResult(ok=False, input_len=req.input_len)
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = str(chunk["error"])
                    return result
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.output_len = chunk["usage"]["completion_tokens"]
                    result.input_len = chunk["usage"]["prompt_tokens"]
                if chunk.get("choices"):
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.e2e = time.perf_counter() - start
        result.ok = True
    except (httpx.HTTPError, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"
    return result


async def run_benchmark(base_url: str, requests: list[SyntheticRequest], *, model: str | None = None,
                        request_rate: float = math.inf, max_concurrency: int | None = None, seed: int = 0,
                        use_ids: bool = True, timeout: float = 600.0) -> dict[str, Any]:
    """Sends every request and returns the summary (see `summarize`)."""
    url = base_url.rstrip("/") + "/v1/completions"
    arrivals = poisson_arrivals(len(requests), request_rate, np.random.default_rng(seed + 1))
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    limits = httpx.Limits(max_connections=max_concurrency or len(requests) or 1)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()

        async def send(i: int) -> RequestResult:
            delay = arrivals[i] - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            if gate is None:
                return await _one(client, url, model, requests[i], use_ids)
            async with gate:
                return await _one(client, url, model, requests[i], use_ids)

        results = await asyncio.gather(*(send(i) for i in range(len(requests))))
        duration = time.perf_counter() - t0
    return summarize(results, duration)


def _pcts(values: list[float]) -> dict[str, float]:
    if not values:
        return {f"p{p}": 0.0 for p in PERCENTILES} | {"mean": 0.0}
    arr = np.asarray(values) * 1000.0  # milliseconds
    return {f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES} | {"mean": float(arr.mean())}


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_len for r in done)
    in_tokens = sum(r.input_len for r in done)
    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(done) / duration if duration else 0.0,
        "output_token_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
        "ttft_ms": _pcts([r.ttft for r in done]),
        "tpot_ms": _pcts([(r.e2e - r.ttft) / (r.output_len - 1) for r in done if r.output_len > 1]),
        "itl_ms": _pcts([x for r in done for x in r.itl]),
        "e2e_ms": _pcts([r.e2e for r in done]),
    }


def format_table(summary: dict[str, Any]) -> str:
    rows = [
        ("Successful requests", f"{summary['completed']}"), ("Failed requests", f"{summary['failed']}"),
        ("Benchmark duration (s)", f"{summary['duration_s']:.2f}"),
        ("Total input tokens", f"{summary['total_input_tokens']}"),
        ("Total output tokens", f"{summary['total_output_tokens']}"),
        ("Request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{summary['output_token_throughput']:.2f}"),
        ("Total token throughput (tok/s)", f"{summary['total_token_throughput']:.2f}"),
    ]
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E latency")):
        for stat, v in summary[key].items():
            rows.append((f"{stat.upper() if stat != 'mean' else 'Mean'} {name} (ms)", f"{v:.2f}"))
    width = max(len(k) for k, _ in rows) + 2
    bar = "=" * (width + 14)
    lines = [f"{k:<{width}}{v:>14}" for k, v in rows]
    return "\n".join([bar, " Serving Benchmark Result ".center(len(bar), "="), *lines, bar])


# ---- CLI ----------------------------------------------------------------------------------------------

def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the running server")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrivals per second (inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--max-input-len", type=int, default=1024, help="clip sampled input lengths")
    p.add_argument("--max-output-len", type=int, default=1024, help="clip sampled output lengths")
    p.add_argument("--prompt-format", choices=["ids", "words"], default="ids",
                   help="token-id prompts (exact lengths) or random words")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="for token-id prompts (default: from /v1/models)")
    p.add_argument("--output-json", default=None, help="also write the summary here")


def _model_card(base_url: str) -> dict[str, Any]:
    r = httpx.get(base_url.rstrip("/") + "/v1/models", timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]


def main(ns: argparse.Namespace) -> dict[str, Any]:
    card = _model_card(ns.base_url)
    vocab = ns.vocab_size or card.get("vocab_size") or 32000
    max_len = card.get("max_model_len")
    max_in = ns.max_input_len if not max_len else min(ns.max_input_len, max_len // 2)
    max_out = ns.max_output_len if not max_len else min(ns.max_output_len, max_len - max_in)
    requests = synthetic_requests(ns.num_prompts, ns.seed, vocab, max_in, max_out)
    summary = asyncio.run(run_benchmark(ns.base_url, requests, model=ns.model or card["id"],
                                        request_rate=ns.request_rate, max_concurrency=ns.max_concurrency,
                                        seed=ns.seed, use_ids=ns.prompt_format == "ids"))
    summary["config"] = {k: v for k, v in vars(ns).items() if k != "func" and not callable(v)}
    summary["config"]["request_rate"] = str(ns.request_rate)
    print(format_table(summary))
    if ns.output_json:
        with open(ns.output_json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary

