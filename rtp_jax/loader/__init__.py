"""Model loading: find a checkpoint, read its config, stream its weights under HF names.

    path = resolve_model_path(None)            # embedded SmolLM2-135M-Instruct (GGUF)
    config = load_model_config(path)           # ModelConfig
    for name, array in iter_weights(path, config):   # "model.layers.0.self_attn.q_proj.weight", [out, in]
        ...

Every format yields the same names and layouts as the HF safetensors checkpoint, so model code
maps one table of names. Arrays come one at a time (never the whole state dict at once).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from rtp_jax.config import ModelConfig
from rtp_jax.loader.gguf import iter_gguf, model_config_from_gguf, open_gguf
from rtp_jax.loader.orbax_io import is_orbax_checkpoint, iter_orbax_weights
from rtp_jax.loader.paths import EXPECTED, embedded_model_path, is_gguf_file, resolve_model_path
from rtp_jax.loader.safetensors_io import iter_safetensors

__all__ = [
    "embedded_model_path",
    "is_gguf_file",
    "iter_weights",
    "load_model_config",
    "normalize_hf_config",
    "resolve_model_path",
]


def normalize_hf_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Maps transformers v5's `rope_parameters` back to the v4 `rope_theta` / `rope_scaling` keys.

    transformers 5 writes `{"rope_parameters": {"rope_type": ..., "rope_theta": ..., ...}}` instead
    of top-level keys; hub checkpoints still use the v4 form. Mixtral/Qwen-MoE in v5 also write
    `num_local_experts`, which ModelConfig already reads.
    """
    params = cfg.get("rope_parameters")
    if not isinstance(params, dict):
        return cfg
    out = dict(cfg)
    if "rope_theta" in params and "rope_theta" not in out:
        out["rope_theta"] = params["rope_theta"]
    if params.get("rope_type", "default") != "default" and not out.get("rope_scaling"):
        out["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
    return out


def load_model_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a resolved model path (HF directory or .gguf file)."""
    path = Path(path)
    if path.is_dir():
        with open(path / "config.json") as f:
            return ModelConfig.from_hf_config(normalize_hf_config(json.load(f)))
    if is_gguf_file(path):
        return model_config_from_gguf(open_gguf(path))
    raise ValueError(f"cannot read a model config from {str(path)!r}: {EXPECTED}")


def iter_weights(path: str | Path, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, array) for every weight of the checkpoint, one tensor at a time.

    orbax (`save_model_dir` directories): restored to the host in one pass (the fast path is
    `rtp_jax.loader.fast.load_model_state`, which restores straight onto the devices).
    safetensors: stored dtype (bf16 as ml_dtypes.bfloat16), file by file in on-disk offset order.
    GGUF: float32 for quantized tensors (F16/BF16/F32 keep theirs), llama q/k un-permuted.
    `lm_head.weight` is skipped when `config.tie_word_embeddings` (the model reuses the embedding),
    as are rotary `inv_freq` buffers some old checkpoints carry.
    """
    path = Path(path)
    if is_orbax_checkpoint(path):
        source = iter_orbax_weights(path)
    elif path.is_dir():
        source = iter_safetensors(path)
    elif is_gguf_file(path):
        source = iter_gguf(path, config)
    else:
        raise ValueError(f"cannot read weights from {str(path)!r}: {EXPECTED}")
    for name, array in source:
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        yield name, array
