"""Tiny random-weight HF checkpoints (config + safetensors + tokenizer) for tests.

    path = write_tiny_hf_model(tmp_path / "llama", "llama")
    model = transformers.AutoModelForCausalLM.from_pretrained(path)   # reference outputs

Every family: hidden 64, 2 layers, 4 heads / 2 kv heads, vocab 512, intermediate 128,
max_position_embeddings 512. The tokenizer is a byte-level BPE trained on a fixed text with
exactly 512 tokens; ids 0..2 are <|endoftext|>, <|im_start|>, <|im_end|> (ChatML).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

FAMILIES = ("llama", "llama2", "mistral", "qwen2", "qwen3", "qwen3_moe", "mixtral")

VOCAB_SIZE = 512
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_ID, EOS_ID = 0, 2  # <|endoftext|> doubles as BOS (as in SmolLM2 / Qwen); <|im_end|> ends a turn

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_TINY = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
)


def _config(family: str) -> Any:
    """The transformers config of one tiny family."""
    import transformers

    if family == "llama":
        return transformers.LlamaConfig(
            **_TINY, rope_theta=500000.0, tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
        )
    if family == "llama2":
        return transformers.LlamaConfig(**_TINY, rope_theta=10000.0, rms_norm_eps=1e-5)
    if family == "mistral":
        return transformers.MistralConfig(**_TINY, sliding_window=16, rope_theta=1000000.0)
    if family == "qwen2":
        return transformers.Qwen2Config(**_TINY, tie_word_embeddings=True, rope_theta=1000000.0)
    if family == "qwen3":
        return transformers.Qwen3Config(**_TINY, head_dim=32, rope_theta=1000000.0)
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **_TINY, head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            decoder_sparse_step=1, norm_topk_prob=True,
        )
    if family == "mixtral":
        return transformers.MixtralConfig(**_TINY, num_local_experts=4, num_experts_per_tok=2)
    raise ValueError(f"unknown tiny family {family!r} (expected one of {FAMILIES})")


def _training_text() -> str:
    """A fixed pseudo-language plus some English, digits, CJK and emoji; enough merges for 512 tokens."""
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "be", "da",
                 "fu", "gi", "ho", "ja", "ze", "qu", "ix", "or", "an", "el"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    extra = "The quick brown fox jumps over the lazy dog. Hello world! 0123456789 你好世界 🙂🚀"
    return " ".join(words) + " " + extra


def write_tiny_tokenizer(directory: Path) -> None:
    """Writes tokenizer.json (byte-level BPE, 512 tokens) and tokenizer_config.json (ChatML)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([_training_text()] * 3, trainer)
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise AssertionError(f"tiny tokenizer has {tok.get_vocab_size()} tokens, wanted {VOCAB_SIZE}")
    tok.save(str(directory / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID],
        "pad_token": SPECIAL_TOKENS[0],
        "unk_token": None,
        "add_bos_token": False,
        "chat_template": CHATML_TEMPLATE,
        "model_max_length": 512,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))


def _randomize(model: Any, seed: int) -> None:
    """Random projections (std 0.02) and norms around 1, so a swapped or mis-mapped weight shows."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.02 * noise)


def write_tiny_hf_model(
    directory: str | Path, family: str, seed: int = 0, dtype: str = "float32", sharded: bool = False
) -> Path:
    """Writes a tiny random model of `family` in HF format to `directory`; returns the directory.

    Files: config.json, model.safetensors (or model-0000k-of-0000n.safetensors plus
    model.safetensors.index.json when `sharded`), generation_config.json (eos_token_id [2, 0]),
    tokenizer.json, tokenizer_config.json. dtype is "float32", "bfloat16" or "float16".
    """
    import torch
    import transformers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = _config(family)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    _randomize(model, seed)
    model = model.to(getattr(torch, dtype)).eval()
    # A small shard size puts each large tensor (embedding, MoE layers) in its own file.
    model.save_pretrained(directory, max_shard_size="100KB" if sharded else "10GB")
    gen = {"bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, 0]}
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2))
    write_tiny_tokenizer(directory)
    return directory


# --- the same tiny models as GGUF files (as llama.cpp's convert_hf_to_gguf.py would write them) ----

_GGUF_ARCH = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "MixtralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3moe",
}
_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp", "block_sparse_moe.gate": "ffn_gate_inp",
}
_EXPERT_TO_GGUF = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps",
                   "w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}


def _llama_cpp_permute(w: Any, n_head: int) -> Any:
    """convert_hf_to_gguf.py's `permute`, written out independently of rtp_jax for the round trip."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_to_gguf_tensors(weights: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """HF-named float arrays -> llama.cpp-named arrays (q/k permuted for `llama`, experts stacked)."""
    import re

    import numpy as np

    arch = _GGUF_ARCH[config["architectures"][0]]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    out: dict[str, Any] = {}
    experts: dict[tuple[str, str], dict[int, Any]] = {}
    for name, w in weights.items():
        w = np.asarray(w, dtype=np.float32)
        if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            out[{"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}[name]] = w
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.experts\.(\d+)\.(\w+)\.weight", name)
        if m:
            experts.setdefault((m[1], _EXPERT_TO_GGUF[m[4]]), {})[int(m[3])] = w
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        layer, module, kind = m[1], m[2], m[3]
        if arch == "llama" and module == "self_attn.q_proj":
            w = _llama_cpp_permute(w, heads)
        elif arch == "llama" and module == "self_attn.k_proj":
            w = _llama_cpp_permute(w, kv_heads)
        out[f"blk.{layer}.{_TO_GGUF[module]}.{kind}"] = w
    for (layer, stem), per_expert in experts.items():
        out[f"blk.{layer}.{stem}.weight"] = np.stack([per_expert[e] for e in sorted(per_expert)])
    return out


def write_tiny_gguf(hf_dir: str | Path, path: str | Path) -> Path:
    """Writes the tiny HF model in `hf_dir` as an F32 GGUF file with its tokenizer; returns `path`."""
    import gguf
    from safetensors.torch import load_file

    hf_dir, path = Path(hf_dir), Path(path)
    config = json.loads((hf_dir / "config.json").read_text())
    arch = _GGUF_ARCH[config["architectures"][0]]
    weights: dict[str, Any] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        weights.update({k: v.float().numpy() for k, v in load_file(f).items()})
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    rope = config.get("rope_parameters") or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(config["vocab_size"])
    n_experts = config.get("num_local_experts") or config.get("num_experts") or 0
    if n_experts:
        w.add_expert_count(n_experts)
        w.add_expert_used_count(config["num_experts_per_tok"])
        if config.get("moe_intermediate_size"):
            w.add_expert_feed_forward_length(config["moe_intermediate_size"])
    _add_gguf_tokenizer(w, hf_dir)
    for name, array in hf_to_gguf_tensors(weights, config).items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add_gguf_tokenizer(w: Any, hf_dir: Path) -> None:
    """tokenizer.ggml.* metadata from the tiny tokenizer.json (byte-level BPE, pre-tokenizer gpt2)."""
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab: dict[str, int] = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tok["added_tokens"] if a["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)
