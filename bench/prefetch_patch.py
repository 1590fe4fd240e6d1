"""Probe patch (bench/probe_decode_variants.py, variant "prefetch:o=1+gu=0.15+dn=0.05+qkv=0.3"): the Llama
forward with each GEMM's weights (or the first share of their rows) read on a second CUDA stream from the
moment the previous GEMM's output exists, while the small kernels between them run; the GEMM waits for that
read (see bench/probe_prefetch.py for the idea on its own). Dense Llama layers only; a probe, not the model.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from rtp_jax.models.llama import LlamaForCausalLM, kv_writer
from rtp_jax.models.rope import apply_rope, rope_tables


def _reader() -> Any:
    from probe_prefetch import on_stream

    return on_stream(lambda w: jnp.max(w, axis=-1), 1)


def start(w: jax.Array, after: jax.Array, share: float) -> jax.Array | None:
    """Reads the first `share` of w's rows (as [rows, last dim]) on stream 1 once `after` exists."""
    if share <= 0:
        return None
    flat = w.reshape(-1, w.shape[-1])
    rows = max(1, int(flat.shape[0] * share))
    w_start, _ = lax.optimization_barrier((flat, after))
    return _reader()(w_start[:rows])


def wait(x: jax.Array, token: jax.Array | None) -> jax.Array:
    """x (a GEMM's activation input), usable only after the read `token` came from."""
    if token is None:
        return x
    from probe_prefetch import after_read

    return after_read(x, token)


def patch(spec: str) -> dict[str, float]:
    """Installs the prefetching forward; spec "o=1+gu=0.15+dn=0.05+qkv=0.3" (shares, 0 or absent: none)."""
    shares = {k: 0.0 for k in ("o", "gu", "dn", "qkv")}
    for part in filter(None, spec.split("+")):
        k, v = part.split("=")
        shares[k] = float(v)

    def forward(self: LlamaForCausalLM, input_ids: jax.Array, positions: jax.Array, kv_caches: list[Any],
                md: Any, attn_fn: Any) -> tuple[jax.Array, list[Any]]:
        cfg = self.config
        x = self.model.embed_tokens(input_ids)
        inv_freq = jnp.asarray(rope_tables(cfg))
        t = x.shape[0]
        new_caches, tok_qkv = [], None
        layers = list(self.model.layers)
        for i, (layer, kv) in enumerate(zip(layers, kv_caches, strict=True)):
            at = layer.self_attn
            h = layer.input_layernorm(x)
            w_qkv = at.qkv_proj.weight[...]
            nkv, group2, hd, _ = w_qkv.shape
            qkv = jnp.einsum("td,kghd->tkgh", wait(h, tok_qkv), w_qkv)
            if at.qkv_proj.bias is not None:
                qkv = qkv + at.qkv_proj.bias[...]
            w_o = at.o_proj.weight[...]
            tok_o = start(w_o, qkv, shares["o"])
            q = qkv[:, :, : group2 - 2].reshape(t, nkv * (group2 - 2), hd)
            k, v = qkv[:, :, group2 - 2], qkv[:, :, group2 - 1]
            if at.q_norm is not None:
                q, k = at.q_norm(q), at.k_norm(k)
            q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
            k_cache, v_cache = kv_writer(attn_fn)(kv[0], kv[1], k, v, md.slot_mapping)
            o = attn_fn(q, k_cache, v_cache, md, sm_scale=cfg.head_dim**-0.5,
                        sliding_window=cfg.sliding_window, soft_cap=None, new_kv=(k, v))
            attn_out = jnp.einsum("ti,oi->to", wait(o.reshape(t, cfg.num_heads * hd), tok_o), w_o)
            x = x + attn_out
            mlp = layer.mlp
            w_gu = mlp.gate_up_proj.weight[...]
            tok_gu = start(w_gu, attn_out, shares["gu"])
            h = layer.post_attention_layernorm(x)
            gu = jnp.einsum("td,gid->tgi", wait(h, tok_gu), w_gu)
            w_dn = mlp.down_proj.weight[...]
            tok_dn = start(w_dn, gu, shares["dn"])
            down = jnp.einsum("ti,oi->to", wait(jax.nn.silu(gu[:, 0]) * gu[:, 1], tok_dn), w_dn)
            x = x + down
            tok_qkv = (start(layers[i + 1].self_attn.qkv_proj.weight[...], down, shares["qkv"])
                       if i + 1 < len(layers) else None)
            new_caches.append((k_cache, v_cache))
        return self.model.norm(x), new_caches

    LlamaForCausalLM.__call__ = forward  # type: ignore[method-assign]
    return shares
