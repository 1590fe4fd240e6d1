"""Shared fixtures for rtp_jax tests: tiny HF checkpoints, built once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hf_models import write_tiny_hf_model


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory `tiny_hf_model(family, sharded=False, dtype="float32", seed=0) -> Path`, cached per session."""
    cache: dict[tuple[str, bool, str, int], Path] = {}

    def make(family: str, sharded: bool = False, dtype: str = "float32", seed: int = 0) -> Path:
        key = (family, sharded, dtype, seed)
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"tiny-{family}-{'sharded' if sharded else 'single'}-{dtype}")
            cache[key] = write_tiny_hf_model(directory, family, seed=seed, dtype=dtype, sharded=sharded)
        return cache[key]

    return make


@pytest.fixture
def rows_and_columns_sharding() -> Callable[[str, tuple[int, ...]], object]:
    """`sharding_for(name, shape)` on a 2 x 2 mesh ("a", "b"): q_proj split by rows on "a", o_proj by
    columns on "b", everything else replicated (skips with fewer than 4 devices)."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = np.array(jax.devices()[:4])
    if devices.size < 4:
        pytest.skip("needs 4 devices")
    mesh = Mesh(devices.reshape(2, 2), ("a", "b"))
    specs = {"q_proj": PartitionSpec("a", None), "o_proj": PartitionSpec(None, "b")}

    def sharding_for(name: str, shape: tuple[int, ...]) -> NamedSharding:
        return NamedSharding(mesh, next((v for k, v in specs.items() if k in name), PartitionSpec()))

    return sharding_for
