"""The rtp-jax command on a tiny model: generate, one-shot chat and run-batch with a bad line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from rtp_jax.cli import main


def test_generate_prints_the_completion(tiny_hf_model: Callable[..., Path],
                                        capsys: pytest.CaptureFixture) -> None:
    """`rtp-jax generate` prints one completion per prompt and exits 0."""
    rc = main(["generate", "Hello world", "The quick", "--model", str(tiny_hf_model("llama")),
               "--dtype", "float32", "--max-model-len", "64", "--max-tokens", "5"])
    assert rc == 0
    assert len(capsys.readouterr().out.strip("\n").split("\n")) >= 2


def test_chat_one_shot(tiny_hf_model: Callable[..., Path], capsys: pytest.CaptureFixture) -> None:
    """`rtp-jax chat "message"` answers once through the chat template and exits 0."""
    rc = main(["chat", "Hi there", "--model", str(tiny_hf_model("qwen2")), "--dtype", "float32",
               "--max-model-len", "128", "--max-tokens", "4"])
    assert rc == 0


def test_run_batch_writes_one_line_per_request(tiny_hf_model: Callable[..., Path], tmp_path: Path) -> None:
    """run-batch answers every line in order; a malformed line and an over-long prompt become error rows
    while the others are still generated."""
    lines = [
        {"prompt": "Hello", "max_tokens": 3, "ignore_eos": True},
        "not json",
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "ignore_eos": True},
        {"prompt_token_ids": list(range(3, 200))},
        {"prompt_token_ids": [5, 6, 7], "max_tokens": 4, "temperature": 0.0, "ignore_eos": True},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    dst = tmp_path / "out.jsonl"
    rc = main(["run-batch", "--input", str(src), "--output", str(dst), "--model", str(tiny_hf_model("llama")),
               "--dtype", "float32", "--max-model-len", "64", "--window", "2"])
    assert rc == 0
    rows = [json.loads(x) for x in dst.read_text().splitlines()]
    assert len(rows) == 5
    assert [len(r.get("token_ids", [])) for r in rows] == [3, 0, 2, 0, 4]
    assert "error" in rows[1] and "error" in rows[3] and "max_model_len" in rows[3]["error"]
