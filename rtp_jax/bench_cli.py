"""`rtp-jax bench load`: how fast a checkpoint gets from disk onto the devices.

    rtp-jax bench load --model /models/Llama-3-8B [--output-json load.json] [--output-md load.md]

Measures, on the same files: the disk's cold read bandwidth with parallel readers (no transfer), the
fast loader (`rtp_jax.loader.fast`) with a cold page cache and then warm (median of repeats), and a
naive baseline (per file, `safetensors.numpy.load_file` of the whole file, then `jax.device_put` of
each tensor in model order); plus peak host RSS during the cold fast load. With `--cold-repeats N` the disk
read and the cold load alternate N times and their medians are compared (the disk's rate drifts). The page
cache is dropped
with /proc/sys/vm/drop_caches where permitted, else per file with posix_fadvise(DONTNEED); the report
says which (and "none" when neither worked, so "cold" numbers are then really warm).

The first warm load after the cold one is also reported alone (`warm_first_load_s`, and the median of the
others as `warm_steady_load_s`): the second read of a page-cache page moves it to the kernel's active
list, which made that load 0.3-0.6 s slower for 16 GB on the H200 host (on a CPU box with the same
kernel, `pgactivate` in /proc/vmstat rose by one per 4 KiB page of a 4 GiB file during its second read
and by none during the third; plain preads, no loader).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np


# ---- page cache and memory -----------------------------------------------------------------------
def drop_page_cache(paths: list[Path]) -> str:
    """Evicts `paths` from the page cache. Returns "drop_caches", "fadvise" or "none" (failed)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "drop_caches"
    except OSError:
        pass
    ok = hasattr(os, "posix_fadvise")
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except (OSError, AttributeError):
            ok = False
    return "fadvise" if ok else "none"


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory from /proc/self/status: `VmRSS` (all), or `RssAnon` (its own
    allocations, without mapped file pages such as the page cache the direct loader pins in place)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssSampler:
    """Samples this process's RSS every `interval` seconds while active; `.peak` and `.start` in bytes,
    `.peak_anon`: the peak of RssAnon (mapped file pages not counted)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start = self.peak = self.peak_anon = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self.start = self.peak = rss_bytes()

        def run() -> None:
            while not self._stop.wait(self.interval):
                self.peak = max(self.peak, rss_bytes())
                self.peak_anon = max(self.peak_anon, rss_bytes("RssAnon"))

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())


# ---- the measurements ----------------------------------------------------------------------------
def disk_read(paths: list[Path], num_readers: int = 16, chunk_bytes: int = 64 << 20) -> tuple[int, float]:
    """Reads every byte of `paths` with parallel readers (chunks in file order, one reusable buffer per
    thread). Returns (bytes, seconds)."""
    from rtp_jax.loader.fast import pread_into

    jobs = []
    for p in paths:
        size = p.stat().st_size
        jobs.extend((p, o, min(chunk_bytes, size - o)) for o in range(0, size, chunk_bytes))
    local = threading.local()
    fds = {p: os.open(p, os.O_RDONLY) for p in paths}

    def read(job: tuple[Path, int, int]) -> int:
        p, off, n = job
        buf = getattr(local, "buf", None)
        if buf is None or len(buf) < n:
            buf = local.buf = memoryview(np.empty(chunk_bytes, np.uint8))
        pread_into(fds[p], buf[:n], off)
        return n

    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(num_readers) as pool:
            total = sum(pool.map(read, jobs))
    finally:
        for fd in fds.values():
            os.close(fd)
    return total, time.perf_counter() - t0


def _free(*objs: Any) -> None:
    del objs
    gc.collect()


def fast_load(path: Path, dtype: Any, **loader_kw: Any) -> dict[str, Any]:
    """Loads the model with `load_model_state`; returns seconds, bytes and the loader's stats."""
    import jax

    from rtp_jax.loader import load_model_config
    from rtp_jax.loader.fast import load_model_state

    config = load_model_config(path)
    stats: dict[str, Any] = {}
    t0 = time.perf_counter()
    _, state = load_model_state(path, config, dtype, stats=stats, **loader_kw)
    jax.block_until_ready(jax.tree.leaves(state))
    seconds = time.perf_counter() - t0
    _free(state)
    return {"seconds": seconds, **{k: v for k, v in stats.items() if k != "seconds"},
            "pipeline_s": stats.get("seconds")}


