"""Questions for the GPU, on the Llama-3-8B shape with random weights (no checkpoint to write).

    python3 bench/probe_programs.py --out $OUT [--parts ttft,gemm,offline] [--offline 1024x16384,512x8192]

ttft:    TTFT of a fresh 2048-token prompt with the fresh-prompt program (cuDNN attention) and the cuBLAS
         option of large step programs each on and off, in one engine.
gemm:    the engine's mixed-step program at T tokens (all-padding inputs: GEMMs and elementwise work,
         no attention), compiled with XLA's defaults (Triton GEMMs where its autotuner picks them) and
         with `xla_gpu_enable_triton_gemm=false` (cuBLAS for every GEMM), timed per call (median of
         repeats of ~30 ms of queued calls). Says above which T the prefill programs should use cuBLAS.
offline: the issue's offline workload (bench/run_all.py's `sharegpt_like`, 1000 requests) through an
         engine with max_num_seqs x max_num_batched_tokens as given, one child process per setting: a
         first run (XLA compiles inside) and a second, warm one. Prints output tokens/s of both; each
         child's output is streamed to offline_<setting>.log under --out.
Writes probe_programs.json under --out; prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from synth_ckpt import SHAPES, hf_config, write_tokenizer  # noqa: E402

CUBLAS = {"xla_gpu_enable_triton_gemm": False}


def model_dir(shape: str) -> str:
    d = Path(tempfile.mkdtemp(prefix="rtp_probe_"))
    (d / "config.json").write_text(json.dumps(hf_config(SHAPES[shape])))
    write_tokenizer(d, SHAPES[shape]["vocab_size"])
    return str(d)


def time_step(jitted: Any, runner: Any, t: int, flags: Any, trace_to: Path | None = None) -> float:
    """Seconds per call of one step program at T = t (one sequence slot bucket: min(t, 256)); with
    `trace_to`, also a Perfetto trace of 3 more calls there and its kernel summary beside it (.txt)."""
    import jax

    from rtp_jax.engine.packing import pack
    from rtp_jax.engine.sampler import build_sampling_tensors

    s = min(t, 256)
    inp = runner.dummy_inputs(t, s, runner.max_blocks_per_seq)
    st = build_sampling_tensors([], [], [], [], [], [], num_rows=s)
    ibuf, fbuf, spec = pack((inp, st))
    ibuf, fbuf = jax.device_put(ibuf), jax.device_put(fbuf)
    kv, last = runner.kv_caches, runner.last_tokens

    def calls(n: int) -> None:
        nonlocal kv, last
        out = None
        for _ in range(n):
            kv, last, out = jitted(runner.state_leaves, kv, last, ibuf, fbuf, spec, flags, 0)
        jax.block_until_ready(out.tokens)

    calls(1)  # compile
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < 0.3:
        calls(4)
        n += 4
    per = (time.perf_counter() - t0) / n
    reps = max(2, int(0.03 / per))
    times = []
    for _ in range(10):
        t1 = time.perf_counter()
        calls(reps)
        times.append((time.perf_counter() - t1) / reps)
    if trace_to is not None:  # a few more calls under jax.profiler, summarised by bench/trace_summary.py
        import glob
        import shutil

        from trace_summary import summarise

        tmp = Path(tempfile.mkdtemp(prefix="rtp_trace_"))
        with jax.profiler.trace(str(tmp), create_perfetto_trace=True):
            calls(3)
        found = glob.glob(str(tmp / "**" / "perfetto_trace.json.gz"), recursive=True)
        if found:
            shutil.copy(found[0], trace_to)
            Path(str(trace_to) + ".txt").write_text(summarise(str(trace_to), top=30))
    runner.kv_caches, runner.last_tokens = kv, last
    return statistics.median(times)


def part_gemm(shape: str, tokens: list[int], trace: set[int], out: Path) -> list[dict[str, Any]]:
    import jax

    from rtp_jax import LLM
    from rtp_jax.engine.sampler import SamplingFlags

    llm = LLM(model_dir(shape), load_format="dummy", max_model_len=4096, num_kv_blocks=1024,
              max_num_batched_tokens=max(tokens), max_num_seqs=min(256, max(tokens)))
    runner = llm.engine.core.runner
    fn = runner._step._fn
    variants = {"default": {}, "cublas": CUBLAS}
    rows = []
    for t in tokens:
        row: dict[str, Any] = {"tokens": t}
        for name, opts in variants.items():
            jitted = jax.jit(fn, static_argnums=(5, 6, 7), donate_argnums=(1, 2), compiler_options=opts)
            try:
                trace_to = out / f"trace_T{t}_{name}.json.gz" if t in trace else None
                row[f"{name}_us"] = time_step(jitted, runner, t, SamplingFlags(), trace_to) * 1e6
            except Exception as e:  # noqa: BLE001 - keep the other rows
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


_OFFLINE_CHILD = r"""
import json, sys, threading, time
sys.path.insert(0, sys.argv[1] + "/bench")
import jax
from run_all import run_steps, sharegpt_like
from rtp_jax import LLM
kw = json.loads(sys.argv[3])
compile_s = [0.0]
def listener(event, duration, **_):
    if "backend_compile" in event:
        compile_s[0] += duration
