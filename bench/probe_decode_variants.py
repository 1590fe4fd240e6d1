"""Batch-1 decode of the engine in variants, one child process each (Llama-3-8B shape, random weights).

    python3 bench/probe_decode_variants.py --out $OUT [--variants base,kv_write] [--trace]

Each child builds `LLM(load_format="dummy")` as bench/run_all.py's engine (max_model_len 4096, KV pool
from free memory), runs a 128-token prompt + 256 greedy new tokens once to compile, then `--repeats`
more times (tok/s as run_all measures it), and with `--trace` one more run under `jax.profiler`, whose
kernel table (bench/trace_summary.py) goes to <variant>_trace.txt under --out. The first generated
tokens are printed so variants can be checked for the same output.

Variants:
  base        the engine as it is
  kv_scatter  the layers' K/V cache write by XLA's two scatters instead of kernels_pallas/kv_write.py's
              one kernel (the engine's choice for the Pallas backends since 2026-12-01)
  no_export_kernel the Mosaic decode kernel lowered in every program, not once per signature
  decode_rows1 multi-step decode programs from 1 sequence slot (`MIN_DECODE_SEQS` 1 instead of 4)
  xla:FLAGS   the engine compiled with XLA_FLAGS=FLAGS (e.g. "xla:--xla_gpu_autotune_level=0"; several flags
              separated by spaces, no commas, the whole variant quoted), for the child process alone
  unfused_rope decode layers without the fused RoPE + K/V write kernel (kernels_pallas/rope_kv_write.py,
              the engine's default with the Mosaic decode kernel): XLA's fusions and the Pallas K/V write
  attn_splits:N the Mosaic decode attention kernel with N K splits (default: from max_model_len; 9 at bs1)
  attn_tuning:K=V;K=V the same kernel with tuning keys fixed (pages_per_tile, num_stages, num_splits,
              heads_inner; e.g. "attn_tuning:pages_per_tile=4;num_stages=1;num_splits=4")
  decode_gemm:CFG programs of <= 16 tokens with every Triton GEMM forced to the tiling CFG (a
              TritonGemmKey textproto, fields separated by ';': "block_m:16;block_n:32;block_k:128;split_k:2;
              num_stages:3;num_warps:4;num_ctas:1"); bench/probe_gemm_configs.py finds candidates
  decode_gemm_any:CFG1/CFG2/... the same programs with XLA's autotuner choosing per GEMM among these tilings
  res_split:S decode layers with their residual adds and RMSNorms by kernels_pallas/add_rms_norm.py, and
              o_proj and down_proj as S float32 split-K partials that it sums (S = 1: the GEMMs' own
              outputs; `residual.DECODE_RESIDUAL_SPLITS`), instead of XLA's adds, norms and split-K sums
  gate_up_major gate/up's GEMM output as [2, T, hidden] instead of [T, 2, hidden]
  qkv_split:S decode steps project q/k/v as S float32 split-K partials that rope_kv_write sums
              (`attention.DECODE_QKV_SPLITS`, 4 by default; 0: XLA's split-K with its own reduction kernel)
  w_in_major[:A/B] GEMM weights held with their contraction axis most major in device memory (physically
              [in, out]; shapes and code unchanged); optionally only those whose path contains A or B
  no_norms    every RMSNorm replaced by the identity: a timing bound on folding the norms into their
              neighbours (the first tokens differ from base by construction)
  no_attn_kernel decode layers skip the Mosaic attention kernel and its split merge (q roped, K/V written,
              roped q handed to o_proj): a timing bound on a cheaper decode attention (tokens differ)
  A+B         both (e.g. "unfused_rope+xla:--xla_gpu_enable_pdl_launch=true")
Each child runs without the persistent compilation cache (`--shared-cache` to share it): XLA's per-fusion
autotune cache lives inside it, and a child finding the base child's GEMM tilings there ignores options
that change them. Prints a table last; writes probe_decode_variants.json under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import glob, json, statistics, sys, tempfile, time
root, variant, repeats, trace, out, shape = sys.argv[1:7]
repeats, trace = int(repeats), trace == "1"
sys.path.insert(0, root); sys.path.insert(0, root + "/bench")
import jax, jax.numpy as jnp, numpy as np
res = {"variant": variant}
parts = variant.split("+")  # e.g. "unfused_rope+xla:--xla_gpu_enable_pdl_launch=true"
if "base" in parts:  # the Pallas K/V write against XLA's scatters on this device, 8B cache rows
    from kernels_pallas.kv_write import paged_kv_write, paged_kv_write_reference
    interpret = jax.default_backend() == "cpu"  # a CPU smoke run of this probe
    for t in (4, 300):
        kc = jax.random.normal(jax.random.key(1), (2048, 16, 8, 128), jnp.float32).astype(jnp.bfloat16)
        k = jax.random.normal(jax.random.key(2), (t, 8, 128), jnp.float32)
        slots = jnp.asarray(np.random.default_rng(t).choice(2048 * 16, t, replace=False), jnp.int32)
        slots = slots.at[-1].set(2048 * 16)
        want = paged_kv_write_reference(jnp.array(kc), -kc, k, 2 * k, slots)
        got = paged_kv_write(jnp.array(kc), -kc, k, 2 * k, slots, interpret=interpret)
        diff = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))))
                   for g, w in zip(got, want))
        res[f"kv_write_max_abs_diff_T{t}"] = diff
        print(f"kv_write kernel vs scatter, T={t}: max|diff| {diff}", flush=True)
if "kv_scatter" in parts:  # the layers' K/V write as XLA's two scatters instead of the Pallas kernel
    import rtp_jax.models.attention as attention
    attention.pallas_write_kv = attention.write_kv
if "no_export_kernel" in parts:  # the Mosaic decode kernel lowered in every program (before 2026-12-01)
    import probe_patches
    probe_patches.lower_kernel_per_program()
if "decode_rows1" in parts:  # decode programs down to one sequence slot (bs1 runs T = 1, not 4)
    import rtp_jax.engine.runner as runner_mod
    runner_mod.MIN_DECODE_SEQS = 1
if "unfused_rope" in parts:  # decode layers without kernels_pallas/rope_kv_write.py (the engine's default)
    import probe_patches
    probe_patches.unfused_decode()
for p in parts:
    if p.startswith("decode_gemm_any:"):  # the autotuner choosing among a few tilings ('/'-separated)
        import probe_patches
        probe_patches.decode_gemm_candidates(p.split(":", 1)[1].split("/"))
    if p.startswith("decode_gemm:"):  # decode programs' Triton GEMMs forced to one tiling
        import probe_patches
        probe_patches.decode_gemm_config(p.split(":", 1)[1])
    if p.startswith("qkv_split:"):  # decode q/k/v as S float32 partials, summed inside rope_kv_write
        import rtp_jax.models.attention as attention
        attention.DECODE_QKV_SPLITS = int(p.split(":")[1])
    if p.startswith("res_split:"):  # o_proj and down as S float32 partials, summed inside add_rms_norm
        import rtp_jax.models.residual as residual
        residual.DECODE_RESIDUAL_SPLITS = int(p.split(":")[1])
    if p == "gate_up_major":  # gate/up output [2, T, hidden]: silu * up may fuse into down's operand
        import probe_patches
        probe_patches.gate_up_major()
    if p == "w_in_major" or p.startswith("w_in_major:"):  # GEMM weights physically [in, out]
        import probe_patches
        probe_patches.weights_in_major(p.split(":", 1)[1].split("/") if ":" in p else None)
    if p == "no_norms":  # a timing bound: every RMSNorm the identity (tokens differ)
        import probe_patches
        probe_patches.no_layer_norms()
    if p == "no_attn_kernel":  # a timing bound: no attention kernel or merge (tokens differ)
        import probe_patches
        probe_patches.no_attention_kernel()
    if p.startswith("attn_tuning:"):  # the decode attention kernel with fixed tuning keys
        import probe_patches
        kv = dict(x.split("=") for x in p.split(":", 1)[1].split(";"))
        probe_patches.decode_attention_tuning(**{k: v == "True" if k == "heads_inner" else int(v)
                                                 for k, v in kv.items()})
    if p.startswith("attn_splits:"):  # the decode attention kernel with a fixed number of K splits
        import probe_patches
        probe_patches.decode_attention_tuning(num_splits=int(p.split(":")[1]))
from probe_programs import model_dir
from run_all import run_steps
from rtp_jax import LLM
t0 = time.perf_counter()
llm = LLM(model_dir(shape), load_format="dummy", max_model_len=4096)
res["build_s"] = time.perf_counter() - t0
rng = np.random.default_rng(1)
prompt = rng.integers(100, min(128000, llm.engine.core.config.model.vocab_size), 128).tolist()
runs = []
for rep in range(1 + repeats):
    r = run_steps(llm, [(prompt, 256)])
    dec = r["steps"][1:]
    tok_s = sum(k for _, k in dec) / sum(s for s, _ in dec)
    print(f"{variant} run {rep}: {tok_s:.1f} tok/s{' [compile]' if rep == 0 else ''}", flush=True)
    if rep:
        runs.append(tok_s)
res["tok_s_all"] = runs
res["tok_s"] = statistics.median(runs)
from rtp_jax import SamplingParams
o = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=16, temperature=0.0),
                 use_tqdm=False)
res["first_tokens"] = list(o[0].outputs[0].token_ids)
if trace:
    from trace_summary import summarise
    tmp = tempfile.mkdtemp(prefix="rtp_trace_")
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
        run_steps(llm, [(prompt, 64)])
    found = glob.glob(tmp + "/**/perfetto_trace.json.gz", recursive=True)
    if found:
        safe = "".join(c if c.isalnum() or c in "_.-" else "_" for c in variant)  # xla:--flag=v
        open(f"{out}/{safe}_trace.txt", "w").write(summarise(found[0], top=30))
print("CHILD " + json.dumps(res), flush=True)
"""


