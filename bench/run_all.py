"""The GPU benchmark suite in one run: checkpoint, start-up, loading, copy bandwidth, decode, TTFT, offline.

    RTP_GIT_SHA=$(git rev-parse HEAD) python3 bench/run_all.py --out bench/results [--ckpt /var/tmp/l3]

Writes `decode.json` / `decode.md` and `load.json` / `load.md` under --out (after every section, so a run
cut short still leaves what it measured) and prints a short table last. Sections, in order:
  1. a Llama-3-8B-shape random bf16 HF checkpoint on local disk (bench/synth_ckpt.py; kept if present)
  2. start-up: time to first request served, in fresh processes, persistent compilation cache empty then
     warm (before this process touches the GPU, so the children get the whole device)
  3. loading: `rtp-jax bench load` (cold disk with parallel readers, fast loader cold and warm, naive)
  4. device copy bandwidth (x + 1 over 2 GiB of bf16: bytes read + written)
  5. decode at batch 1: 256 new tokens after a 128-token prompt, step by step, with host and device time
     per step (device time from replaying the captured decode step) and the roofline
  6. TTFT of a 2048-token prompt on the idle engine (fresh random prompts: no prefix-cache hits)
  7. offline throughput: 1000 seeded ShareGPT-like requests submitted at once, ignore_eos, twice in one
     process: `offline_output_tok_s` / `offline_total_tok_s` are the second run's (programs compiled,
     prefix cache reset: the steady state), `offline_first_*` the first run's with its XLA compile time
Smaller shapes (--shape small) run the same code on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from synth_ckpt import write_checkpoint  # noqa: E402

T0 = time.perf_counter()
LOG: list[str] = []


def log(msg: str) -> None:
    line = f"[{time.perf_counter() - T0:7.1f}s] {msg}"
    LOG.append(line)
    print(line, flush=True)


def remaining(ns: argparse.Namespace) -> float:
    return ns.deadline_s - (time.perf_counter() - T0)


# ---- workloads -----------------------------------------------------------------------------------
def sharegpt_like(n: int = 1000, seed: int = 0, vocab: int = 128000) -> list[tuple[list[int], int]]:
    """The seeded offline workload: (prompt token ids, output length) per request."""
    rng = np.random.default_rng(seed)
    ins = np.clip(rng.lognormal(np.log(170), 0.75, n), 4, 1024).astype(int)
    outs = np.clip(rng.lognormal(np.log(140), 0.8, n), 4, 1024).astype(int)
    reqs = []
    for i in range(n):
        ids = rng.integers(100, vocab, int(ins[i])).tolist()
        reqs.append((ids, int(outs[i])))
    return reqs


# ---- start-up in a fresh process -----------------------------------------------------------------
_CHILD = r"""
import json, logging, re, sys, time
t0 = time.perf_counter()
import jax

class Phases(logging.Handler):
    # jax_log_compiles lines: per program, seconds spent tracing, lowering to MLIR and in XLA (or
    # loading from the persistent cache), plus the cache hits, so a slow start-up names its phase.
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.s = {"tracing": 0.0, "lowering": 0.0, "xla": 0.0, "programs": [], "cache_hits": 0}

    def emit(self, record):
        msg = record.getMessage()
        m = re.search(r"Finished (tracing(?: \+ transforming)?|jaxpr to MLIR module conversion"
                      r"|XLA compilation)"
                      r" (?:of )?(\S+) .*?in ([0-9.]+) sec", msg)
        if m:
            phase = {"t": "tracing", "j": "lowering", "X": "xla"}[m.group(1)[0]]
            self.s[phase] += float(m.group(3))
            if phase == "xla" and float(m.group(3)) > 0.05:
                self.s["programs"].append([m.group(2), round(float(m.group(3)), 2)])
        elif "Persistent compilation cache hit" in msg:
            self.s["cache_hits"] += 1

phases = Phases()
for name in ("jax._src.dispatch", "jax._src.interpreters.pxla", "jax._src.compiler", "jax._src.pjit"):
    lg = logging.getLogger(name)
    lg.addHandler(phases)
    lg.setLevel(logging.DEBUG)
    lg.propagate = False
jax.config.update("jax_log_compiles", True)
cache = sys.argv[2]
if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    try:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    except Exception:
        pass
