"""The jitted step: model forward over a ragged batch, logits where needed, sampling on device.

Engine contract (one call per scheduler step):
    takes   the model state (read-only), the per-layer KV caches (DONATED: the caller must drop its
            references and use the returned ones), `StepInputs` and `SamplingTensors` (fresh per step)
    returns (new KV caches, `StepOutputs`), all on device; the host reads the outputs it needs.
Static arguments (`SamplingFlags`, prompt top-k) select which program runs; the shapes of the inputs are
padded to buckets by the runner so only a handful of programs ever compile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from rtp_jax.engine.sampler import SamplingFlags, SamplingTensors, compute_logprobs, sample
from rtp_jax.models.attention import AttentionFn, AttentionMetadata

KVCaches = list[tuple[jax.Array, jax.Array]]


class StepInputs(NamedTuple):
    """input_ids, positions: int32[T]; sample_idx: int32[S] (last token of each sequence);
    prompt_lp_idx, prompt_lp_targets: int32[N] (token positions whose next prompt token is scored)."""

    input_ids: jax.Array
    positions: jax.Array
    md: AttentionMetadata
    sample_idx: jax.Array
    prompt_lp_idx: jax.Array
    prompt_lp_targets: jax.Array


class Logprobs(NamedTuple):
    """target: f32[N]; rank: int32[N]; top_ids: int32[N, k]; top: f32[N, k]."""

    target: jax.Array
    rank: jax.Array
    top_ids: jax.Array
    top: jax.Array


class StepOutputs(NamedTuple):
    tokens: jax.Array  # int32[S]
    logprobs: Logprobs | None  # of the sampled tokens, when any request asked
    prompt_logprobs: Logprobs | None  # of the prompt targets, when N > 0


def _logprobs(logits: jax.Array, targets: jax.Array, num_top: int) -> Logprobs:
    return Logprobs(*compute_logprobs(logits, targets, num_top))


def make_step_fn(graphdef: nnx.GraphDef, attn_fn: AttentionFn) -> Callable[..., Any]:
    """Returns the jitted step. Flax stays out of the hot loop: the model is re-assembled from its
    state arrays at trace time only, so each call is a plain jitted function of arrays."""

    def step(state: nnx.State, kv_caches: KVCaches, inp: StepInputs, st: SamplingTensors,
             flags: SamplingFlags, prompt_top: int) -> tuple[KVCaches, StepOutputs]:
        model = nnx.merge(graphdef, state)
        hidden, kv_caches = model(inp.input_ids, inp.positions, kv_caches, inp.md, attn_fn)
        logits = model.compute_logits(hidden[inp.sample_idx])  # [S, V] f32
        tokens = sample(logits, st, flags)
        lp = _logprobs(logits, tokens, flags.num_logprobs) if flags.needs_logprobs else None
        plp = None
        if inp.prompt_lp_idx.shape[0] > 0:
            plogits = model.compute_logits(hidden[inp.prompt_lp_idx])
            plp = _logprobs(plogits, inp.prompt_lp_targets, prompt_top)
        return kv_caches, StepOutputs(tokens, lp, plp)

    return jax.jit(step, static_argnums=(4, 5), donate_argnums=(1,))


def allocate_kv_caches(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int, dtype: jnp.dtype, sharding: Any = None) -> KVCaches:
    """One (k, v) pair per layer, each [num_blocks, block_size, kv_heads, head_dim], as separate buffers
    so the donated step updates each in place."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)

    def zeros() -> jax.Array:
        return jnp.zeros(shape, dtype, device=sharding)

    return [(zeros(), zeros()) for _ in range(num_layers)]
