"""Tiny model configs and layout helpers shared by the multi-device tests (fixtures: conftest.py)."""

from __future__ import annotations

import numpy as np

from rtp_jax.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig

# 8 heads / 2 kv heads: tp 2 splits the kv heads, tp 4 and 8 replicate them.
DENSE = ModelConfig("LlamaForCausalLM", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                    num_heads=8, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6)
MOE = ModelConfig("Qwen3MoeForCausalLM", vocab_size=256, hidden_size=64, intermediate_size=0, num_layers=2,
                  num_heads=8, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6, qk_norm=True, num_experts=8,
                  num_experts_per_tok=2, moe_intermediate_size=32)

# Three prompts; a token budget of 16 splits the long one across steps (chunked prefill), so
# pipeline microbatches cut through sequences.
PROMPTS = ([5, 9, 33, 2, 7], list(range(40, 51)), list(range(100, 120)))
MAX_TOKENS = 3

Result = tuple[list[list[int]], list[np.ndarray]]


def layout(spec: str) -> ParallelConfig:
    """"dp2-pp2-ep1-tp2" style (missing axes are 1) -> ParallelConfig."""
    sizes = {part[:2]: int(part[2:]) for part in spec.split("-")}
    return ParallelConfig(sizes.get("dp", 1), sizes.get("pp", 1), sizes.get("ep", 1), sizes.get("tp", 1))


def engine_config(model: ModelConfig, pc: ParallelConfig) -> EngineConfig:
    return EngineConfig(model=model, cache=CacheConfig(block_size=4, num_blocks=48),
                        scheduler=SchedulerConfig(max_model_len=64, max_num_batched_tokens=16,
                                                  max_num_seqs=4),
                        parallel=pc, dtype="float32", attention_backend="reference")
