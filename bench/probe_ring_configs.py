"""Warm-load sweep of the ring's shape (threads x slots x chunk MiB) in one process, rounds interleaved so
that no configuration always runs first (run order moved earlier loader A/Bs by ~0.04 s).

    python3 bench/probe_ring_configs.py --out $OUT --ckpt /var/tmp/llama3-8b \
        --configs 8x2x8,12x2x4 --rounds 4 [--thread-variants 8x2x8] [--gil-variants 8x2x8]

Each load is `load_model_state` end to end as `rtp-jax bench load` times it warm (`fast_load`);
`--thread-variants` repeats those configurations with the abstract model built in a thread beside the
pipeline (`abstract_in_thread=True`); `--gil-variants` repeats them with every CUDA driver call releasing
the GIL (`CudaHostDma` over `ctypes.CDLL` alone, as before 1a6c6f9); `--switch-variants` with the
abstract model in a thread and the interpreter's GIL switch interval at 0.2 ms (5 ms by default);
`--pinahead-variants` with every ring thread's slots pinned before the pass (as before e036be3).
Prints a table of medians last; details in probe_ring_configs.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rtp_jax.bench_cli import fast_load, parse_ring_config  # noqa: E402
from rtp_jax.loader import copies  # noqa: E402


def releasing_dma() -> Any:
    """The driver's `HostDma` with every call through `ctypes.CDLL` (each one releases the GIL)."""
    import ctypes

    from rtp_jax.loader.cuda_dma import CudaHostDma, host_dma

    default = host_dma()
    if default is None:
        raise SystemExit("--gil-variants needs the CUDA driver's host DMA")
    dma = CudaHostDma(ctypes.CDLL("libcuda.so.1"))
    dma._first = default._first
    return dma


def pin_ahead_ring() -> Any:
    """`RingCopier` with every thread's slots pinned at construction, as before e036be3 (one madvise call and
    one registration per thread's region here; the whole ring at once before)."""
    import time

    from rtp_jax.loader.ring import RingCopier

    class PinAhead(RingCopier):
        def __init__(self, *a: Any, **k: Any) -> None:
            super().__init__(*a, **k)
            for t in range(1, self.config.threads):
                self._pin(t)
            self.setup_s = time.perf_counter() - self._t0

        def _pin(self, t: int) -> None:
            if self._base + t * self._region not in self._registered:
                super()._pin(t)

    return PinAhead


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--configs", default="8x2x8,12x2x4")
    ap.add_argument("--thread-variants", default="", help="configs also run with abstract_in_thread")
    ap.add_argument("--gil-variants", default="", help="configs also run with GIL-releasing quick calls")
    ap.add_argument("--switch-variants", default="",
                    help="configs also run with abstract_in_thread under a 0.2 ms GIL switch interval")
    ap.add_argument("--pinahead-variants", default="",
                    help="configs also run with all slots pinned before the pass (as before e036be3)")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    import jax.numpy as jnp

    runs: list[tuple[str, dict[str, Any]]] = []
    for cfg in filter(None, args.configs.split(",")):
        runs.append((cfg, {"ring_config": parse_ring_config(cfg)}))
    for cfg in filter(None, args.thread_variants.split(",")):
        runs.append((f"{cfg}+thread", {"ring_config": parse_ring_config(cfg), "abstract_in_thread": True}))
    for cfg in filter(None, args.gil_variants.split(",")):
        runs.append((f"{cfg}+cdll", {"ring_config": parse_ring_config(cfg), "ring": releasing_dma()}))
    for cfg in filter(None, args.switch_variants.split(",")):
        runs.append((f"{cfg}+thread+si200", {"ring_config": parse_ring_config(cfg),
                                             "abstract_in_thread": True, "switch_s": 2e-4}))
    for cfg in filter(None, args.pinahead_variants.split(",")):
        runs.append((f"{cfg}+pinahead", {"ring_config": parse_ring_config(cfg),
                                          "ring_class": pin_ahead_ring()}))
    runs.append(("slab", {"staging": "slab"}))
    path = Path(args.ckpt)
    fast_load(path, jnp.bfloat16)  # warm-up: page cache, programs compiled
    res: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in runs}
    for r in range(args.rounds):
        order = runs[r % len(runs):] + runs[:r % len(runs)]
        for name, kw in order:
            kw = dict(kw)
            switch, default = kw.pop("switch_s", None), sys.getswitchinterval()
            ring_class, default_class = kw.pop("ring_class", None), copies.RingCopier
            copies.RingCopier = ring_class or default_class
            if switch is not None:
                sys.setswitchinterval(switch)
            try:
                out = fast_load(path, jnp.bfloat16, **kw)
            finally:
                sys.setswitchinterval(default)
                copies.RingCopier = default_class
            res[name].append({k: v for k, v in out.items() if isinstance(v, (int, float, str))})
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "probe_ring_configs.json").write_text(json.dumps(res, indent=1))
    cols = ("pipeline_s", "ring_read_s", "ring_read_cpu_s", "ring_copy_wait_s", "abstract_wait_s",
            "ring_setup_s", "copies_setup_s")
    print(f"| config | warm load s (median) | all | {' | '.join(cols)} (medians) |\n"
          f"|---|---|---|{'---|' * len(cols)}")
    for name, rows in res.items():
        secs = [x["seconds"] for x in rows]
        med = [statistics.median(x.get(c) or 0.0 for x in rows) for c in cols]
        print(f"| {name} | {statistics.median(secs):.3f} | {[round(s, 3) for s in secs]} | "
              + " | ".join(f"{m:.3f}" for m in med) + " |")


if __name__ == "__main__":
    main()