def run_child(variant: str, repeats: int, trace: bool, out: Path, shape: str,
              shared_cache: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, "-c", _CHILD, str(ROOT), variant, str(repeats), "1" if trace else "0", str(out),
           shape]
    # No persistent compilation cache unless asked: JAX turns on XLA's per-fusion autotune cache inside it
    # (`jax_persistent_cache_enable_xla_caches`), so a variant child would reuse the GEMM tilings the base
    # child autotuned, and tiling options (`decode_gemm:`, autotune levels) would silently not apply.
    env = dict(os.environ) if shared_cache else dict(os.environ, RTP_JAX_COMPILATION_CACHE="0")
    xla = [p for p in variant.split("+") if p.startswith("xla:")]
    if xla:  # set before the child imports jax: XLA reads it once
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla[0][4:]}".strip()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    res: dict[str, Any] = {"variant": variant}
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("CHILD "):
            res = json.loads(line[6:])
        elif "Warning" not in line:
            print(f"  [{variant}] {line.rstrip()}", flush=True)
    if proc.wait() != 0:
        res["error"] = f"exit {proc.returncode}"
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    p.add_argument("--variants", default="base,kv_scatter")
    p.add_argument("--sep", default=",", help="separator of --variants ('|' for flag values with commas)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--trace", action="store_true")
    p.add_argument("--shared-cache", action="store_true",
                   help="children share the engine's compilation cache (and XLA's autotune cache)")
    p.add_argument("--shape", default="llama3-8b", help="bench/synth_ckpt.py SHAPES key (tiny: CPU smoke)")
    ns = p.parse_args()
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for v in ns.variants.split(ns.sep):  # written after each child: a run cut short keeps the rest
        rows.append(run_child(v, ns.repeats, ns.trace, out, ns.shape, ns.shared_cache))
        (out / "probe_decode_variants.json").write_text(json.dumps(rows, indent=1))
    print("\n| variant | bs1 tok/s (median) | runs | first tokens |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r.get('tok_s', float('nan')):.1f} | {r.get('tok_s_all', r.get('error'))} "
              f"| {r.get('first_tokens', [])[:8]} |")


if __name__ == "__main__":
    main()
