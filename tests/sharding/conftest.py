"""Fixtures for the multi-device tests: tiny random models, a layout runner, the tiny HF writer.

tests/conftest.py asks XLA for 8 host devices before JAX starts; these tests skip with fewer.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rtp_jax.config import (
    ModelConfig,
    SamplingParams,
)
from rtp_jax.engine.core import make_engine_core
from rtp_jax.engine.request import Request
from rtp_jax.models.params import random_state

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rtp_jax"))  # tests/rtp_jax/hf_models.py

if len(jax.devices()) < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)",
                allow_module_level=True)

from layouts import DENSE, MAX_TOKENS, MOE, PROMPTS, Result, engine_config, layout  # noqa: E402,F401


def run_core(core: object) -> Result:
    """Greedy tokens and prompt logprobs of PROMPTS through an engine core."""
    sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, prompt_logprobs=0, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        core.add_request(Request(str(i), list(p), sp, seed=0))
    tokens: list[list[int]] = [[] for _ in PROMPTS]
    lps: list[list[float]] = [[] for _ in PROMPTS]
    while core.has_unfinished():
        for out in core.step():
            i = int(out.request_id)
            tokens[i] += out.new_token_ids
            lps[i] += [next(iter(e.values())).logprob for e in out.new_prompt_logprobs if e is not None]
    return tokens, [np.asarray(x) for x in lps]


@pytest.fixture(scope="session")
def models() -> dict[str, tuple[ModelConfig, object, object]]:
    return {name: (cfg, *random_state(cfg, jnp.float32, seed=1))
            for name, cfg in (("dense", DENSE), ("moe", MOE))}


@pytest.fixture(scope="session")
def run_layout(models: dict) -> Callable[[str, str], Result]:
    """run_layout("dense" | "moe", "tp2-dp2") -> (tokens, prompt logprobs); single device is "tp1"."""
    cache: dict[tuple[str, str], Result] = {}

    def run(model: str, spec: str) -> Result:
        if (model, spec) not in cache:
            cfg, graphdef, state = models[model]
            cache[model, spec] = run_core(make_engine_core(engine_config(cfg, layout(spec)), graphdef, state))
        return cache[model, spec]

    return run


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    from hf_models import write_tiny_hf_model

    cache: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in cache:
            cache[family] = write_tiny_hf_model(tmp_path_factory.mktemp(f"tiny-{family}"), family)
        return cache[family]

    return make