jax.monitoring.register_event_duration_secs_listener(listener)
t0 = time.perf_counter()
def progress():
    while True:
        time.sleep(20)
        print(f"PROGRESS {time.perf_counter() - t0:.0f} s, compile {compile_s[0]:.0f} s", flush=True)
threading.Thread(target=progress, daemon=True).start()
llm = LLM(sys.argv[2], load_format="dummy", max_model_len=4096, **kw)
res = {"engine_kwargs": kw, "build_s": time.perf_counter() - t0, "num_kv_blocks": llm.engine.core.num_blocks}
reqs = sharegpt_like(int(sys.argv[6]), 0, min(128000, int(sys.argv[5])))
n_in = sum(len(i) for i, _ in reqs)
for label in ("first", "warm"):
    llm.engine.core.kv.reset_prefix_cache()
    c0 = compile_s[0]
    end = t0 + float(sys.argv[4])  # the warm run, if it gets to run, needs ~35 s at most
    r = run_steps(llm, reqs, deadline=end - 35 if label == "first" else end)
    res[label] = {"wall_s": r["wall_s"], "compile_s": compile_s[0] - c0, "finished": r["finished"],
                  "output_tok_s": r["output_tokens"] / r["wall_s"],
                  "total_tok_s": (r["output_tokens"] + n_in) / r["wall_s"], "calls": len(r["steps"])}
    print("ROW " + json.dumps({label: res[label]}), flush=True)
