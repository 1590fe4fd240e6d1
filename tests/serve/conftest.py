"""Fixtures of the serve tests: the tiny model and a live server, once per session.

One server for every module: its engine compiles each step shape once, which is most of the
runtime on CPU. Tests that change server settings restore them.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rtp_jax"))

from hf_models import write_tiny_hf_model  # noqa: E402
from live_server import MODEL_NAME, LiveServer, make_engine, serve_in_thread  # noqa: E402

from serve.app import build_app  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_hf_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def live_server(tiny_model_dir: Path) -> Iterator[LiveServer]:
    engine = make_engine(tiny_model_dir)
    app = build_app(engine, MODEL_NAME, max_queue_len=256)
    server, thread, url = serve_in_thread(app)
    try:
        yield LiveServer(url, app, engine)
    finally:
        server.should_exit = True
        thread.join(30)
