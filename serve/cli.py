"""The `rtp-jax serve` and `rtp-jax bench serve` subcommands.

rtp_jax/cli.py calls `register(subparsers)` and `register_bench(bench_subparsers)`; each subcommand sets
`func` to the callable that runs it with the parsed namespace.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from rtp_jax.engine.args import EngineArgs

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the OpenAI-compatible HTTP server",
                              description="Serve a model over OpenAI's HTTP API (chat, completions).")
    p.add_argument("model_tag", nargs="?", default=None, help="model path (same as --model)")
    EngineArgs.add_cli_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", default=None,
                   help="name clients use (default: from the model path)")
    g.add_argument("--max-queue-len", type=int, default=1024,
                   help="waiting sequences beyond which requests get 429 (default 1024)")
    g.add_argument("--api-key", default=None, help="require `Authorization: Bearer <key>` on /v1 routes")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run_server)


def register_bench(bench_subparsers: argparse._SubParsersAction) -> None:
    from serve import bench_serving

    p = bench_subparsers.add_parser("serve", help="benchmark a running server (vLLM's benchmark_serving)")
    bench_serving.add_cli_args(p)
    p.set_defaults(func=run_bench_serving)


def run_bench_serving(ns: argparse.Namespace) -> int:
    """`rtp-jax bench serve`: prints the summary table; exit status 0 (1 when any request failed)."""
    from serve import bench_serving

    summary = bench_serving.main(ns)
    return 1 if summary["failed"] else 0


def served_model_name(ns: argparse.Namespace) -> str:
    if ns.served_model_name:
        return ns.served_model_name
    if ns.model:
        path = Path(ns.model)
        return path.stem if path.suffix == ".gguf" else path.name or str(path)
    return DEFAULT_MODEL_NAME


def run_server(ns: argparse.Namespace) -> None:
    import uvicorn

    from rtp_jax.engine.args import build_engine
    from serve.app import build_app

    if ns.model_tag and not ns.model:
        ns.model = ns.model_tag
    logging.basicConfig(level=ns.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = build_engine(EngineArgs.from_cli_args(ns))
    app = build_app(engine, served_model_name(ns), max_queue_len=ns.max_queue_len, api_key=ns.api_key)
    uvicorn.run(app, host=ns.host, port=ns.port, log_level=ns.log_level, timeout_graceful_shutdown=5)
