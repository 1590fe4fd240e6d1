"""GGUF (llama.cpp) checkpoints: config from metadata, tensors renamed to HF names and dequantized.

llama.cpp stores a [out, in] matrix with GGUF shape [in, out] (ne0 is the fastest axis), so the
numpy view, which reverses the shape, is already HF's [out, in]. For the `llama` architecture its
converter also permutes the rows of q and k (see `permute_rope_rows`) so that rotary pairs sit
next to each other (GPT-J style); our models use HF's rotate-half layout, so we undo that.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from rtp_jax.config import ModelConfig, RopeScaling

# GGUF architecture -> HF `architectures[0]` (dense variant; MoE variants are chosen by expert_count).
_ARCHS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
}
# Architectures whose q/k rows llama.cpp's converter permutes (Qwen keeps HF's NEOX layout).
_PERMUTED_ARCHS = ("llama",)

# llama.cpp per-layer tensor stem -> HF module path under `model.layers.N.`.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Stacked expert tensors [n_experts, out, in] -> per-expert HF names, per MoE family.
_EXPERT_NAMES = {
    "MixtralForCausalLM": (
        "block_sparse_moe", {"ffn_gate_exps": "w1", "ffn_down_exps": "w2", "ffn_up_exps": "w3"}
    ),
    "Qwen3MoeForCausalLM": (
        "mlp", {"ffn_gate_exps": "gate_proj", "ffn_down_exps": "down_proj", "ffn_up_exps": "up_proj"}
    ),
}
# Tensors that carry nothing our models need: rope_freqs is llama3 rope scaling precomputed
# per frequency (we recompute it from the config).
_SKIPPED = ("rope_freqs.weight",)


def open_gguf(path: str | Path) -> GGUFReader:
    """Opens a GGUF file (memory-mapped; tensors are read on access).

    Parsing the metadata takes seconds for a 50k-token vocab (gguf's reader is pure Python), and
    start-up reads config, tokenizer and weights from the same file, so readers are cached per
    (path, size, mtime). The cache holds only the mapping, never dequantized weights.
    """
    p = Path(path).resolve()
    try:
        st = p.stat()
        return _open_gguf_cached(str(p), st.st_size, st.st_mtime_ns)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from e


@lru_cache(maxsize=4)
def _open_gguf_cached(path: str, size: int, mtime_ns: int) -> GGUFReader:
    del size, mtime_ns  # cache key only: a rewritten file is parsed again
    return GGUFReader(path, "r")


def gguf_field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """One metadata value (scalar, string or list), or `default` when the key is absent."""
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _f32_to_float(x: float) -> float:
    """GGUF stores floats as float32: 1e-5 reads back as 9.9999997e-06; take the shortest float32 repr."""
    return float(str(np.float32(x)))


def model_config_from_gguf(reader: GGUFReader) -> ModelConfig:
    """Builds a ModelConfig from GGUF metadata (llama, qwen2, qwen3, qwen3moe; llama + experts = Mixtral)."""
    arch = gguf_field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} is not supported (expected one of {sorted(_ARCHS)})")
    tensor_names = {t.name for t in reader.tensors}

    def get(key: str, default: Any = None) -> Any:
        return gguf_field(reader, f"{arch}.{key}", default)

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer list in some converters; uniform for the archs we load
        kv_heads = kv_heads[0]
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // heads
    tokens = reader.get_field("tokenizer.ggml.tokens")
    vocab = get("vocab_size") or (len(tokens.data) if tokens is not None else None)
    if vocab is None:
        vocab = int(next(t for t in reader.tensors if t.name == "token_embd.weight").shape[1])
    n_experts = int(get("expert_count", 0) or 0)
    architecture = _ARCHS[arch]
    if arch == "llama" and n_experts:
        architecture = "MixtralForCausalLM"
    rope_scaling = None
    if get("rope.scaling.type") == "linear":
        rope_scaling = RopeScaling(rope_type="linear", factor=float(get("rope.scaling.factor", 1.0)))
    eos = gguf_field(reader, "tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=architecture,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length", 0) or 0),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        rms_norm_eps=_f32_to_float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32_to_float(get("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(get("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias=any(n.endswith("attn_q.bias") for n in tensor_names),
        qk_norm=any(n.endswith("attn_q_norm.weight") for n in tensor_names),
        sliding_window=get("attention.sliding_window"),
        num_experts=n_experts,
        num_experts_per_tok=int(get("expert_used_count", 0) or 0),
        moe_intermediate_size=int(get("expert_feed_forward_length", 0) or 0),
        bos_token_id=gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's `permute` from convert_hf_to_gguf.py: rows [n_heads*head_dim, ...] per head go from
    rotate-half order (x0..x{d/2-1}, y0..) to interleaved pairs (x0, y0, x1, y1, ...)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `permute_rope_rows`: rows [n_heads*head_dim, ...] back to HF's rotate-half order."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_to_numpy(tensor: Any) -> np.ndarray:
    """A GGUF ReaderTensor as a fresh numpy array in numpy (= HF) axis order.

    F32/F16/BF16 keep their dtype; quantized types are dequantized to float32.
    """
    shape = tuple(int(d) for d in reversed(tensor.shape))
    qtype = tensor.tensor_type
    if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return np.array(tensor.data).reshape(shape)
    if qtype == GGMLQuantizationType.BF16:
        return np.array(tensor.data).view(np.uint8).view(ml_dtypes.bfloat16).reshape(shape)
    return dequantize(tensor.data, qtype).reshape(shape)


def hf_names(gguf_name: str, architecture: str) -> str | tuple[str, str] | None:
    """Maps a llama.cpp tensor name to its HF name.

    Returns the HF name, or `(prefix, suffix)` for a stacked expert tensor (expert e is
    `f"{prefix}.{e}.{suffix}"`), or None for tensors we skip. Unknown names raise.
    """
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name in _SKIPPED:
        return None
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk":
        _, layer, stem, kind = parts
        prefix = f"model.layers.{layer}"
        if stem in _LAYER_NAMES:
            return f"{prefix}.{_LAYER_NAMES[stem]}.{kind}"
        if architecture in _EXPERT_NAMES:
            block, experts = _EXPERT_NAMES[architecture]
            if stem == "ffn_gate_inp":
                return f"{prefix}.{block}.gate.{kind}"
            if stem in experts:
                return f"{prefix}.{block}.experts", f"{experts[stem]}.{kind}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no HF equivalent for {architecture}")


def iter_gguf(path: str | Path, config: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF name, array) for every tensor of a GGUF file, in file order.

    Arrays are HF layout ([out, in] for projections, [n_experts] split out per expert); q/k rows are
    un-permuted for `llama`-architecture files. A tied lm_head is not yielded (there is none to yield).
    """
    reader = open_gguf(path)
    arch = gguf_field(reader, "general.architecture")
    for tensor in reader.tensors:
        name = hf_names(tensor.name, config.architecture)
        if name is None:
            continue
        array = tensor_to_numpy(tensor)
        if isinstance(name, tuple):
            prefix, suffix = name
            for e in range(array.shape[0]):
                yield f"{prefix}.{e}.{suffix}", array[e]
            continue
        if arch in _PERMUTED_ARCHS:
            if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
                array = unpermute_rope_rows(array, config.num_heads)
            elif name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias"):
                array = unpermute_rope_rows(array, config.num_kv_heads)
        yield name, array