print("CHILD " + json.dumps(res), flush=True)
"""


def part_offline(shape: str, settings: list[str], budget_s: float, num_requests: int,
                 out: Path) -> list[dict[str, Any]]:
    d = model_dir(shape)
    rows = []
    t_end = time.perf_counter() + budget_s
    for s in settings:
        seqs, toks = (int(x) for x in s.split("x"))
        left = t_end - time.perf_counter()
        if left < 60:
            rows.append({"setting": s, "skipped": "no time left"})
            continue
        kw = {"max_num_seqs": seqs, "max_num_batched_tokens": toks}
        log = out / f"offline_{s}.log"
        with open(log, "w") as f:  # streamed: a child cut short still leaves its rows
            p = subprocess.Popen([sys.executable, "-c", _OFFLINE_CHILD, str(ROOT), d, json.dumps(kw),
                                  str(left - 10), str(SHAPES[shape]["vocab_size"]),
                                  str(num_requests)], stdout=f, stderr=subprocess.STDOUT, text=True)
            try:
                p.wait(timeout=left)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        lines = log.read_text().splitlines()
        child = next((json.loads(ln[6:]) for ln in lines if ln.startswith("CHILD ")), None)
        got = [json.loads(ln[4:]) for ln in lines if ln.startswith("ROW ")]
        row = {"setting": s, **(child or {"partial": got, "tail": lines[-15:]})}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def part_ttft(shape: str, ckpt: str | None, num_kv_blocks: int | None,
              rounds: int = 4) -> list[dict[str, Any]]:
    """TTFT of a fresh 2048-token prompt on an idle engine, with the fresh-prompt program (cuDNN attention)
    and the cuBLAS option for large programs each switched on and off, in one process; the variants take
    turns (`rounds` rounds of 2 prompts each) so drifts hit them alike. Also the device time of the prefill
    program alone (its last call replayed 10 times back to back)."""
    import jax
    import numpy as np

    import rtp_jax.engine.step as step_mod
    from rtp_jax import LLM, SamplingParams

    if ckpt:
        from synth_ckpt import write_checkpoint

        write_checkpoint(ckpt, shape)
        llm = LLM(ckpt, max_model_len=4096, num_kv_blocks=num_kv_blocks)
    else:
        llm = LLM(model_dir(shape), load_format="dummy", max_model_len=4096, num_kv_blocks=num_kv_blocks)
    runner = llm.engine.core.runner
    step, fresh, options = runner._step, runner._fresh, step_mod.compiler_options
    captured: list[Any] = []

    def capture(fn: Any) -> Any:
        def call(*a: Any) -> Any:
            captured[:] = [fn, a]
            return fn(*a)
        return call

    rng = np.random.default_rng(0)
    vocab = min(128000, SHAPES[shape]["vocab_size"])
    variants = [(f, c) for f in (True, False) for c in (True, False)]
    times: dict[tuple[bool, bool], list[float]] = {v: [] for v in variants}
    device: dict[tuple[bool, bool], float] = {}

    def prompt() -> float:
        ids = rng.integers(100, vocab, 2048).tolist()
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, ignore_eos=True),
                     use_tqdm=False)
        return time.perf_counter() - t0

    def use(v: tuple[bool, bool]) -> None:
        runner._step = capture(step)
        runner._fresh = capture(fresh) if v[0] and fresh is not None else None
        step_mod.compiler_options = options if v[1] else (lambda t: {})

    for v in variants:  # compile every variant first
        use(v)
        prompt()
    for _ in range(rounds):
        for v in variants:
            use(v)
            times[v] += [prompt(), prompt()]
    for v in variants:
        use(v)
        prompt()
        fn, a = captured
        leaves, kv, last, *rest = a
        kv, last, out = fn(leaves, runner.kv_caches, runner.last_tokens, *rest)
        jax.block_until_ready(out.tokens)
        t0 = time.perf_counter()
        for _ in range(10):
            kv, last, out = fn(leaves, kv, last, *rest)
        jax.block_until_ready((kv, out.tokens))
        runner.kv_caches, runner.last_tokens = kv, last
        device[v] = (time.perf_counter() - t0) / 10
    runner._step, runner._fresh, step_mod.compiler_options = step, fresh, options
    rows = []
    for v in variants:
        row = {"fresh": v[0] and fresh is not None, "cublas": v[1],
               "ttft_ms": 1e3 * statistics.median(times[v]), "device_ms": 1e3 * device[v],
               "all_ms": [round(1e3 * t, 2) for t in times[v]]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--parts", default="gemm,offline")
    p.add_argument("--num-kv-blocks", type=int, default=2048, help="ttft: KV pool (0: from free memory)")
    p.add_argument("--ckpt", default=None, help="ttft: write/use this checkpoint (random weights otherwise)")
    p.add_argument("--tokens", default="128,256,512,1024,2048,4096")
    p.add_argument("--trace-tokens", default="", help="gemm: T values to trace too (e.g. 1,256)")
    p.add_argument("--offline", default="1024x16384,512x8192")
    p.add_argument("--offline-budget-s", type=float, default=400)
    p.add_argument("--num-requests", type=int, default=1000)
    ns = p.parse_args()
    parts = set(ns.parts.split(","))
    res: dict[str, Any] = {"git_sha": os.environ.get("RTP_GIT_SHA", ""), "shape": ns.shape}
    Path(ns.out).mkdir(parents=True, exist_ok=True)
    # Offline first: its children need the whole GPU, and this process holds its memory once it uses it.
    if "offline" in parts:
        res["offline"] = part_offline(ns.shape, ns.offline.split(","), ns.offline_budget_s, ns.num_requests,
                                      Path(ns.out))
    if "ttft" in parts:
        res["ttft"] = part_ttft(ns.shape, ns.ckpt, ns.num_kv_blocks or None)
    if "gemm" in parts:
        trace = {int(t) for t in ns.trace_tokens.split(",") if t}
        res["gemm"] = part_gemm(ns.shape, [int(t) for t in ns.tokens.split(",")], trace, Path(ns.out))
    (Path(ns.out) / "probe_programs.json").write_text(json.dumps(res, indent=1))
    print("\n| fresh-prompt program | cuBLAS GEMMs >= 1024 tokens | TTFT 2k ms | device ms |")
    print("|---|---|---|---|")
    for r in res.get("ttft", []):
        print(f"| {r['fresh']} | {r['cublas']} | {r['ttft_ms']:.1f} | {r['device_ms']:.1f} |")
    print("\n| T | default us | cuBLAS us |\n|---|---|---|")
    for r in res.get("gemm", []):
        nan = float("nan")
        print(f"| {r['tokens']} | {r.get('default_us', nan):.0f} | {r.get('cublas_us', nan):.0f} |")
    print("\n| max_num_seqs x tokens | first out tok/s (compile s) | warm out tok/s | warm total tok/s |")
    print("|---|---|---|---|")
    for r in res.get("offline", []):
        f, w = r.get("first", {}), r.get("warm", {})
        print(f"| {r['setting']} | {f.get('output_tok_s', 0):.0f} ({f.get('compile_s', 0):.0f}) | "
              f"{w.get('output_tok_s', 0):.0f} | {w.get('total_tok_s', 0):.0f} |")


if __name__ == "__main__":
    main()
