"""Writes a random-weight HF Llama checkpoint (config, safetensors shards, index, word-level tokenizer) fast.

    python3 bench/synth_ckpt.py /var/tmp/llama3-8b --shape llama3-8b     # ~16 GB, 4 files
    python3 bench/synth_ckpt.py /tmp/small --shape small                 # a few hundred MB, for CPU runs

Values are bf16 with random sign and mantissa and a fixed exponent (|x| in [2^-7, 2^-6), std ~0.011);
norm weights are 1.0. Bytes come from a 64 MiB random pool read at a different offset for each tensor,
so writing is disk-bound, not RNG-bound.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np

SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, num_files=4),
    "small": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=32000, num_files=2),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, num_files=2),
}


def hf_config(shape: dict[str, Any]) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
        "hidden_size": shape["hidden_size"], "intermediate_size": shape["intermediate_size"],
        "num_hidden_layers": shape["num_hidden_layers"], "num_attention_heads": shape["num_attention_heads"],
        "num_key_value_heads": shape["num_key_value_heads"], "vocab_size": shape["vocab_size"],
        "head_dim": shape["hidden_size"] // shape["num_attention_heads"],
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False,
    }


def tensor_list(shape: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor in HF order (embedding, layers, final norm, lm_head)."""
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    hd = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, h))]
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        out += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.self_attn.q_proj.weight", (h, h)),
                (f"{p}.self_attn.k_proj.weight", (kv, h)), (f"{p}.self_attn.v_proj.weight", (kv, h)),
                (f"{p}.self_attn.o_proj.weight", (h, h)), (f"{p}.post_attention_layernorm.weight", (h,)),
                (f"{p}.mlp.gate_proj.weight", (i, h)), (f"{p}.mlp.up_proj.weight", (i, h)),
                (f"{p}.mlp.down_proj.weight", (h, i))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer over tokens "t0".."t{V-1}" (ids decode to text; nothing else matters here)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "t1", "eos_token": "t2",
         "add_bos_token": False, "model_max_length": 8192}))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))


def write_checkpoint(directory: str | Path, shape_name: str = "llama3-8b", seed: int = 0,
                     fsync: bool = True) -> dict[str, Any]:
    """Writes the checkpoint unless `directory/.complete` exists; returns {bytes, seconds, files}."""
    directory = Path(directory)
    if (directory / ".complete").is_file():
        return json.loads((directory / ".complete").read_text())
    directory.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[shape_name]
    tensors = tensor_list(shape)
    sizes = [int(np.prod(s)) * 2 for _, s in tensors]
    total = sum(sizes)
    n_files = shape["num_files"]
    groups: list[list[int]] = [[] for _ in range(n_files)]
    acc = 0
    for k, size in enumerate(sizes):  # contiguous runs of ~total / n_files bytes
        groups[min(n_files - 1, acc * n_files // total)].append(k)
        acc += size
    rng = np.random.default_rng(seed)
    pool_n = 32 << 20  # bf16 values: 64 MiB
    bits = rng.integers(0, 1 << 16, pool_n, dtype=np.uint16)
    pool = ((bits & np.uint16(0x807F)) | np.uint16(0x3C00)).view(np.uint8)  # sign | exp 120 | mantissa
    one = np.full(max(s[0] for _, s in tensors if len(s) == 1), 0x3F80, np.uint16).view(np.uint8)
    t0 = time.perf_counter()
    weight_map: dict[str, str] = {}
    offset_rng = np.random.default_rng(seed + 1)
    for g, idx in enumerate(groups):
        fname = f"model-{g + 1:05d}-of-{n_files:05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        off = 0
        for k in idx:
            name, shp = tensors[k]
            header[name] = {"dtype": "BF16", "shape": list(shp), "data_offsets": [off, off + sizes[k]]}
            off += sizes[k]
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        fd = os.open(directory / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, struct.pack("<Q", len(raw)) + raw)
            for k in idx:
                name, shp = tensors[k]
                n = sizes[k]
                if len(shp) == 1:
                    os.write(fd, one[:n].tobytes())
                    continue
                done = 0
                while done < n:
                    start = int(offset_rng.integers(0, len(pool) // 2)) & ~1
                    m = min(n - done, len(pool) - start)
                    done += os.write(fd, memoryview(pool)[start:start + m])
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(hf_config(shape), indent=2))
    write_tokenizer(directory, shape["vocab_size"])
    info = {"bytes": total, "seconds": time.perf_counter() - t0, "files": n_files, "shape": shape_name}
    (directory / ".complete").write_text(json.dumps(info))
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory")
    p.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    p.add_argument("--no-fsync", action="store_true")
    ns = p.parse_args()
    info = write_checkpoint(ns.directory, ns.shape, fsync=not ns.no_fsync)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
