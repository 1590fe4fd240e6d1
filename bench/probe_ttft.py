"""Where the host's share of the 2k-token TTFT goes: TTFT as run_all measures it, in variants that take
turns in one process, with the engine's phases timed per request.

    python3 bench/probe_ttft.py --out $OUT --ckpt /var/tmp/llama3-8b [--rounds 8] [--variants base,nogc]

The engine is run_all's (`LLM(ckpt, max_model_len=4096)`, written checkpoint). A 2k trace (2026-12-02,
bench/notes_bench.md) showed ~41 ms of device compute inside ~49 ms of TTFT: ~4.9 ms of host work before
the first kernel and ~2.4 ms between the last kernel and the host seeing the token (1.8 ms of it after the
token's copy had landed). Variants (diagnostics, not engine options):
  base       the engine as it is
  nogc       Python's cyclic GC disabled during the request (does a collection land in the wait?)
  freeze     every object alive before the request moved out of the GC's reach (`gc.freeze()`), as
             vLLM does after start-up
  early_d2h  the sampled tokens' device-to-host copy queued right after the launch
             (`copy_to_host_async`), not when the host asks for them
  collect    a full collection (`gc.collect()`) just before the request, nothing frozen
  freeze_only `gc.freeze()` without the collection first
  nohash     the prefix cache's block hashing of the prompt skipped (its cost alone; not a fix)
  no_cmdbuf  programs of >= 1024 tokens compiled without XLA's command buffers (CUDA graphs): the 2k
             trace showed a 2.1 ms `cuGraphLaunch` before the first kernel; kernel by kernel, the first one
             starts at once and the launches run ahead of ~42 ms of device work
  spin_wait  the host polls the sampled tokens' readiness (`is_ready`, yielding between polls) before
             reading them, instead of blocking in the read: the 2k trace showed Python resuming 1.8 ms after
             the token's copy had landed
  eager_hash the prompt's blocks hashed inside schedule(), before the launch (as before 8c66816), instead of
             right after it (`KVCacheManager.defer_hashing`, the engine's default)
  A+B        both
With --name-garbage, what each `collect` run's collection frees is recorded (types, jax.Array shapes).
Prints a table of medians last; details in probe_ttft.json under --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PHASES = ("schedule", "dispatch", "collect", "process", "gc")


def time_gc(marks: dict[str, float], counts: list[int]) -> None:
    """Adds the seconds of every cyclic-GC pass to marks["gc"] and counts passes per generation."""
    started: list[float] = []

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            marks["gc"] = marks.get("gc", 0.0) + time.perf_counter() - started.pop()
            counts[info["generation"]] += 1

    gc.callbacks.append(callback)


def instrument(llm: Any, marks: dict[str, float]) -> None:
    """Adds each phase's seconds of the engine's steps to `marks`."""
    core = llm.engine.core
    for obj, attr, key in ((core.scheduler, "schedule", "schedule"), (core.runner, "dispatch", "dispatch"),
                           (core.runner, "collect", "collect"), (core, "_process", "process")):
        fn = getattr(obj, attr)

        def timed(*a: Any, _fn: Any = fn, _key: str = key, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                marks[_key] = marks.get(_key, 0.0) + time.perf_counter() - t0

        setattr(obj, attr, timed)


def toggles(llm: Any) -> dict[str, tuple[Any, Any]]:
    """variant part -> (switch on, switch off)."""
    runner = llm.engine.core.runner
    kv = llm.engine.core.kv
    dispatch = runner.dispatch
    cache_full = kv._cache_full_blocks

    def early(*a: Any, **k: Any) -> Any:
        f = dispatch(*a, **k)
        f.tokens.copy_to_host_async()
        return f

    def set_dispatch(fn: Any) -> Any:
        return lambda: setattr(runner, "dispatch", fn)

    collect = runner.collect

    def spin(f: Any) -> Any:
        while not f.tokens.is_ready():  # poll (yielding the GIL) instead of blocking in the copy
            time.sleep(0)
        return collect(f)

    import rtp_jax.engine.step as step_mod

    default_options = step_mod.compiler_options

    def no_command_buffers(num_tokens: int) -> dict[str, Any]:
        opts = default_options(num_tokens)
        return {**opts, "xla_gpu_enable_command_buffer": ""} if num_tokens >= 1024 else opts

    def set_options(fn: Any) -> Any:
        return lambda: setattr(step_mod, "compiler_options", fn)

    return {
        "base": (lambda: None, lambda: None),
        "nogc": (gc.disable, gc.enable),
        "freeze": (lambda: (gc.collect(), gc.freeze()), gc.unfreeze),
        "collect": (gc.collect, lambda: None),
        "freeze_only": (gc.freeze, gc.unfreeze),
        "early_d2h": (set_dispatch(early), set_dispatch(dispatch)),
        "nohash": (lambda: setattr(kv, "_cache_full_blocks", lambda *a, **k: None),
                   lambda: setattr(kv, "_cache_full_blocks", cache_full)),
        "no_cmdbuf": (set_options(no_command_buffers), set_options(default_options)),
        "spin_wait": (lambda: setattr(runner, "collect", spin), lambda: setattr(runner, "collect", collect)),
        "eager_hash": (lambda: setattr(kv, "defer_hashing", False),
                       lambda: setattr(kv, "defer_hashing", True)),
    }


def name_garbage() -> dict[str, Any]:
    """What a full collection would free now: object counts by type (top 20) and the shapes of the jax.Arrays
    among them; the objects themselves are released again."""
    import collections

    import jax

    flags = gc.get_debug()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        found = list(gc.garbage)
    finally:
        gc.set_debug(flags)
        gc.garbage.clear()
    kinds = collections.Counter(type(o).__name__ for o in found)
    arrays = [o for o in found if isinstance(o, jax.Array)]
    out = {"objects": len(found), "types": kinds.most_common(20), "arrays": len(arrays),
           "array_bytes": sum(a.nbytes for a in arrays),
           "array_shapes": [f"{a.shape} {a.dtype}" for a in arrays[:20]]}
    del found, arrays
    gc.collect()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--variants", default="base,nogc,freeze,collect,freeze_only,nohash")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--name-garbage", action="store_true",
                    help="record what each `collect` run's collection frees (types, jax.Array shapes)")
    args = ap.parse_args()
    from rtp_jax import LLM, SamplingParams

    llm = LLM(args.ckpt, max_model_len=args.max_model_len)
    hi = min(128000, llm.engine.core.config.model.vocab_size)
    rng = np.random.default_rng(1)
    params = SamplingParams(max_tokens=1, ignore_eos=True)

    def ttft() -> float:
        ids = rng.integers(100, hi, 2048).tolist()
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
        return time.perf_counter() - t0

    for _ in range(3):  # compiles the programs
        ttft()
    # The phases are wrapped once, before the variants capture (and wrap) the runner's methods.
    marks: dict[str, float] = {}
    instrument(llm, marks)
    counts = [0, 0, 0]
    time_gc(marks, counts)
    switches = toggles(llm)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        for part in v.split("+"):
            if part not in switches:
                raise SystemExit(f"unknown variant part {part!r}; known: {sorted(switches)}")
    for v in variants:  # each variant once unmeasured: one that compiles its own programs does it here
        parts = v.split("+")
        for p in parts:
            switches[p][0]()
        try:
            ttft()
        finally:
            for p in reversed(parts):
                switches[p][1]()
    res: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    garbage: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            parts = v.split("+")
            if args.name_garbage and "collect" in parts:
                garbage.append(name_garbage())
            for p in parts:
                switches[p][0]()
            marks.clear()
            counts[:] = [0, 0, 0]
            try:
                s = ttft()
            finally:
                for p in reversed(parts):
                    switches[p][1]()
            res[v].append({"ttft_s": s, **{k: marks.get(k, 0.0) for k in PHASES},
                           "gc_passes": list(counts), "gc_objects": len(gc.get_objects())})
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "probe_ttft.json").write_text(json.dumps({**res, "garbage": garbage}, indent=1))
    print(f"| variant | TTFT ms (median) | all | {' | '.join(PHASES)} (ms, medians) | GC passes per "
          "generation |\n|---|---|---|" + "---|" * (len(PHASES) + 1))
    for v, rows in res.items():
        ts = [1e3 * x["ttft_s"] for x in rows]
        ph = [1e3 * statistics.median(x[k] for x in rows) for k in PHASES]
        print(f"| {v} | {statistics.median(ts):.2f} | {[round(t, 1) for t in ts]} | "
              + " | ".join(f"{p:.2f}" for p in ph) + f" | {[x['gc_passes'] for x in rows][:3]} |")


if __name__ == "__main__":
    main()