def naive_load(path: Path, dtype: Any) -> dict[str, Any]:
    """Baseline: per file, the whole file through `safetensors.numpy.load_file`, then `jax.device_put`
    of each tensor in model order (cast on the device when the dtype differs)."""
    import jax
    import jax.numpy as jnp
    from safetensors.numpy import load_file

    from rtp_jax.loader import load_model_config
    from rtp_jax.loader.safetensors_io import checkpoint_files
    from rtp_jax.models.params import abstract_model, flat_param_shapes

    config = load_model_config(path)
    _, abstract = abstract_model(config, jnp.dtype(dtype))
    order = {name: i for i, name in enumerate(flat_param_shapes(abstract))}
    out: dict[str, Any] = {}
    nbytes = 0
    t0 = time.perf_counter()
    for f in checkpoint_files(path):
        tensors = load_file(str(f))
        for name in sorted(tensors, key=lambda n: order.get(n, len(order))):
            if name not in order:
                continue
            x = tensors[name]
            nbytes += x.nbytes
            a = jax.device_put(x)
            out[name] = a if a.dtype == jnp.dtype(dtype) else a.astype(dtype)
        jax.block_until_ready(list(out.values()))
        del tensors
    seconds = time.perf_counter() - t0
    _free(out)
    return {"seconds": seconds, "bytes": nbytes}


# Warm-load variants of `--variants`: (name, loader options over the command line's).
def _direct(**kw: Any) -> dict[str, Any]:
    from rtp_jax.loader.direct import DirectConfig

    return {"direct_config": DirectConfig(**kw)}


VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("slab", {"staging": "slab"}),  # the staging before the ring: pinned 384 MiB slab, 32 MiB row pieces
    ("direct", {"direct": True}),  # DMA from the pinned page cache (loader.direct), opt-in
    ("direct_tail50", {"direct": True, **_direct(share=0.5, tail=True)}),  # slab first half, direct second
    ("direct_tail35", {"direct": True, **_direct(share=0.35, tail=True)}),
)


# Where each load says its time went (loader.accounting.phase_summary, the slab, the model trace).
PHASE_KEYS = ("abstract_wait_s", "abstract_done_s", "read_busy_s", "transfer_busy_s", "mean_reading",
              "mean_transferring", "first_job_start_s", "last_job_end_s", "slab_setup_s",
              "slab_first_segment_s", "staging", "direct_bytes", "direct_files", "pin_busy_s",
              "unpin_busy_s", "pin_wait_s", "copy_busy_s", "fill_wait_s", "submit_s", "pinned_peak_bytes",
              "direct_failed", "ring_bytes", "ring_setup_s", "ring_populate_s", "ring_register_s",
              "ring_register_failures",
              "ring_copy_wait_s", "ring_read_s", "ring_read_cpu_s", "ring_fill_wait_s", "copies_setup_s",
              "loader_built_s", "tensors_done_s", "state_done_s")


# Per warm run (the full phases are kept for the last one): where run-to-run differences come from.
RUN_KEYS = ("seconds", "pipeline_s", "abstract_wait_s", "abstract_done_s", "ring_setup_s", "copies_setup_s",
            "ring_read_s", "ring_read_cpu_s", "state_done_s")


