"""TTFT under load: `rtp-jax serve --precompile` on the benchmark checkpoint, driven by
`rtp-jax bench serve` at a fixed request rate (Poisson arrivals, ShareGPT-like lengths). Results go to
--out/serve.json and are merged into --out/decode.json (keys `serve_<rate>rps_*`) when that file exists.

    python3 bench/serve_ttft.py --ckpt /var/tmp/rtp_bench/llama3-8b --out $OUT --request-rate 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"server not healthy after {timeout_s} s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="/var/tmp/rtp_bench/llama3-8b")
    p.add_argument("--out", required=True)
    p.add_argument("--request-rate", type=float, default=8.0)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--startup-timeout", type=float, default=600,
                   help="seconds to wait for the server (a cold --precompile of the 8B model takes minutes)")
    p.add_argument("--no-precompile", dest="precompile", action="store_false",
                   help="let the server compile lazily (live traffic then waits on XLA compiles)")
    ns = p.parse_args()
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    url = f"http://127.0.0.1:{ns.port}"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    with open(out / "server.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "rtp_jax.cli", "serve", "--model", ns.ckpt, "--port", str(ns.port),
             "--max-model-len", str(ns.max_model_len), *(["--precompile"] if ns.precompile else [])],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_healthy(url, server, ns.startup_timeout)
            startup_s = time.perf_counter() - t0
            # Warm-up: compile the programs the measured run will need (same shapes, fewer requests).
            bench = [sys.executable, "-m", "rtp_jax.cli", "bench", "serve", "--base-url", url]
            subprocess.run([*bench, "--num-prompts", "16", "--seed", "1"], env=env, check=True,
                           capture_output=True)
            summary_path = out / "serve.json"
            run = subprocess.run([*bench, "--num-prompts", str(ns.num_prompts), "--request-rate",
                                  str(ns.request_rate), "--output-json", str(summary_path)], env=env,
                                 check=True, capture_output=True, text=True)
            print(run.stdout[-3000:])
        finally:
            server.terminate()
            server.wait(60)
    summary = json.loads(summary_path.read_text())
    rate = f"{ns.request_rate:g}"
    server_cmd = (f"rtp-jax serve --model {ns.ckpt} --max-model-len {ns.max_model_len}"
                  + (" --precompile" if ns.precompile else ""))
    merged = {f"serve_{rate}rps_ttft_ms": summary["ttft_ms"], f"serve_{rate}rps_itl_ms": summary["itl_ms"],
              f"serve_{rate}rps_output_tok_s": summary["output_token_throughput"],
              f"serve_{rate}rps_completed": summary["completed"],
              f"serve_{rate}rps_failed": summary["failed"],
              "serve_startup_s": startup_s,
              "serve_command": f"{server_cmd}; rtp-jax bench serve --num-prompts {ns.num_prompts} "
                               f"--request-rate {ns.request_rate} (after a 16-prompt warm-up)"}
    decode = out / "decode.json"
    if decode.exists():
        from rtp_jax.bench_cli import write_report

        rep = json.loads(decode.read_text()) | merged
        write_report(rep, decode, out / "decode.md", "rtp-jax decode / throughput benchmarks")
    print(json.dumps(merged, indent=1))


if __name__ == "__main__":
    main()
