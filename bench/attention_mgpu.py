"""Decode attention on the GPU: the Mosaic GPU kernel (TMA + wgmma) against the Triton-lowered kernel and
JAX's built-in Pallas paged_attention, on the issue's decode rows, in one process.

    python3 bench/attention_mgpu.py [--out DIR] [--cases 64x4096,256x512,64x4096b64,...] [--no-sweep]

A case is SEQSxCONTEXT, optionally followed by bBLOCK (a page size other than 16 tokens), wTOKENS (the
block table's width in tokens, as the engine's max_model_len; default the context) and pSLOTS (sequence
slots, the ones past SEQS empty, as the engine pads a decode batch), e.g. `1x384w4096p4` for the engine's
batch-1 decode in bench/run_all.py. Errors are measured on the non-empty slots. `--splits 1,2,4` adds
the default tuning with each of these split counts (the default derives its count from the slots and the
table width, not from the contexts). `--tunings "pages_per_tile=4;num_stages=1;num_splits=4,..."` adds
the default tuning with these keys fixed, one variant per comma-separated item.

Every variant's output is checked against the pure-JAX reference (relative error) before it is timed.
Timing as in bench/attention.py (one jit over rotating input sets, median of 10 after warm-up). Writes
DIR/attention_mgpu.json; prints a table last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import traceback
from typing import Any

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from attention import (  # noqa: E402
    BS,
    L2_BYTES,
    Case,
    D,
    builtin,
    git_sha,
    make_inputs,
    measure_machine,
    ours,
    reference,
    timed,
)

from kernels_pallas.paged_decode_mgpu import (  # noqa: E402
    SMEM_LIMIT,
    _paged_decode,
    default_decode_tuning,
    paged_decode_attention,
    shared_memory_bytes,
)
from kernels_pallas.testing import relative_error  # noqa: E402

DEFAULT_CASES = "1x256,1x4096,8x32768,64x1024,64x4096,256x512"


def mgpu(case: Case, **tuning: Any):
    kv_lens, tables, _, _ = case.meta
    return lambda q, k, v: paged_decode_attention(q, k, v, kv_lens, tables, sm_scale=D**-0.5, **tuning)


def mgpu_memory_only(case: Case, **tuning: Any):
    """Diagnostic: the kernel's page stream with the math skipped (its ceiling); output not checked."""
    kv_lens, tables, _, _ = case.meta
    return lambda q, k, v: _paged_decode(q, k, v, kv_lens, tables, sm_scale=D**-0.5, sliding_window=None,
                                         soft_cap=None, interpret=False, memory_only=True, **tuning)


def parse_tunings(spec: str) -> list[dict[str, int]]:
    """`"pages_per_tile=4;num_stages=1,num_splits=2"` -> [{"pages_per_tile": 4, "num_stages": 1}, ...]."""
    out = []
    for item in filter(None, spec.split(",")):
        pairs = [kv.split("=") for kv in item.split(";") if kv]
        if any(len(p) != 2 for p in pairs):
            raise SystemExit(f"--tunings: {item!r} is not KEY=VALUE;KEY=VALUE")
        out.append({k: int(v) for k, v in pairs})
    return out