def run_load_bench(path: str | Path, *, dtype: str = "bfloat16", repeats: int = 5, num_readers: int = 16,
                   num_workers: int = 12, max_inflight_mb: int = 384, chunk_mb: int = 64, split_mb: int = 32,
                   assemble: str = "concat", use_mmap: bool = False, staging: str = "ring",
                   dma_map: bool = True, direct: bool = False, naive: bool = True,
                   cold: bool = True, variants: bool = False, log: Callable[[str], None] = print,
                   ring_config: Any = None, cold_repeats: int = 1) -> dict[str, Any]:
    """All load measurements on one checkpoint; returns the report dict (see the module docstring)."""
    import jax

    from rtp_jax.loader.safetensors_io import checkpoint_files

    path = Path(path)
    files = checkpoint_files(path)
    total = sum(f.stat().st_size for f in files)
    kw = dict(num_readers=num_readers, num_workers=num_workers, max_inflight_bytes=max_inflight_mb << 20,
              chunk_bytes=chunk_mb << 20, split_bytes=split_mb << 20, assemble=assemble, use_mmap=use_mmap,
              staging=staging, dma_map=dma_map, direct=direct, ring_config=ring_config)
    rep: dict[str, Any] = {
        "model": str(path), "files": len(files), "file_bytes": total, "dtype": dtype,
        "loader": {k: v if isinstance(v, (bool, int, float, str, type(None))) else str(v)
                   for k, v in kw.items()},
        "device": str(jax.devices()[0].device_kind),
        "cpu_count": os.cpu_count(),
    }
    _ = jax.device_put(np.zeros(4, np.float32)).block_until_ready()  # backend up before timing
    if not cold:
        fast_load(path, dtype, **kw)  # warm-up: page cache and the first transfers
    if cold:
        _cold_pairs(rep, files, path, dtype, kw, max(1, cold_repeats), num_readers, chunk_mb << 20, log)
    warm = []
    for _ in range(max(1, repeats)):
        with RssSampler() as rss:
            r = fast_load(path, dtype, **kw)
        warm.append(r["seconds"])
        rep.setdefault("warm_pipeline_all_s", []).append(r.get("pipeline_s"))
        rep.setdefault("warm_runs", []).append({k: r[k] for k in RUN_KEYS if k in r})
        rep.setdefault("staging", r.get("staging"))
        rep["warm_setup_s"] = r.get("setup_s")
        rep["warm_pipeline_s"] = r.get("pipeline_s")
        rep["warm_phases"] = {k: r[k] for k in PHASE_KEYS if k in r}
        rep.setdefault("bytes", r["bytes"])
        rep["peak_host_rss_warm_GB"] = max(rep.get("peak_host_rss_warm_GB", 0.0), rss.peak / 1e9)
        rep["peak_host_anon_warm_GB"] = max(rep.get("peak_host_anon_warm_GB", 0.0), rss.peak_anon / 1e9)
        if not cold:
            rep.setdefault("peak_host_rss_GB", rss.peak / 1e9)
    rep["warm_load_s"] = statistics.median(warm)
    rep["warm_load_all_s"] = warm
    if cold:
        rep["warm_first_load_s"] = warm[0]
        if len(warm) > 1:
            rep["warm_steady_load_s"] = statistics.median(warm[1:])
    rep["warm_load_GBps"] = rep["bytes"] / rep["warm_load_s"] / 1e9
    log(f"fast load, warm: median {rep['warm_load_s']:.3f} s of {[round(w, 3) for w in warm]} = "
        f"{rep['warm_load_GBps']:.2f} GB/s")
    if variants:
        rep["variants"] = {}
        for name, extra in VARIANTS:
            runs = [fast_load(path, dtype, **{**kw, **extra}) for _ in range(max(1, repeats))]
            secs = [r["seconds"] for r in runs]
            rep["variants"][name] = statistics.median(secs)
            rep.setdefault("variant_phases", {})[name] = {
                k: runs[-1][k] for k in PHASE_KEYS if k in runs[-1]}
            log(f"  variant {name} (warm, median of {len(secs)}): {statistics.median(secs):.3f} s "
                f"of {[round(x, 3) for x in secs]}")
    if naive:
        with RssSampler() as rss:
            r = naive_load(path, dtype)
        rep["naive_load_s"] = r["seconds"]
        rep["naive_GBps"] = r["bytes"] / r["seconds"] / 1e9
        rep["naive_peak_host_rss_GB"] = rss.peak / 1e9
        rep["speedup_vs_naive_warm"] = r["seconds"] / rep["warm_load_s"]
        log(f"naive load, warm: {r['seconds']:.2f} s = {rep['naive_GBps']:.2f} GB/s; peak RSS "
            f"{rss.peak / 1e9:.2f} GB; fast is {rep['speedup_vs_naive_warm']:.1f}x")
    return rep


