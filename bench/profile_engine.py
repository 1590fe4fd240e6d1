"""Where the engine's time goes on the GPU: per-call logs and profiler traces of the benchmark workloads.

    python3 bench/profile_engine.py --out $OUT --max-num-seqs 256 --max-num-batched-tokens 2048

Runs, on the Llama-3-8B shape with random weights (bench/synth_ckpt.py): decode at batch 1, one
2048-token prefill, and the offline workload of bench/run_all.py twice (the first run compiles, the
second is the steady state). Writes under --out:
  calls_<tag>.json      one row per device call of the steady offline run: seqs, tokens, K, host ms
                        before dispatch, wall ms
  trace_<name>.json.gz  Perfetto traces (jax.profiler) of decode bs1, the 2k prefill and a window of the
                        steady offline run; `bench/trace_summary.py` turns them into a table
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run_all import sharegpt_like  # noqa: E402
from synth_ckpt import write_checkpoint  # noqa: E402

T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


class CallLog:
    """Wraps the runner's dispatch/collect to record each device call's batch shape and host times:
    host_ms (input building before the jitted call), dispatch_ms (the jitted call), wait_ms (collect
    blocked on the device)."""

    def __init__(self, core: Any) -> None:
        self.rows: list[dict[str, Any]] = []
        self.enabled = False
        self.on_call: Any = None
        runner = core.runner
        orig_dispatch, orig_collect = runner.dispatch, runner.collect
        orig_step, orig_dec = runner._step, runner._decode
        mark: dict[str, float] = {}
        rows_of: dict[int, dict[str, Any]] = {}

        def step_wrap(orig: Any) -> Any:
            def call(*a: Any) -> Any:
                mark["dispatch"] = time.perf_counter()
                r = orig(*a)
                mark["dispatched"] = time.perf_counter()
                return r
            return call

        def dispatch(seqs: Any, tables: Any, seeds: Any, num_decode_steps: int = 1) -> Any:
            if self.on_call is not None:
                self.on_call(len(self.rows))
            t0 = time.perf_counter()
            r = orig_dispatch(seqs, tables, seeds, num_decode_steps)
            if self.enabled:
                row = {
                    "seqs": len(seqs), "tokens": sum(s.num_new_tokens for s in seqs), "k": num_decode_steps,
                    "prefill_seqs": sum(1 for s in seqs if s.num_new_tokens > 1),
                    "host_ms": (mark["dispatch"] - t0) * 1e3,
                    "dispatch_ms": (mark["dispatched"] - mark["dispatch"]) * 1e3, "t": t0 - T0,
                }
                self.rows.append(row)
                rows_of[id(r)] = row
            return r

        def collect(f: Any) -> Any:
            t0 = time.perf_counter()
            r = orig_collect(f)
            row = rows_of.pop(id(f), None)
            if row is not None:
                row["wait_ms"] = (time.perf_counter() - t0) * 1e3
            return r

        runner.dispatch, runner.collect = dispatch, collect
        runner._step = step_wrap(orig_step)
        if orig_dec is not None:
            runner._decode = step_wrap(orig_dec)


def traced(out: Path, name: str, fn: Any) -> Any:
    """Runs fn under jax.profiler and copies the Perfetto trace to out/trace_<name>.json.gz."""
    import jax

    tmp = Path(f"/tmp/prof_{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    with jax.profiler.trace(str(tmp), create_perfetto_trace=True):
        r = fn()
    found = glob.glob(str(tmp / "**" / "perfetto_trace.json.gz"), recursive=True)
    if found:
        shutil.copy(found[0], out / f"trace_{name}.json.gz")
        log(f"trace {name}: {Path(found[0]).stat().st_size / 1e6:.1f} MB")
    else:
        log(f"trace {name}: no perfetto file under {tmp}")
    return r


def run_requests(llm: Any, prompts: list[tuple[list[int], int]]) -> tuple[float, int]:
    from rtp_jax import SamplingParams

    eng = llm.engine
    base = f"r{time.perf_counter_ns()}-"
    for i, (ids, n) in enumerate(prompts):
        eng.add_request(f"{base}{i}", {"prompt_token_ids": ids},
                        SamplingParams(max_tokens=n, ignore_eos=True))
    t0 = time.perf_counter()
    out_tokens = 0
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                out_tokens += len(o.outputs[0].token_ids)
    return time.perf_counter() - t0, out_tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt", default="/var/tmp/rtp_bench/llama3-8b")
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--window", default="150:170", help="device calls of the steady run to trace")
    p.add_argument("--skip", default="", help="comma list of: timed,single,offline")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--engine-kw", default="{}", help="extra LLM keyword arguments as JSON")
    ns = p.parse_args()
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, ns.skip.split(",")))
    tag = f"s{ns.max_num_seqs}_b{ns.max_num_batched_tokens}{ns.tag}"

    log(f"checkpoint {write_checkpoint(ns.ckpt, ns.shape, fsync=False)}")
    import jax

    from rtp_jax import LLM

    compile_s = [0.0]
    jax.monitoring.register_event_duration_secs_listener(
        lambda ev, d, **_: compile_s.__setitem__(0, compile_s[0] + d) if "backend_compile" in ev else None)
    kw = {"max_model_len": 4096, "max_num_seqs": ns.max_num_seqs,
          "max_num_batched_tokens": ns.max_num_batched_tokens, **json.loads(ns.engine_kw)}
    llm = LLM(ns.ckpt, **kw)
    core = llm.engine.core
    calls = CallLog(core)
    summary: dict[str, Any] = {"engine_kw": kw, "backend": core.attention_backend,
                               "num_blocks": core.num_blocks, "jax": jax.__version__,
                               "device": str(jax.devices()[0].device_kind)}
    rng = np.random.default_rng(1)
    hi = min(128000, core.config.model.vocab_size)

    if "timed" not in skip:  # untraced: decode bs1 (128 + 256 tokens) and TTFT of a 2k prompt, medians
        run_requests(llm, [(rng.integers(100, hi, 128).tolist(), 256)])
        runs = [run_requests(llm, [(rng.integers(100, hi, 128).tolist(), 256)]) for _ in range(2)]
        summary["decode_bs1_tok_s"] = statistics.median(n / w for w, n in runs)
        run_requests(llm, [(rng.integers(100, hi, 2048).tolist(), 1)])
        ttft = [run_requests(llm, [(rng.integers(100, hi, 2048).tolist(), 1)])[0] for _ in range(5)]
        summary["ttft_2k_ms"] = 1e3 * statistics.median(ttft)
        summary["ttft_2k_ms_all"] = [round(1e3 * t, 2) for t in ttft]
        log(f"timed: decode bs1 {summary['decode_bs1_tok_s']:.1f} tok/s (incl. prefill), "
            f"ttft 2k {summary['ttft_2k_ms']:.1f} ms")

    if "single" not in skip:
        run_requests(llm, [(rng.integers(100, hi, 128).tolist(), 64)])
        run_requests(llm, [(rng.integers(100, hi, 2048).tolist(), 1)])
        calls.enabled = True
        wall, n = traced(out, "decode_bs1",
                         lambda: run_requests(llm, [(rng.integers(100, hi, 128).tolist(), 64)]))
        summary["decode_bs1_tok_s_traced"] = n / wall
        summary["decode_bs1_calls"] = calls.rows[:]
        calls.rows.clear()
        wall, _ = traced(out, "prefill_2k",
                         lambda: run_requests(llm, [(rng.integers(100, hi, 2048).tolist(), 1)]))
        summary["prefill_2k_wall_ms_traced"] = wall * 1e3
        calls.enabled = False
        calls.rows.clear()
        log(f"single: {summary['decode_bs1_tok_s_traced']:.1f} tok/s (traced), "
            f"2k {wall * 1e3:.1f} ms (traced)")

    if "offline" not in skip:
        reqs = sharegpt_like(ns.num_requests, 0, hi)
        c0 = compile_s[0]
        wall, n = run_requests(llm, reqs)
        summary["offline_first"] = {"wall_s": wall, "compile_s": compile_s[0] - c0,
                                    "out_tok_s_excl": n / (wall - compile_s[0] + c0)}
        log(f"offline first: {wall:.1f} s, compile {compile_s[0] - c0:.1f} s, {n} tokens")
        core.kv.reset_prefix_cache()
        calls.enabled = True
        lo, hi = map(int, ns.window.split(":"))
        import jax.profiler as jp
        tmp = Path("/tmp/prof_offline")
        shutil.rmtree(tmp, ignore_errors=True)

        overhead = [0.0]

        def on_call(i: int) -> None:
            t0 = time.perf_counter()
            if i == lo:
                jp.start_trace(str(tmp), create_perfetto_trace=True)
            elif i == hi:
                jp.stop_trace()
            overhead[0] += time.perf_counter() - t0

        calls.on_call = on_call
        c0 = compile_s[0]
        wall, n = run_requests(llm, reqs)
        if len(calls.rows) < hi:
            jp.stop_trace()
        found = glob.glob(str(tmp / "**" / "perfetto_trace.json.gz"), recursive=True)
        if found:
            shutil.copy(found[0], out / f"trace_offline_{tag}.json.gz")
        rows = calls.rows
        traced_wall = rows[min(hi, len(rows) - 1)]["t"] - rows[lo]["t"] if len(rows) > lo else 0.0
        summary["offline_steady"] = {"wall_s": wall, "out_tok_s": n / wall, "compile_s": compile_s[0] - c0,
                                     "calls": len(rows), "traced_window_s": traced_wall,
                                     "out_tok_s_excl_trace_window": n / max(wall - traced_wall, 1e-9),
                                     "trace_start_stop_s": overhead[0],
                                     "out_tok_s_excl_trace_start_stop": n / (wall - overhead[0])}
        (out / f"calls_{tag}.json").write_text(json.dumps(rows))
        by: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            kind = "decode" if r["prefill_seqs"] == 0 else "mixed"
            by.setdefault(kind, []).append(r)
        for kind, rs in by.items():
            summary[f"offline_{kind}"] = {
                "calls": len(rs), "model_steps": sum(r["k"] for r in rs),
                "wait_s": sum(r.get("wait_ms", 0.0) for r in rs) / 1e3,
                "host_ms_median": statistics.median(r["host_ms"] for r in rs),
                "dispatch_ms_median": statistics.median(r["dispatch_ms"] for r in rs),
                "mean_seqs": statistics.mean(r["seqs"] for r in rs),
                "mean_tokens": statistics.mean(r["tokens"] for r in rs),
            }
        log(f"offline steady: {wall:.1f} s, {n / wall:.0f} out tok/s (trace window {traced_wall:.1f} s)")
    (out / f"summary_{tag}.json").write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps({k: v for k, v in summary.items() if k != "decode_bs1_calls"}, indent=1, default=str))


if __name__ == "__main__":
    main()
