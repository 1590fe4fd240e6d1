"""A real server on loopback for the serve tests: uvicorn in a background thread on a free port.

The engine is the tiny random llama (tests/rtp_jax/hf_models.py) in float32, with a short context and a
small KV pool, so every test is fast on two CPU cores and KV exhaustion is reachable.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from starlette.applications import Starlette

from rtp_jax.engine.args import EngineArgs, build_engine
from rtp_jax.engine.llm_engine import LLMEngine
from serve.generate import ServeContext

MODEL_NAME = "tiny-llama"
MAX_MODEL_LEN = 256
NUM_KV_BLOCKS = 96


@dataclass
class LiveServer:
    url: str
    app: Starlette
    engine: LLMEngine

    @property
    def ctx(self) -> ServeContext:
        return self.app.state.ctx

    def wait_kv_idle(self, idle_free: int, timeout: float = 30.0) -> None:
        """Polls until the KV pool is back to `idle_free` free blocks (every request's blocks returned)."""
        deadline = time.monotonic() + timeout
        while self.engine.core.kv.num_free_blocks != idle_free:
            if time.monotonic() > deadline:
                raise AssertionError(f"KV pool has {self.engine.core.kv.num_free_blocks} free blocks, "
                                     f"expected {idle_free}")
            time.sleep(0.05)


def make_engine(model_dir: Path, **kw: object) -> LLMEngine:
    args = dict(model=str(model_dir), dtype="float32", max_model_len=MAX_MODEL_LEN,
                num_kv_blocks=NUM_KV_BLOCKS, max_num_seqs=16, max_num_batched_tokens=256, seed=0)
    args.update(kw)
    return build_engine(EngineArgs(**args))


def serve_in_thread(app: Starlette) -> tuple[uvicorn.Server, threading.Thread, str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"