# ---- reports -------------------------------------------------------------------------------------
def run_info(command: str | None = None) -> dict[str, Any]:
    """Machine, versions, git sha and command, for every results file."""
    import platform
    import subprocess

    import jax

    info: dict[str, Any] = {
        "machine": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "jax": jax.__version__, "devices": [d.device_kind for d in jax.devices()],
        "command": command or " ".join(sys.argv),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import jaxlib

        info["jaxlib"] = jaxlib.__version__
    except Exception:  # noqa: BLE001
        pass
    sha = os.environ.get("RTP_GIT_SHA")
    if not sha:
        try:
            sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                 cwd=Path(__file__).parent).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            sha = None
    info["git_sha"] = sha or "unknown"
    return info


def markdown_table(title: str, rows: dict[str, Any], notes: list[str] | None = None) -> str:
    lines = [f"# {title}", "", "| key | value |", "|---|---|"]
    for k, v in rows.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, (dict, list)):
            v = json.dumps(v)
        lines.append(f"| {k} | {v} |")
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def write_report(rep: dict[str, Any], json_path: str | Path | None, md_path: str | Path | None, title: str,
                 notes: list[str] | None = None) -> None:
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(rep, indent=2, default=str) + "\n")
    if md_path:
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(md_path).write_text(markdown_table(title, rep, notes))


def parse_ring_config(text: str | None) -> Any:
    """`RingConfig` from "THREADSxSLOTSxMIB" (e.g. "12x2x4"); None for None."""
    from rtp_jax.loader.ring import RingConfig

    if text is None:
        return None
    try:
        threads, slots, mib = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--ring-config must be THREADSxSLOTSxMIB, e.g. 12x2x4, got {text!r}") from None
    return RingConfig(threads=threads, slots=slots, chunk_bytes=mib << 20)


def _cold_pairs(rep: dict[str, Any], files: list[Path], path: Path, dtype: str, kw: dict[str, Any],
                pairs: int, num_readers: int, chunk_bytes: int, log: Callable[[str], None]) -> None:
    """`pairs` times: the disk's own parallel read, then the fast load, each from a dropped page cache.
    The pairs alternate because a VM disk's rate drifts between runs (9.4-10.1 s for the same 16 GB within
    minutes on one H200 host); `disk_read_s` and `load_s` are the medians, every run is kept."""
    disk: list[float] = []
    loads: list[float] = []
    for i in range(pairs):
        rep["cache_drop"] = method = drop_page_cache(files)
        nbytes, secs = disk_read(files, num_readers, chunk_bytes)
        disk.append(secs)
        log(f"disk read (cold via {method}, {num_readers} readers): {nbytes / 1e9:.2f} GB in {secs:.2f} s "
            f"= {nbytes / secs / 1e9:.2f} GB/s")
        drop_page_cache(files)
        with RssSampler() as rss:
            r = fast_load(path, dtype, **kw)
        loads.append(r["seconds"])
        rep.setdefault("cold_runs", []).append({k: r[k] for k in RUN_KEYS + PHASE_KEYS if k in r})
        if i == 0:  # the first cold load in the process: its memory figures
            rep["bytes"] = r["bytes"]
            rep["peak_host_rss_GB"] = rss.peak / 1e9
            rep["rss_before_load_GB"] = rss.start / 1e9
            rep["peak_inflight_bytes"] = r["peak_inflight_bytes"]
            rep["staging"] = r.get("staging")
            rep["setup_s"] = r.get("setup_s")
            # Where a cold load's time went beyond the disk's own read (first job's start, readers, tail).
            rep["cold_phases"] = rep["cold_runs"][0]
        log(f"fast load, cold: {r['bytes'] / 1e9:.2f} GB in {r['seconds']:.2f} s "
            f"= {r['bytes'] / r['seconds'] / 1e9:.2f} GB/s; "
            f"peak RSS {rss.peak / 1e9:.2f} GB (before {rss.start / 1e9:.2f} GB)")
    rep["disk_read_s"], rep["load_s"] = statistics.median(disk), statistics.median(loads)
    rep["disk_read_GBps"] = nbytes / rep["disk_read_s"] / 1e9
    rep["load_GBps"] = rep["bytes"] / rep["load_s"] / 1e9
    rep["disk_read_all_s"], rep["load_all_s"] = disk, loads
    rep["cold_vs_disk"] = rep["disk_read_s"] / rep["load_s"]


