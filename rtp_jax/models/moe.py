"""Sparse mixture-of-experts MLP (Mixtral, Qwen3-MoE), with expert parallelism over the "ep" mesh axis.

Parameters (NNX paths, used by the loader and the partition rules):
    mlp.gate.weight            [E, D]      router (HF name; Mixtral's `block_sparse_moe` is renamed `mlp`)
    mlp.experts.gate_proj      [E, I, D]   HF per-expert `experts.e.gate_proj.weight` (Mixtral `w1`), stacked
    mlp.experts.up_proj        [E, I, D]   ... `up_proj` (Mixtral `w3`)
    mlp.experts.down_proj      [E, D, I]   ... `down_proj` (Mixtral `w2`)
Experts keep HF's [out, in] layout; `rtp_jax.models.params` stacks the per-expert checkpoint tensors.

Routing is transformers': softmax (float32) over the router logits, top-k, renormalised when
`norm_topk_prob` (Mixtral always), weights cast back to the activation dtype.

Expert compute is a grouped matmul (`ragged_dot`): the (token, choice) pairs are sorted by expert so
each expert multiplies one contiguous group. Under a mesh with ep x tp > 1 it runs inside `shard_map`:
tokens are replicated, each device computes the pairs routed to its E/ep experts on its I/tp slice,
and one psum over ("ep", "tp") combines them (dispatch is free, combine is one all-reduce of [T, D]).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from rtp_jax.config import ModelConfig
from rtp_jax.models.llama import Module, init_weight
from sharding import compat


def route(router_logits: jax.Array, top_k: int, renormalize: bool, dtype: jnp.dtype
          ) -> tuple[jax.Array, jax.Array]:
    """router_logits [T, E] -> (weights [T, k] in `dtype`, expert ids int32[T, k])."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    weights, ids = jax.lax.top_k(probs, top_k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights.astype(dtype), ids.astype(jnp.int32)


def experts_forward(x: jax.Array, ids: jax.Array, weights: jax.Array, gate: jax.Array, up: jax.Array,
                    down: jax.Array, first_expert: jax.Array | int = 0) -> jax.Array:
    """SwiGLU experts [first_expert, first_expert + E_local) applied to the tokens routed to them.

    x [T, D]; ids, weights [T, k]; gate, up [E_local, I, D]; down [E_local, D, I].
    Returns float32 [T, D]: the weighted sum over this device's experts (pairs routed elsewhere add 0).
    """
    t, k = ids.shape
    num_local = gate.shape[0]
    local = ids.reshape(t * k) - first_expert
    mine = (local >= 0) & (local < num_local)
    group = jnp.where(mine, local, num_local)  # other devices' pairs sort last, past every group
    order = jnp.argsort(group, stable=True)
    token = order // k
    sizes = jnp.bincount(group, length=num_local + 1)[:num_local].astype(jnp.int32)
    xs = x[token]  # [T*k, D], grouped by expert
    h = jax.nn.silu(compat.ragged_dot_out_in(xs, gate, sizes)) * compat.ragged_dot_out_in(xs, up, sizes)
    y = compat.ragged_dot_out_in(h, down, sizes)  # [T*k, D]; rows past the groups are zero
    w = jnp.where(mine, weights.reshape(t * k), 0)[order]
    y = (y * w[:, None]).astype(jnp.float32)
    return jnp.zeros((t, x.shape[1]), jnp.float32).at[token].add(y)


def _sharded_experts(mesh: object, x: jax.Array, ids: jax.Array, weights: jax.Array, gate: jax.Array,
                     up: jax.Array, down: jax.Array) -> jax.Array:
    def body(x: jax.Array, ids: jax.Array, weights: jax.Array, gate: jax.Array, up: jax.Array,
             down: jax.Array) -> jax.Array:
        first = jax.lax.axis_index("ep") * gate.shape[0]
        return jax.lax.psum(experts_forward(x, ids, weights, gate, up, down, first), ("ep", "tp"))

    expert_in, expert_out = P("ep", "tp", None), P("ep", None, "tp")
    f = compat.shard_map(body, mesh, in_specs=(P(), P(), P(), expert_in, expert_in, expert_out),
                         out_specs=P())
    return f(x, ids, weights, gate, up, down)


class Experts(Module):
    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        e, i, d = cfg.num_experts, cfg.expert_intermediate_size, cfg.hidden_size
        self.gate_proj = nnx.Param(init_weight(rngs, (e, i, d), dtype))
        self.up_proj = nnx.Param(init_weight(rngs, (e, i, d), dtype))
        self.down_proj = nnx.Param(init_weight(rngs, (e, d, i), dtype))


class Router(Module):
    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        self.weight = nnx.Param(init_weight(rngs, (cfg.num_experts, cfg.hidden_size), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("td,ed->te", x, self.weight[...])


class SparseMoeBlock(Module):
    """x [T, D] -> [T, D]: route each token to top-k experts and sum their weighted outputs."""

    def __init__(self, cfg: ModelConfig, *, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        self.gate = Router(cfg, dtype=dtype, rngs=rngs)
        self.experts = Experts(cfg, dtype=dtype, rngs=rngs)
        self.top_k = cfg.num_experts_per_tok
        self.renormalize = cfg.norm_topk_prob

    def __call__(self, x: jax.Array) -> jax.Array:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize, x.dtype)
        ex = self.experts
        params = (ex.gate_proj[...], ex.up_proj[...], ex.down_proj[...])
        mesh = compat.current_mesh()  # set by the jitted step when the engine runs on a mesh
        if mesh is None or compat.axis_size(mesh, "ep") * compat.axis_size(mesh, "tp") == 1:
            out = experts_forward(x, ids, weights, *params)
        else:
            out = _sharded_experts(mesh, x, ids, weights, *params)
        return out.astype(x.dtype)
