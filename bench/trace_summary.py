"""Summarises a Perfetto trace written by `jax.profiler` (bench/profile_engine.py): device busy time,
kernel time by name, and host (Python) time by function.

    python3 bench/trace_summary.py trace_decode_bs1.json.gz [--top 25]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rtp_jax.loader.accounting import covered_s  # noqa: E402  (the length of a union of intervals)


def load_events(path: str) -> tuple[list[dict[str, Any]], dict[int, str], dict[tuple[int, int], str]]:
    with gzip.open(path) if path.endswith(".gz") else open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    procs: dict[int, str] = {}
    threads: dict[tuple[int, int], str] = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            procs[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    return [e for e in events if e.get("ph") == "X"], procs, threads


def kernel_family(name: str) -> str:
    """Groups kernel names: numeric suffixes dropped, so `fusion_123` and `fusion_7` count together."""
    return re.sub(r"[._]\d+", "", name)[:90]


def summarise(path: str, top: int = 25) -> str:
    events, procs, threads = load_events(path)
    lines = [f"# {path}: {len(events)} events"]
    device_pids = [p for p, n in procs.items() if "GPU" in n or "/device:" in n]
    for pid in device_pids:
        evs = [e for e in events if e["pid"] == pid and e.get("dur", 0) > 0]
        if not evs:
            continue
        by_thread = collections.Counter(threads.get((pid, e["tid"]), str(e["tid"])) for e in evs)
        lines.append(f"## {procs[pid]}: threads {dict(by_thread.most_common(6))}")
        # Kernel rows: the stream threads (XLA ops lines duplicate them, so take the busiest kind only).
        stream_evs = [e for e in evs if "Stream" in threads.get((pid, e["tid"]), "")] or evs
        t0 = min(e["ts"] for e in stream_evs)
        t1 = max(e["ts"] + e["dur"] for e in stream_evs)
        busy = covered_s([(e["ts"], e["ts"] + e["dur"]) for e in stream_evs])
        share = 100 * busy / max(t1 - t0, 1)
        lines.append(f"span {(t1 - t0) / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms ({share:.0f}%)")
        agg: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
        for e in stream_evs:
            a = agg[kernel_family(e["name"])]
            a[0] += e["dur"]
            a[1] += 1
        total = sum(v[0] for v in agg.values())
        lines.append("| kernel family | ms | % | count | us/each |\n|---|---|---|---|---|")
        for name, (dur, n) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:top]:
            lines.append(f"| {name} | {dur / 1e3:.2f} | {100 * dur / total:.1f} | {n} | {dur / n:.1f} |")
    host = [e for e in events if e["pid"] not in device_pids and e["name"].startswith("$")]
    if host:
        agg2: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
        for e in host:
            a = agg2[e["name"]]
            a[0] += e["dur"]
            a[1] += 1
        lines.append("## host Python (inclusive)\n| function | ms | count |\n|---|---|---|")
        for name, (dur, n) in sorted(agg2.items(), key=lambda kv: -kv[1][0])[:top]:
            lines.append(f"| {name[:80]} | {dur / 1e3:.2f} | {n} |")
    return "\n".join(lines)


def long_kernels(path: str, min_us: float) -> str:
    """Device kernels that ran at least `min_us`, one row per kernel name: count, mean us, and the
    trace's arguments of its first occurrence (XLA puts the HLO op and module there), to tell apart
    kernels that a family-level summary lumps together."""
    events, procs, threads = load_events(path)
    device_pids = {p for p, n in procs.items() if "GPU" in n or "/device:" in n}
    rows: dict[str, list[Any]] = {}
    for e in events:
        if e["pid"] in device_pids and e.get("dur", 0) >= min_us \
                and "Stream" in threads.get((e["pid"], e["tid"]), ""):
            r = rows.setdefault(e["name"], [0, 0.0, e.get("args", {})])
            r[0] += 1
            r[1] += e["dur"]
    lines = [f"# kernels >= {min_us:g} us in {path}", "| kernel | count | us/each | args |",
             "|---|---|---|---|"]
    for name, (n, dur, args) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"| {name[:70]} | {n} | {dur / n:.1f} | {json.dumps(args)[:400]} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("traces", nargs="+")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--long-us", type=float, default=0.0,
                   help="also list each kernel that ran at least this long, with its trace arguments")
    ns = p.parse_args()
    for t in ns.traces:
        print(summarise(t, ns.top))
        if ns.long_us > 0:
            print(long_kernels(t, ns.long_us))


if __name__ == "__main__":
    main()