from rtp_jax import SamplingParams
from rtp_jax import LLM
t1 = time.perf_counter()
llm = LLM(sys.argv[1], **json.loads(sys.argv[3]))
t2 = time.perf_counter()
import os, threading
threads = sorted(t.name for t in threading.enumerate())
cpu0 = os.times()
ids = list(range(100, 228))
params = SamplingParams(max_tokens=16, ignore_eos=True)
out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
t3 = time.perf_counter()
cpu1 = os.times()
print("CHILD " + json.dumps({"import_s": t1 - t0, "build_s": t2 - t1, "first_request_s": t3 - t2,
                             "first_request_cpu_s": cpu1.user + cpu1.system - cpu0.user - cpu0.system,
                             "threads_after_build": threads,
                             "backend": llm.engine.core.attention_backend,
                             "num_kv_blocks": llm.engine.core.num_blocks,
                             "memory_plan": llm.engine.core.memory_plan,
                             "n": len(out[0].outputs[0].token_ids),
                             "tokens": list(out[0].outputs[0].token_ids), "compile": phases.s}))
"""


def startup(ns: argparse.Namespace, res: dict[str, Any], engine_kw: dict[str, Any]) -> None:
    cache = Path(ns.cache_dir)
    subprocess.run(["rm", "-rf", str(cache)], check=False)
    cache.mkdir(parents=True, exist_ok=True)
    for label in ("cold", "warm"):
        if remaining(ns) < 150:
            log(f"startup {label}: skipped (time)")
            return
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-c", _CHILD, ns.ckpt, str(cache), json.dumps(engine_kw)],
                           capture_output=True, text=True, timeout=max(60, remaining(ns) - 60))
        wall = time.perf_counter() - t0
        child = next((json.loads(ln[6:]) for ln in p.stdout.splitlines() if ln.startswith("CHILD ")), None)
        if p.returncode != 0 or child is None:
            log(f"startup {label} failed rc={p.returncode}: {p.stderr[-2000:]}")
            res[f"startup_{label}_error"] = p.stderr[-500:]
            return
        res[f"startup_{label}_cache_s"] = wall
        res[f"startup_{label}_detail"] = child
        log(f"startup with {label} compilation cache: {wall:.1f} s to first request served ({child})")
    res["compilation_cache_MB"] = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 1e6


# ---- device measurements -------------------------------------------------------------------------
def copy_bandwidth() -> float:
    """Device memory bandwidth in TB/s (bytes read + written): 20 passes of `x + 1` over 2 GiB of fp32
    inside one program, so launch and host latency stay out of the figure; median of 7. (fp32: XLA's
    bf16 elementwise kernels read slower, 3.25 vs 4.07 TB/s on an H200 whose D2D copy moved 4.21.)"""
    import jax
    import jax.numpy as jnp

    passes = 20
    x = jnp.ones((1 << 29,), jnp.float32)  # 2 GiB
    f = jax.jit(lambda a: jax.lax.fori_loop(0, passes, lambda i, v: v + 1.0, a), donate_argnums=0)
    x = f(x).block_until_ready()
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        x = f(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    bw = passes * 2 * x.nbytes / statistics.median(times) / 1e12
    del x
    return bw


class StepTimers:
    """Wraps the runner's pieces (no engine edits) to time host work per step."""

    def __init__(self, llm: Any) -> None:
        import rtp_jax.engine.runner as runner_mod

        self.llm = llm
        self.runner = llm.engine.core.runner
        self.t: dict[str, list[float]] = {"build_inputs": [], "sampling_tensors": [], "dispatch": []}
        self.last: tuple[Any, ...] | None = None
        self.widest: tuple[Any, ...] | None = None  # the multi-step decode call of the most model steps
        runner, timers = self.runner, self

        orig_build = runner.build_inputs
        orig_bst = runner_mod.build_sampling_tensors
        orig_step = runner._step

        def build_inputs(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            r = orig_build(*a, **k)
            timers.t["build_inputs"].append(time.perf_counter() - t0)
            return r

        def bst(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            r = orig_bst(*a, **k)
            timers.t["sampling_tensors"].append(time.perf_counter() - t0)
            return r

        def wrap(orig: Any) -> Any:
            def call(state: Any, kv: Any, last: Any, inp: Any, st: Any, flags: Any, arg: Any) -> Any:
                t0 = time.perf_counter()
                r = orig(state, kv, last, inp, st, flags, arg)
                timers.t["dispatch"].append(time.perf_counter() - t0)
                timers.last = (orig, inp, st, flags, arg)
                widest = timers.widest
                if orig is timers._orig_decode and (widest is None or int(arg) >= int(widest[-1])):
                    timers.widest = timers.last
                return r
            return call

        runner.build_inputs = build_inputs
        runner_mod.build_sampling_tensors = bst
        runner._step = wrap(orig_step)
        self._orig_decode = runner._decode  # replayed calls of it count K model steps
        if runner._decode is not None:  # multi-step decode: K model steps per call
            runner._decode = wrap(runner._decode)
        if runner._fresh is not None:  # a prompt alone in its step, from position 0
            runner._fresh = wrap(runner._fresh)
        core, eng = llm.engine.core, llm.engine
        for obj, attr, key in ((core.scheduler, "schedule", "schedule"), (core, "_process", "core_process"),
                               (runner, "dispatch", "runner_dispatch"), (runner, "collect", "collect_wait"),
                               (core, "step", "core_step"),
                               (eng, "step", "engine_step")):
            self.t[key] = []
            setattr(obj, attr, self._timed(getattr(obj, attr), key))
        self._orig = (orig_build, orig_bst, orig_step, runner_mod)

    def _timed(self, fn: Any, key: str) -> Any:
        def call(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            r = fn(*a, **k)
            self.t[key].append(time.perf_counter() - t0)
            return r

        return call

    def reset(self) -> None:
        for v in self.t.values():
            v.clear()
        self.widest = None

    def replay_device_ms(self, n: int = 30, decode: bool = False) -> float:
        """Mean device time per model step of the last captured call (with `decode`: of the multi-step
        decode call of the most steps, the one a long generation runs most), replayed back to back (a
        K-step decode call counts K model steps). The last call of a generation is its tail, often a
        1-step call whose fixed costs are not spread over K steps."""
        import jax

        runner = self.runner
        fn, inp, st, flags, arg = self.widest if decode and self.widest is not None else self.last
        steps_per_call = int(arg) if fn is self._orig_decode else 1
        kv, last = runner.kv_caches, runner.last_tokens
        kv, last, out = fn(runner.state_leaves, kv, last, inp, st, flags, arg)
        jax.block_until_ready(out.tokens)
        t0 = time.perf_counter()
        for _ in range(n):
            kv, last, out = fn(runner.state_leaves, kv, last, inp, st, flags, arg)
        jax.block_until_ready((kv, out.tokens))
        runner.kv_caches, runner.last_tokens = kv, last
        return (time.perf_counter() - t0) / n / steps_per_call * 1e3


def run_steps(llm: Any, prompts: list[tuple[list[int], int]], deadline: float | None = None
              ) -> dict[str, Any]:
    """Adds every request, then steps the engine as LLM.generate does, timing each step."""
    from rtp_jax import SamplingParams

    eng = llm.engine
    base = f"r{time.perf_counter_ns()}-"
    for i, (ids, n) in enumerate(prompts):
        eng.add_request(f"{base}{i}", {"prompt_token_ids": ids},
                        SamplingParams(max_tokens=n, ignore_eos=True))
    steps: list[tuple[float, int]] = []  # (seconds, tokens produced)
    first_token: float | None = None
    out_tokens = 0
    done = 0
    t0 = time.perf_counter()
    while eng.has_unfinished_requests():
        s0 = time.perf_counter()
        before = eng.core.num_steps
        outs = eng.step()
        dt = time.perf_counter() - s0
        steps.append((dt, eng.core.num_steps - before))  # model steps: K for a multi-step decode call
        for o in outs:
            if o.finished:
                done += 1
                out_tokens += len(o.outputs[0].token_ids)
        if first_token is None and eng.core.num_steps > before:
            first_token = time.perf_counter() - t0
        if deadline is not None and time.perf_counter() > deadline:
            for i in range(len(prompts)):
                eng.abort_request(f"{base}{i}")
            break
    return {"wall_s": time.perf_counter() - t0, "steps": steps, "first_step_s": first_token,
            "finished": done, "output_tokens": out_tokens}


def weight_bytes(llm: Any) -> tuple[int, int]:
    import jax

    state = llm.engine.core.runner.state
    total = sum(x.nbytes for x in jax.tree.leaves(state))
    from flax import nnx

    embed = nnx.to_pure_dict(state)["model"]["embed_tokens"]["weight"].nbytes
    return total, embed


def engine_benches(ns: argparse.Namespace, res: dict[str, Any], engine_kw: dict[str, Any], save: Any) -> None:
    import jax

    from rtp_jax import LLM, SamplingParams

    compile_s = [0.0]

    def listener(event: str, duration: float, **_: Any) -> None:
        if "backend_compile" in event:
            compile_s[0] += duration

    jax.monitoring.register_event_duration_secs_listener(listener)
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    llm = LLM(ns.ckpt, **engine_kw)
    res["engine_build_s"] = time.perf_counter() - t0
    hi = min(128000, llm.engine.core.config.model.vocab_size)
    try:
        c0 = compile_s[0]
        t1 = time.perf_counter()
        llm.generate([{"prompt_token_ids": rng.integers(100, hi, 16).tolist()}],
                     SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
        log(f"first tiny request: {time.perf_counter() - t1:.1f} s (compile {compile_s[0] - c0:.1f} s)")
    except Exception as e:  # noqa: BLE001 - the Pallas kernel may not run yet: fall back
        log(f"backend {llm.engine.core.attention_backend} failed ({type(e).__name__}: {str(e)[:300]}); "
            f"falling back to the reference attention")
        res["attention_fallback_reason"] = f"{type(e).__name__}: {str(e)[:300]}"
        del llm
        llm = LLM(ns.ckpt, **{**engine_kw, "attention_backend": "reference"})
    res["attention_backend"] = llm.engine.core.attention_backend
    res["num_kv_blocks"] = int(llm.engine.core.num_blocks)
    total_w, embed_w = weight_bytes(llm)
    res["weight_bytes"] = total_w
    timers = StepTimers(llm)
    m = llm.engine.core.config.model

    # ---- decode bs1
    if remaining(ns) > 120:
        prompt_len, new = 128, 256
        runs = []
        for rep in range(1 + ns.decode_repeats):
            c0 = compile_s[0]
            timers.reset()
            r = run_steps(llm, [(rng.integers(100, hi, prompt_len).tolist(), new)])
            dec = r["steps"][1:]  # after the prefill call; each entry (seconds, model steps)
            tok_s = sum(k for _, k in dec) / sum(t for t, _ in dec)
            dec = [t / max(k, 1) for t, k in dec]  # seconds per model step
            log(f"decode bs1 run {rep}: {tok_s:.1f} tok/s "
                f"(median step {statistics.median(dec) * 1e3:.2f} ms, "
                f"compile {compile_s[0] - c0:.1f} s){' [warm-up]' if rep == 0 else ''}")
            if rep > 0:
                runs.append((tok_s, statistics.median(dec), dict(timers.t)))
        tok_s, med_step, t = sorted(runs)[len(runs) // 2]
        dev_ms = timers.replay_device_ms(decode=True)
        kv_bytes = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 2 * (prompt_len + new // 2)
        step_bytes = total_w - embed_w + kv_bytes
        res.update({
            "decode_bs1_tok_s": tok_s, "decode_bs1_step_ms_median": med_step * 1e3,
            "decode_bs1_device_step_ms": dev_ms,
            "decode_bs1_host_ms_per_step": {k: 1e3 * statistics.median(v) for k, v in t.items() if v},
            "decode_bs1_host_overhead_ms": med_step * 1e3 - dev_ms,
            "decode_bytes_per_step": step_bytes,
            "decode_device_TBps": step_bytes / dev_ms / 1e9,
        })
        save()
    # ---- copy bandwidth
    res["copy_bw_TBps"] = copy_bandwidth()
    if "decode_bytes_per_step" in res:
        res["roofline_bs1_tok_s"] = res["copy_bw_TBps"] * 1e12 / res["decode_bytes_per_step"]
        log(f"copy bw {res['copy_bw_TBps']:.2f} TB/s; roofline {res['roofline_bs1_tok_s']:.1f} tok/s; "
            f"device step {res['decode_bs1_device_step_ms']:.2f} ms "
            f"vs wall {res['decode_bs1_step_ms_median']:.2f}")
    save()

    # ---- TTFT 2k
    if remaining(ns) > 90:
        ttfts = []
        for rep in range(1 + ns.ttft_repeats):
            ids = rng.integers(100, hi, 2048).tolist()
            t0 = time.perf_counter()
            llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, ignore_eos=True),
                         use_tqdm=False)
            dt = time.perf_counter() - t0
            if rep > 0:
                ttfts.append(dt)
            log(f"ttft 2k run {rep}: {dt * 1e3:.1f} ms{' [warm-up]' if rep == 0 else ''}")
        timers.reset()
        r = run_steps(llm, [(rng.integers(100, hi, 2048).tolist(), 1)])
        res["ttft_2k_ms"] = 1e3 * statistics.median(ttfts)
        res["ttft_2k_ms_all"] = [round(x * 1e3, 2) for x in ttfts]
        res["ttft_2k_device_ms"] = timers.replay_device_ms(n=5)
        save()

    # ---- offline
    if remaining(ns) > 60:
        reqs = sharegpt_like(ns.num_requests, 0, min(128000, m.vocab_size))
        res["offline_num_requests"] = len(reqs)
        res["offline_mean_in"] = float(np.mean([len(i) for i, _ in reqs]))
        res["offline_mean_out"] = float(np.mean([n for _, n in reqs]))
        c0 = compile_s[0]
        timers.reset()
        r = run_steps(llm, reqs, deadline=T0 + ns.deadline_s - 20)
        comp = compile_s[0] - c0
        n_in = sum(len(i) for i, _ in reqs[: r["finished"]])  # approximate when cut short
        complete = r["finished"] == len(reqs)
        wall = r["wall_s"]
        res.update({
            "offline_complete": complete, "offline_finished": r["finished"], "offline_wall_s": wall,
            "offline_compile_s": comp, "offline_steps": len(r["steps"]),
            "offline_first_output_tok_s_incl_compile": r["output_tokens"] / wall,
            "offline_first_output_tok_s": r["output_tokens"] / (wall - comp),
            "offline_first_total_tok_s": (r["output_tokens"] + n_in) / (wall - comp),
            # Replaced by the second run's figures below when it completes (the steady state, as a peer's
            # engine runs after its start-up compilation and graph capture).
            "offline_output_tok_s": r["output_tokens"] / (wall - comp),
            "offline_total_tok_s": (r["output_tokens"] + n_in) / (wall - comp),
            "offline_output_run": "first in the process (XLA backend compile excluded; tracing not)",
            "offline_host_ms_per_step": {k: 1e3 * statistics.mean(v) for k, v in timers.t.items() if v},
            "offline_step_ms_mean": 1e3 * (wall - comp) / max(1, len(r["steps"])),
            "offline_device_calls": len(r["steps"]),
            "offline_model_steps": sum(k for _, k in r["steps"]),
        })
        log(f"offline: {r['finished']}/{len(reqs)} requests, {r['output_tokens']} output tokens "
            f"in {wall:.1f} s "
            f"(of which XLA compile {comp:.1f} s, {len(r['steps'])} steps): "
            f"{res['offline_first_output_tok_s']:.0f} out tok/s excl. compile, "
            f"{res['offline_first_output_tok_s_incl_compile']:.0f} incl.")
        save()
        # The same workload again in the same process: every program is compiled now, so this is the
        # steady state. The prefix cache is emptied first so the repeated prompts are not reused.
        if remaining(ns) > 80 and complete:
            llm.engine.core.kv.reset_prefix_cache()
            c0 = compile_s[0]
            r = run_steps(llm, reqs, deadline=T0 + ns.deadline_s - 10)
            if r["finished"] == len(reqs):
                n_in = sum(len(i) for i, _ in reqs)
                res.update({
                    "offline_warm_wall_s": r["wall_s"], "offline_warm_compile_s": compile_s[0] - c0,
                    "offline_output_tok_s": r["output_tokens"] / r["wall_s"],
                    "offline_total_tok_s": (r["output_tokens"] + n_in) / r["wall_s"],
                    "offline_output_run": "second in the process (programs compiled, prefix cache reset)",
                })
                log(f"offline again (compiled, prefix cache reset): {r['wall_s']:.1f} s, "
                    f"{res['offline_output_tok_s']:.0f} out tok/s, "
                    f"compile {res['offline_warm_compile_s']:.1f} s")
            save()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "bench" / "results")))
    p.add_argument("--ckpt", default="/var/tmp/rtp_bench/llama3-8b")
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--cache-dir", default="/var/tmp/rtp_bench/jax_cache")
    p.add_argument("--deadline-s", type=float, default=560)
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--decode-repeats", type=int, default=2)
    p.add_argument("--ttft-repeats", type=int, default=5)
    p.add_argument("--load-repeats", type=int, default=5)
    p.add_argument("--cold-repeats", type=int, default=2,
                   help="alternating (disk read, cold load) pairs in the load bench; medians compared")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--skip", default="", help="comma list of: startup,load,engine")
    ns = p.parse_args()
    skip = set(filter(None, ns.skip.split(",")))
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    engine_kw: dict[str, Any] = {"max_model_len": ns.max_model_len}
    if ns.num_kv_blocks:
        engine_kw["num_kv_blocks"] = ns.num_kv_blocks

    from rtp_jax.bench_cli import run_info, write_report

    command = " ".join([Path(sys.executable).name, *sys.argv])
    dec: dict[str, Any] = {"shape": ns.shape, "engine_kwargs": engine_kw}
    load: dict[str, Any] = {}
    notes = ["TTFT at 8 req/s through `rtp-jax bench serve` not run in this suite (needs the HTTP server "
             "and its wheels on the GPU machine)."]

    def save() -> None:
        info = run_info(command)
        write_report({**dec, **info, "log": LOG[-40:]}, out / "decode.json", out / "decode.md",
                     "rtp-jax decode / throughput benchmarks", notes)
        if load:
            write_report({**load, **info}, out / "load.json", out / "load.md", "rtp-jax load benchmark",
                         [f"page cache dropped with: {load.get('cache_drop')}"])

    log(f"writing checkpoint {ns.ckpt} ({ns.shape})")
    info = write_checkpoint(ns.ckpt, ns.shape)
    dec["checkpoint"] = info
    log(f"checkpoint: {info}")
    subprocess.run(["df", "-h", ns.ckpt], check=False)
    if "startup" not in skip:
        startup(ns, dec, engine_kw)
        save()
    if "load" not in skip:
        from rtp_jax.bench_cli import run_load_bench

        load.update(run_load_bench(ns.ckpt, repeats=ns.load_repeats, log=log, variants=True,
                                   cold_repeats=ns.cold_repeats))
        save()
    if "engine" not in skip:
        try:
            engine_benches(ns, dec, engine_kw, save)
        except Exception as e:  # noqa: BLE001 - keep what was measured
            import traceback

            log(f"engine benches failed: {type(e).__name__}: {e}")
            dec["engine_error"] = traceback.format_exc()[-3000:]
    save()
    keys = ("decode_bs1_tok_s", "roofline_bs1_tok_s", "copy_bw_TBps", "decode_bs1_device_step_ms",
            "decode_bs1_step_ms_median", "ttft_2k_ms", "offline_output_tok_s", "offline_total_tok_s",
            "offline_output_run", "offline_first_output_tok_s_incl_compile", "offline_compile_s",
            "startup_cold_cache_s",
            "startup_warm_cache_s", "attention_backend")
    lkeys = ("bytes", "disk_read_GBps", "disk_read_s", "load_s", "cold_vs_disk", "warm_load_s",
             "warm_first_load_s", "warm_steady_load_s", "naive_load_s", "peak_host_rss_GB", "cache_drop",
             "variants")
    print("\n| metric | value |\n|---|---|")
    for k in keys:
        if k in dec:
            print(f"| {k} | {dec[k]:.4g} |" if isinstance(dec[k], float) else f"| {k} | {dec[k]} |")
    for k in lkeys:
        if k in load:
            v = load[k]
            print(f"| load.{k} | {v:.4g} |" if isinstance(v, float) else f"| load.{k} | {v} |")


if __name__ == "__main__":
    main()
