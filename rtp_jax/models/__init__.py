"""Model registry keyed by HF `architectures`."""

from __future__ import annotations

from flax import nnx

from rtp_jax.models.llama import LlamaForCausalLM

# Every dense family here is the Llama decoder with config flags; MoE families add the sparse block.
MODEL_REGISTRY: dict[str, type[nnx.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": LlamaForCausalLM,  # + models/moe.py SparseMoeBlock (cfg.is_moe)
    "Qwen3MoeForCausalLM": LlamaForCausalLM,
}


def get_model_class(architecture: str) -> type[nnx.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        supported = ", ".join(sorted(MODEL_REGISTRY))
        raise ValueError(
            f"model architecture {architecture!r} is not supported (supported: {supported})"
        ) from None
