"""Where start-up time goes: the first request of a fresh process, cold and warm persistent cache.

    python3 bench/probe_startup.py --out $OUT [--variants base,reference,no_triton_gemm]

Each variant runs bench/run_all.py's start-up child twice (empty cache folder, then the same folder)
on the Llama-3-8B shape with random weights (`load_format="dummy"`: no checkpoint to write), and
reports per program the seconds spent tracing, lowering and in XLA (compiling, or loading from the
persistent cache). The warm child of the first variant also logs XLA's emitter at VLOG level, so the
seconds between its lines say which kernels are rebuilt when an executable is loaded from the cache
(`vlog_gaps` in the result: the largest gaps and the line that ends each).

Variants: `base` (the engine's defaults), `reference` (XLA attention instead of the Pallas kernel),
`no_triton_gemm` (`--xla_gpu_enable_triton_gemm=false`: cuBLAS GEMMs), `no_export_kernel` (the Mosaic GPU
decode kernel lowered again in every program, as before it was lowered once per signature); and,
loading a written checkpoint instead of random weights, `ckpt` (the fast loader's defaults), `ckpt_nodma`
(staging slab not registered for DMA) and `ckpt_nostaging` (no staging slab); these share one cache folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from run_all import _CHILD  # noqa: E402
from synth_ckpt import SHAPES, hf_config, write_tokenizer  # noqa: E402

VARIANTS: dict[str, tuple[dict[str, str], dict[str, Any]]] = {
    "base": ({}, {}),
    "reference": ({}, {"attention_backend": "reference"}),
    "no_triton_gemm": ({"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=false"}, {}),
    "no_export_kernel": ({"RTP_PROBE_NO_EXPORT_KERNEL": "1"}, {}),
}
# Variants that load the weights from a safetensors checkpoint (written first) with these FastLoader
# keyword arguments; they share one cache folder, filled by the first of them to run.
CKPT_VARIANTS: dict[str, dict[str, Any]] = {
    "ckpt": {},
    "ckpt_nodma": {"dma_map": False},
    "ckpt_nostaging": {"staging": "none"},
}
# Prepended to the start-up child: FastLoader defaults from $RTP_PROBE_LOADER_KW (JSON).
_PRELUDE = """
import functools, json as _json, os as _os
import rtp_jax.loader.fast as _fast
_kw = _json.loads(_os.environ.get("RTP_PROBE_LOADER_KW", "{}"))
if _kw:
    _fast.FastLoader.__init__ = functools.partialmethod(_fast.FastLoader.__init__, **_kw)
if _os.environ.get("RTP_PROBE_NO_EXPORT_KERNEL"):  # the Mosaic decode kernel lowered in every program
    import sys as _sys
    _sys.path.insert(0, _os.path.join(_os.path.dirname(_fast.__file__), "..", "..", "bench"))
    import probe_patches
    probe_patches.lower_kernel_per_program()