def variants(case: Case, sweep: bool, splits: tuple[int, ...] = (),
             tunings: tuple[dict[str, int], ...] = ()) -> list[dict[str, Any]]:
    """The default tuning first (as the engine derives it: from the slots and the table width), then the
    default with each of `splits`, then with each of `tunings`' keys fixed; with `sweep`, tiles of 64/128
    tokens x 2-4 stages x both grid orders."""
    bs = case.block_size
    base = default_decode_tuning(len(case.kv_lens), 8, bs, max(max(case.kv_lens), case.table_tokens))
    out = [dict(base)]
    out += [{**base, "num_splits": k} for k in splits if k != base["num_splits"]]
    out += [cfg for cfg in ({**base, **t} for t in tunings) if cfg not in out]
    if not sweep:
        return out
    for tile, st, inner in itertools.product((64, 128), (2, 3, 4), (True, False)):
        cfg = {**base, "pages_per_tile": max(1, tile // bs), "num_stages": st, "heads_inner": inner}
        smem = shared_memory_bytes(D, bs, 2, pages_per_tile=cfg["pages_per_tile"], num_stages=st,
                                   num_splits=cfg["num_splits"])
        if cfg not in out and smem <= SMEM_LIMIT:
            out.append(cfg)
    return out


def run_case(case: Case, sweep: bool, splits: tuple[int, ...] = (),
             tunings: tuple[dict[str, int], ...] = ()) -> dict[str, Any]:
    copies = int(min(8, max(1, -(-4 * L2_BYTES // max(case.kv_bytes, 1)))))
    sets, case.meta = make_inputs(case, seed=len(case.name), copies=copies)
    live = np.asarray([s for s, n in enumerate(case.kv_lens) if n > 0])  # empty slots: the reference: NaN
    _, want = timed(reference(case), sets[:1], iters=1, warm_s=0.0)
    want = want[live]
    rows: list[dict[str, Any]] = []

    def attempt(name: str, fn: Any, cfg: dict[str, Any], inputs: list[tuple] = sets) -> None:
        try:
            sec, got = timed(fn, inputs)
            err = relative_error(got[live], want) if name != "mem_only" else float("nan")
            rows.append(dict(impl=name, cfg=cfg, us=sec * 1e6, TBps=case.kv_bytes / sec / 1e12, rel_err=err))
            print(f"  {case.name:16s} {name:8s} {sec * 1e6:9.1f} us {case.kv_bytes / sec / 1e12:5.2f} TB/s "
                  f"err {err:.1e} {cfg}", flush=True)
        except Exception as e:  # keep the other variants' figures
            rows.append(dict(impl=name, cfg=cfg, error=f"{type(e).__name__}: {str(e)[:400]}"))
            print(f"  {case.name} {name} {cfg} FAILED {type(e).__name__}: {str(e)[:2000]}", flush=True)
            traceback.print_exc(limit=3)

    for cfg in variants(case, sweep, splits, tunings):
        attempt("mgpu", mgpu(case, **cfg), cfg)
    if sweep:
        best = min((x for x in rows if "us" in x), key=lambda x: x["us"], default=None)
        if best is not None:
            attempt("mem_only", mgpu_memory_only(case, **best["cfg"]), best["cfg"])
        # The default and the best once more: their spread against the first timing is the noise level.
        first = next(x for x in rows if x["impl"] == "mgpu")
        for x in [first] + ([best] if best is not None and best is not first else []):
            attempt("again", mgpu(case, **x["cfg"]), x["cfg"])
    attempt("triton", ours(case), {})
    if case.block_size != BS or case.table_tokens or len(live) < len(case.kv_lens):
        return dict(name=case.name, kv_bytes=case.kv_bytes, copies=copies, rows=rows)
    pages = -(-max(case.kv_lens) // BS)
    head_major = [(q, k.transpose(2, 0, 1, 3), v.transpose(2, 0, 1, 3)) for q, k, v in sets]
    for k, p in ((1, 8), (4, 8), (8, 16)):
        if pages % k == 0 and (pages // k) % min(p, pages // k) == 0:
            cfg = dict(k_splits=k, pages_per_compute_block=p, block_h=16)
            attempt("builtin", builtin(case, cfg), cfg, head_major)
    return dict(name=case.name, kv_bytes=case.kv_bytes, copies=copies, rows=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--cases", default=DEFAULT_CASES)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--splits", default="", help="split counts to time besides the default's (e.g. 1,2,4)")
    ap.add_argument("--tunings", default="", help="tunings to time besides the default's, e.g. "
                    "'pages_per_tile=4;num_stages=1;num_splits=4,num_stages=1'")
    ns = ap.parse_args()
    splits = tuple(int(k) for k in ns.splits.split(",") if k)
    tunings = tuple(parse_tunings(ns.tunings))
    machine = measure_machine()
    print(f"copy {machine['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 mm "
          f"{machine['bf16_matmul_flops_per_s'] / 1e12:.0f} TFLOP/s", flush=True)
    results = []
    for spec in ns.cases.split(","):
        m = re.fullmatch(r"(\d+)x(\d+)(?:b(\d+))?(?:w(\d+))?(?:p(\d+))?", spec)
        if m is None:
            raise SystemExit(f"--cases: {spec!r} is not SEQSxCONTEXT[bBLOCK][wTOKENS][pSLOTS]")
        s, c = int(m[1]), int(m[2])
        bs, width, slots = int(m[3] or BS), int(m[4] or 0), max(int(m[5] or 0), s)
        name = (f"decode {s}x{c}" + (f" block {bs}" if bs != BS else "")
                + (f" table {width}" if width else "") + (f" slots {slots}" if slots > s else ""))
        case = Case("decode", name, [1] * slots, [c] * s + [0] * (slots - s), block_size=bs,
                    table_tokens=width)
        results.append(run_case(case, not ns.no_sweep, splits, tunings))
    os.makedirs(ns.out, exist_ok=True)
    info = dict(device=jax.devices()[0].device_kind, jax=jax.__version__, git=git_sha(), machine=machine,
                command="python3 bench/attention_mgpu.py " + " ".join(sys.argv[1:]))
    with open(os.path.join(ns.out, "attention_mgpu.json"), "w") as f:
        json.dump({**info, "cases": results}, f, indent=1)
    copy = machine["copy_bytes_per_s"]
    print("\n| case | mgpu default us (TB/s) | again | mgpu best us (TB/s) | best cfg | triton us (TB/s) "
          "| builtin best us (TB/s) | max rel err |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        ok = [x for x in r["rows"] if "us" in x]

        def best(impl: str, rows: list[dict[str, Any]] = ok) -> dict[str, Any] | None:
            c = [x for x in rows if x["impl"] == impl]
            return min(c, key=lambda x: x["us"]) if c else None

        dflt = next((x for x in r["rows"] if x["impl"] == "mgpu"), None)
        cells = []
        for x in (dflt, best("mgpu")):
            cells.append(f"{x['us']:.1f} ({x['TBps']:.2f})" if x and "us" in x else "failed")
        bm = best("mgpu")
        tr, bi = best("triton"), best("builtin")
        err = max((x["rel_err"] for x in ok if x["impl"] != "mem_only"), default=float("nan"))
        tr_cell = f"{tr['us']:.1f} ({tr['TBps']:.2f})" if tr else "-"
        bi_cell = f"{bi['us']:.1f} ({bi['TBps']:.2f})" if bi else "-"
        again = [f"{x['us']:.1f}" for x in ok if x["impl"] == "again"]
        print(f"| {r['name']} | {cells[0]} | {' / '.join(again) or '-'} | {cells[1]} | "
              f"{bm['cfg'] if bm else '-'} | {tr_cell} "
              f"| {bi_cell} | {err:.1e} |")
    print(f"copy bandwidth {copy / 1e12:.2f} TB/s (read+write), {jax.devices()[0].device_kind}")


if __name__ == "__main__":
    main()