# ---- an LLM on the fast loader -------------------------------------------------------------------
def cmd_load(ns: argparse.Namespace) -> int:
    from rtp_jax.loader import resolve_model_path

    path = resolve_model_path(ns.model)
    if not path.is_dir():
        raise ValueError(f"bench load needs an HF safetensors directory, got {str(path)!r}")
    rep = run_load_bench(path, dtype=ns.dtype, repeats=ns.repeats, num_readers=ns.readers,
                         num_workers=ns.workers, max_inflight_mb=ns.max_inflight_mb, chunk_mb=ns.chunk_mb,
                         split_mb=ns.split_mb, assemble=ns.assemble,
                         use_mmap=ns.mmap, staging=ns.staging, dma_map=not ns.no_dma_map,
                         direct=ns.direct, naive=not ns.no_naive, cold=not ns.no_cold,
                         variants=ns.variants, ring_config=parse_ring_config(ns.ring_config),
                         cold_repeats=ns.cold_repeats)
    rep = {**rep, **run_info()}
    notes = [f"page cache dropped with: {rep.get('cache_drop', 'not dropped (--no-cold)')}"]
    if rep.get("cache_drop") == "none":
        notes.append("the page cache could NOT be dropped: 'cold' numbers are warm")
    write_report(rep, ns.output_json, ns.output_md, "rtp-jax bench load", notes)
    keys = ("bytes", "load_s", "warm_load_s", "warm_first_load_s", "warm_steady_load_s", "naive_load_s",
            "disk_read_GBps", "peak_host_rss_GB", "cache_drop")
    print(json.dumps({k: rep[k] for k in keys if k in rep}, indent=2))
    return 0


def register_bench(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser("load", help="checkpoint loading: fast loader vs naive vs disk")
    p.add_argument("--model", required=True, help="HF safetensors directory")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    p.add_argument("--repeats", type=int, default=5, help="warm loads (median reported)")
    p.add_argument("--readers", type=int, default=16, help="parallel chunk readers")
    p.add_argument("--workers", type=int, default=12, help="tensors in flight (read + transfer)")
    p.add_argument("--max-inflight-mb", type=int, default=384, help="host bytes in flight (the slab size)")
    p.add_argument("--chunk-mb", type=int, default=64)
    p.add_argument("--split-mb", type=int, default=32,
                   help="tensors above this are sent in row pieces joined on the device (0: never split)")
    p.add_argument("--assemble", default="concat", choices=["concat", "dus"],
                   help="how pieces are joined on the device: one concatenate, or in-place updates")
    p.add_argument("--mmap", action="store_true", help="read through mmap instead of preadv")
    p.add_argument("--staging", default="ring", choices=["ring", "slab", "slab_async", "none"],
                   help="ring: whole tensors copied through small cache-resident pinned slots (CUDA; the "
                        "slab elsewhere); slab: one reused pre-faulted host buffer; slab_async: set up in "
                        "the background, mmap meanwhile; none: a fresh buffer per tensor")
    p.add_argument("--ring-config", default=None,
                   help="the ring's THREADSxSLOTSxMIB (default 10x2x8: 10 threads, 2 pinned slots of 8 MiB)")
    p.add_argument("--no-dma-map", action="store_true", help="do not register the slab for direct DMA")
    p.add_argument("--direct", action="store_true",
                   help="copy files already in the page cache to the GPU by DMA from the pinned pages "
                        "(loader.direct; opt-in, slower than the slab on the H200 host so far)")
    p.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    p.add_argument("--no-cold", action="store_true", help="skip page-cache drops (disk and cold load)")
    p.add_argument("--cold-repeats", type=int, default=1,
                   help="alternating (disk read, cold load) pairs; medians of each are reported")
    p.add_argument("--variants", action="store_true",
                   help="also time staging / mmap / worker-count / budget variants (warm, medians)")
    p.add_argument("--output-json", default=None)
    p.add_argument("--output-md", default=None)
    p.set_defaults(func=cmd_load)