"""
VMODULE = "ir_emitter_unnested=3,gpu_compiler=2,gpu_executable=2,nvptx_compiler=2,triton_fusion_emitter=2"
_TS = re.compile(r"^[IWE](\d{4}) (\d\d:\d\d:\d\d\.\d+)")


def vlog_gaps(text: str, top: int = 25) -> dict[str, Any]:
    """The largest pauses between consecutive timestamped log lines (absl format), with the line that
    follows each pause, plus how often each 'Generating: <kernel>' line occurs."""
    stamps: list[tuple[float, str]] = []
    for line in text.splitlines():
        m = _TS.match(line)
        if m:
            t = datetime.strptime(m.group(2), "%H:%M:%S.%f")
            stamps.append((t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6, line[:220]))
    gaps = sorted(((b[0] - a[0], b[1]) for a, b in zip(stamps, stamps[1:], strict=False)), reverse=True)[:top]
    generating = re.findall(r"Generating: (\S+)", text)
    return {"lines": len(stamps), "span_s": stamps[-1][0] - stamps[0][0] if stamps else 0.0,
            "gaps": [[round(g, 3), ln] for g, ln in gaps], "generating": len(generating),
            "generating_distinct": len(set(generating))}


def run_child(model: Path, cache: Path, engine_kw: dict[str, Any], env: dict[str, str],
              stderr_to: Path | None) -> dict[str, Any]:
    t0 = time.perf_counter()
    argv = [sys.executable, "-c", _PRELUDE + _CHILD, str(model), str(cache), json.dumps(engine_kw)]
    p = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env}, timeout=400)
    wall = time.perf_counter() - t0
    if stderr_to is not None:
        stderr_to.write_text(p.stderr)
    child = next((json.loads(ln[6:]) for ln in p.stdout.splitlines() if ln.startswith("CHILD ")), None)
    if p.returncode != 0 or child is None:
        return {"error": p.stderr[-1500:], "wall_s": wall}
    return {"wall_s": wall, **child}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--variants", default="base,reference,no_triton_gemm")
    p.add_argument("--work", default="/var/tmp/rtp_probe_startup")
    ns = p.parse_args()
    out, work = Path(ns.out), Path(ns.work)
    out.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    model.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[ns.shape]
    (model / "config.json").write_text(json.dumps(hf_config(shape)))
    write_tokenizer(model, shape["vocab_size"])
    results: dict[str, Any] = {}
    names = ns.variants.split(",")
    ckpt_cache = work / "cache_ckpt"
    if any(n in CKPT_VARIANTS for n in names):
        from synth_ckpt import write_checkpoint

        write_checkpoint(model, ns.shape)
        subprocess.run(["sync"], check=False)
        subprocess.run(["rm", "-rf", str(ckpt_cache)], check=False)
    for i, name in enumerate(names):
        if name in CKPT_VARIANTS:
            env, kw = {"RTP_PROBE_LOADER_KW": json.dumps(CKPT_VARIANTS[name])}, {"max_model_len": 4096}
            cache = ckpt_cache
            res = {} if cache.exists() else {"cold": run_child(model, cache, kw, env, None)}
        else:
            env, kw = VARIANTS[name]
            kw = {"load_format": "dummy", "max_model_len": 4096, **kw}
            cache = work / f"cache_{name}"
            subprocess.run(["rm", "-rf", str(cache)], check=False)
            res = {"cold": run_child(model, cache, kw, env, None)}
        vlog = out / f"warm_vlog_{name}.txt" if i == 0 else None
        warm_env = {**env, "TF_CPP_VMODULE": VMODULE, "TF_CPP_MIN_LOG_LEVEL": "0"} if vlog else env
        res["warm"] = run_child(model, cache, kw, warm_env, vlog)
        if vlog is not None:
            res["warm_vlog"] = vlog_gaps(vlog.read_text())
        res["cache_files"] = sorted(f.name[:60] for f in cache.iterdir()) if cache.exists() else []
        results[name] = res
        (out / "probe_startup.json").write_text(json.dumps(results, indent=1))
        for label in ("cold", "warm"):
            if label not in res:
                continue
            r = res[label]
            c = r.get("compile", {})
            print(f"{name} {label}: wall {r['wall_s']:.1f} s, "
                  f"first request {r.get('first_request_s', -1):.1f} s, "
                  f"tracing {c.get('tracing', 0):.1f} lowering {c.get('lowering', 0):.1f} "
                  f"xla {c.get('xla', 0):.1f} hits {c.get('cache_hits')} programs {c.get('programs')} "
                  f"cpu {r.get('first_request_cpu_s', -1):.1f} s threads {r.get('threads_after_build')}"
                  f"{' ERROR ' + r['error'][-300:] if 'error' in r else ''}", flush=True)
    first = results.get(names[0], {})
    if "warm_vlog" in first:
        v = first["warm_vlog"]
        print(f"warm vlog: {v['lines']} lines over {v['span_s']:.1f} s, 'Generating' {v['generating']} "
              f"({v['generating_distinct']} distinct); largest gaps:")
        for g, ln in v["gaps"][:12]:
            print(f"  {g:7.3f} s before: {ln[:160]}")


if __name__ == "__main__":
    main()
