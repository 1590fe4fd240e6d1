"""The jitted step: model forward over a ragged batch, logits where needed, sampling on device.

Engine contract (one call per scheduler step):
    takes   the model state (read-only), the per-layer KV caches (DONATED: the caller must drop its
            references and use the returned ones), `StepInputs` and `SamplingTensors` (fresh per step)
    returns (new KV caches, `StepOutputs`), all on device; the host reads the outputs it needs.
Static arguments (`SamplingFlags`, prompt top-k) select which program runs; the shapes of the inputs are
padded to buckets by the runner so only a handful of programs ever compile.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rtp_jax.engine.packing import PackSpec, pack, unpack
from rtp_jax.engine.sampler import SamplingFlags, SamplingTensors, compute_logprobs, sample
from rtp_jax.models.attention import AttentionFn, AttentionMetadata
from rtp_jax.models.llama import layer_caller
from rtp_jax.models.residual import resolve
from rtp_jax.models.rope import rope_tables
from sharding import compat
from sharding.pipeline import microbatch_metadata, num_microbatches, token_slice

KVCaches = list[tuple[jax.Array, jax.Array]]


class StepInputs(NamedTuple):
    """input_ids, positions: int32[T]; sample_idx: int32[S] (last token of each sequence);
    prompt_lp_idx, prompt_lp_targets: int32[N] (token positions whose next prompt token is scored);
    feed_rows: int32[T], the row of `last_tokens` that holds the token, for tokens sampled by the
    previous step and not known on the host (-1: use input_ids); seq_rows: int32[S], the row each
    sequence's sampled token is written to (out of range: not kept)."""

    input_ids: jax.Array
    positions: jax.Array
    md: AttentionMetadata
    sample_idx: jax.Array
    prompt_lp_idx: jax.Array
    prompt_lp_targets: jax.Array
    feed_rows: jax.Array
    seq_rows: jax.Array


def feed_tokens(inp: StepInputs, last_tokens: jax.Array) -> jax.Array:
    """input_ids with the tokens the previous step left on the device filled in. last_tokens: int32[R]."""
    from_device = last_tokens[jnp.clip(inp.feed_rows, 0, last_tokens.shape[0] - 1)]
    return jnp.where(inp.feed_rows >= 0, from_device, inp.input_ids)


def keep_tokens(last_tokens: jax.Array, seq_rows: jax.Array, tokens: jax.Array) -> jax.Array:
    """Writes each sequence's sampled token (tokens: int32[S]) to its row; padded rows are dropped."""
    return last_tokens.at[seq_rows].set(tokens, mode="drop")


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


def _sample_outputs(model: Any, hidden: jax.Array, inp: StepInputs, st: SamplingTensors,
                    flags: SamplingFlags, prompt_top: int) -> StepOutputs:
    """lm_head at the sampled (and prompt-scored) positions, then sampling and logprobs."""
    logits = model.compute_logits(hidden[inp.sample_idx])  # [S, V] f32
    tokens = sample(logits, st, flags)
    lp = _logprobs(logits, tokens, flags.num_logprobs) if flags.needs_logprobs else None
    plp = None
    if inp.prompt_lp_idx.shape[0] > 0:
        plogits = model.compute_logits(hidden[inp.prompt_lp_idx])
        plp = _logprobs(plogits, inp.prompt_lp_targets, prompt_top)
    return StepOutputs(tokens, lp, plp)


def _constrain(kv_caches: KVCaches, shardings: Sequence[Any] | None) -> KVCaches:
    """Pins each new cache to its input sharding, so the donated buffer is updated in place."""
    if shardings is None:
        return kv_caches
    return [(jax.lax.with_sharding_constraint(k, s), jax.lax.with_sharding_constraint(v, s))
            for (k, v), s in zip(kv_caches, shardings, strict=True)]


def _on_mesh(fn: Callable[..., Any], mesh: Any) -> Callable[..., Any]:
    """Calls (and so traces) `fn` with `mesh` as the context mesh: the MoE block reads it to decide
    whether to shard experts over ("ep", "tp")."""
    if mesh is None:
        return fn

    def call(*args: Any) -> Any:
        with compat.use_mesh(mesh):
            return fn(*args)

    return call


# Step programs over at least this many tokens use cuBLAS for every GEMM instead of the Triton GEMMs XLA's
# autotuner picks (H200, Llama-3-8B step, bench/probe_programs.py: 2-6% faster at 1024-4096 tokens, 5%
# slower at 512). XLA options are per program, so decode steps keep Triton's small-batch GEMMs.
CUBLAS_MIN_TOKENS = 1024


def compiler_options(num_tokens: int) -> dict[str, Any]:
    """XLA options of the step program over `num_tokens` (padded) tokens; GPU-only keys, inert elsewhere."""
    return {"xla_gpu_enable_triton_gemm": False} if num_tokens >= CUBLAS_MIN_TOKENS else {}


class PackedStep:
    """A jitted step `fn(leaves, kv, last_tokens, ibuf, fbuf, spec, flags, extra)` (kv and last_tokens
    donated; spec, flags, extra static), called as `step(leaves, kv, last_tokens, inputs, sampling, flags,
    extra)`: the host arrays are packed first. The XLA options come from `compiler_options(T)`.

    `compile(...)` builds the program for one input shape ahead of time (`jit(...).lower().compile()`,
    thread-safe, no execution); calls whose (layout, flags, extra) were compiled that way skip tracing.
    """

    def __init__(self, fn: Callable[..., Any], mesh: Any) -> None:
        self._fn = fn
        self._jits: dict[tuple[tuple[str, Any], ...], Any] = {}
        self._mesh = mesh
        self._compiled: dict[tuple[PackSpec, SamplingFlags, int], Any] = {}

    def _jitted(self, num_tokens: int) -> Any:
        opts = compiler_options(num_tokens)
        key = tuple(sorted(opts.items()))
        jitted = self._jits.get(key)
        if jitted is None:
            jitted = self._jits[key] = jax.jit(self._fn, static_argnums=(5, 6, 7), donate_argnums=(1, 2),
                                               compiler_options=opts or None)
        return jitted

    def __call__(self, leaves: list[jax.Array], kv_caches: KVCaches, last_tokens: jax.Array,
                 inp: StepInputs, st: SamplingTensors, flags: SamplingFlags, extra: int) -> Any:
        ibuf, fbuf, spec = pack((inp, st))
        compiled = self._compiled.get((spec, flags, extra))
        if compiled is not None:
            return compiled(leaves, kv_caches, last_tokens, ibuf, fbuf)
        jitted = self._jitted(inp.input_ids.shape[0])
        return _on_mesh(jitted, self._mesh)(leaves, kv_caches, last_tokens, ibuf, fbuf, spec, flags, extra)

    def compile(self, leaves: list[jax.Array], kv_caches: KVCaches, last_tokens: jax.Array,
                inp: StepInputs, st: SamplingTensors, flags: SamplingFlags, extra: int) -> bool:
        """Compiles the program these inputs' shapes select; False when it already was."""
        ibuf, fbuf, spec = pack((inp, st))
        key = (spec, flags, extra)
        if key in self._compiled:
            return False
        lower = _on_mesh(self._jitted(inp.input_ids.shape[0]).lower, self._mesh)
        self._compiled[key] = lower(leaves, kv_caches, last_tokens, ibuf, fbuf, spec, flags, extra).compile()
        return True


def make_step_fn(graphdef: nnx.GraphDef, treedef: Any, attn_fn: AttentionFn, mesh: Any = None,
                 kv_shardings: Sequence[Any] | None = None) -> Callable[..., Any]:
    """Returns the step: `step(state_leaves, kv_caches, last_tokens, inputs, sampling, flags, prompt_top)`
    -> (kv_caches, last_tokens, StepOutputs).

    Flax stays out of the hot loop: the state is passed as its flat list of arrays (`treedef` rebuilds
    it at trace time), and the host inputs travel as two packed buffers (`packing`), so a call costs
    one small pytree flatten and two copies. On a mesh the state and caches arrive sharded; XLA
    partitions the step from their shardings (and inserts the tensor-parallel all-reduces);
    `attn_fn` is already wrapped per tp shard.
    """

    def step(leaves: list[jax.Array], kv_caches: KVCaches, last_tokens: jax.Array, ibuf: jax.Array,
             fbuf: jax.Array, spec: PackSpec, flags: SamplingFlags,
             prompt_top: int) -> tuple[KVCaches, jax.Array, StepOutputs]:
        inp, st = unpack(ibuf, fbuf, spec)
        model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        hidden, kv_caches = model(feed_tokens(inp, last_tokens), inp.positions, kv_caches, inp.md, attn_fn)
        out = _sample_outputs(model, hidden, inp, st, flags, prompt_top)
        return _constrain(kv_caches, kv_shardings), keep_tokens(last_tokens, inp.seq_rows, out.tokens), out

    return PackedStep(step, mesh)


class DecodeOutputs(NamedTuple):
    tokens: jax.Array  # int32[K, S]
    logprobs: Logprobs | None  # each field [K, S, ...]


def make_decode_fn(graphdef: nnx.GraphDef, treedef: Any, attn_fn: AttentionFn, mesh: Any = None,
                   kv_shardings: Sequence[Any] | None = None) -> Callable[..., Any]:
    """Returns `decode(state_leaves, kv_caches, last_tokens, inputs, sampling, flags, num_steps)` ->
    (kv_caches, last_tokens, DecodeOutputs): K decode steps of a pure-decode batch in one call, each step
    feeding its sampled tokens to the next on device.

    `inputs` holds one token per sequence (row s is sequence s, so T == S) and block tables wide
    enough for K more tokens. Step i samples with key step `sampling.step + i`, exactly as K single
    steps would, so outputs are identical; the host discards tokens past a stop.
    """

    def decode(leaves: list[jax.Array], kv_caches: KVCaches, last_tokens: jax.Array, ibuf: jax.Array,
               fbuf: jax.Array, spec: PackSpec, flags: SamplingFlags,
               num_steps: int) -> tuple[KVCaches, jax.Array, DecodeOutputs]:
        inp, st = unpack(ibuf, fbuf, spec)
        model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
        md0 = inp.md
        num_blocks, block_size = kv_caches[0][0].shape[:2]
        num_rows = inp.input_ids.shape[0]
        valid = jnp.arange(num_rows) < md0.num_seqs

        def one_step(i: jax.Array, carry: tuple[Any, ...]) -> tuple[Any, ...]:
            kv, tokens, out = carry
            pos = inp.positions + i
            block = jnp.take_along_axis(md0.block_tables, (pos // block_size)[:, None], axis=1)[:, 0]
            md = md0._replace(
                slot_mapping=jnp.where(valid, block * block_size + pos % block_size, num_blocks * block_size),
                kv_lens=jnp.where(valid, md0.kv_lens + i, 0),
            )
            hidden, kv = model(tokens, pos, kv, md, attn_fn)
            logits = model.compute_logits(hidden)  # [S, V]: every row is a sequence's last token
            new = sample(logits, st._replace(step=st.step + i), flags)
            lp = _logprobs(logits, new, flags.num_logprobs) if flags.needs_logprobs else None
            out = jax.tree.map(lambda acc, x: acc.at[i].set(x), out, DecodeOutputs(new, lp))
            return _constrain(kv, kv_shardings), new, out

        lp0 = None
        if flags.needs_logprobs:
            k = flags.num_logprobs
            lp0 = Logprobs(jnp.zeros((num_steps, num_rows), jnp.float32),
                           jnp.zeros((num_steps, num_rows), jnp.int32),
                           jnp.zeros((num_steps, num_rows, k), jnp.int32),
                           jnp.zeros((num_steps, num_rows, k), jnp.float32))
        out0 = DecodeOutputs(jnp.zeros((num_steps, num_rows), jnp.int32), lp0)
        kv, last, out = jax.lax.fori_loop(0, num_steps, one_step,
                                          (kv_caches, feed_tokens(inp, last_tokens), out0))
        return kv, keep_tokens(last_tokens, inp.seq_rows, last), out

    return PackedStep(decode, mesh)


def _flat(d: dict[Any, Any], prefix: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], Any]:
    out: dict[tuple[Any, ...], Any] = {}
    for k, v in d.items():
        out |= _flat(v, (*prefix, k)) if isinstance(v, dict) else {(*prefix, k): v}
    return out


def _nest(flat: dict[tuple[Any, ...], Any]) -> dict[Any, Any]:
    root: dict[Any, Any] = {}
    for path, v in flat.items():
        node = root
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = v
    return root


class PipelineStep:
    """The step for pipeline parallelism: same call signature as `make_step_fn`'s result.

    Stage s owns layers `layer_ranges[s]` (weights and KV caches on `stage_meshes[s]`); the embedding
    lives on stage 0, the final norm and lm_head on the last stage (a tied embedding is copied there).
    The step's tokens are cut into microbatches (`sharding.pipeline`); the host dispatches
    chunk-major (for each chunk, every stage), and since dispatch is asynchronous, stage s runs chunk
    m + 1 while stage s + 1 runs chunk m. Each stage is its own jitted program on its own devices;
    activations move between stages with `device_put`. Stage programs merge the full graphdef with
    their own arrays plus shape-only placeholders for the rest, so model code runs unchanged.
    """

    def __init__(self, graphdef: nnx.GraphDef, state: nnx.State, attn_fns: Sequence[AttentionFn],
                 stage_meshes: Sequence[Any], layer_ranges: Sequence[range], stage_of: Callable[[str], int],
                 kv_shardings: Sequence[Any]) -> None:
        self.graphdef, self.meshes, self.ranges = graphdef, list(stage_meshes), list(layer_ranges)
        self.config = nnx.merge(graphdef, state).config
        flat = _flat(nnx.to_pure_dict(state))
        self.template = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), state)
        pp = len(self.meshes)
        self.own: list[dict[tuple[Any, ...], jax.Array]] = [{} for _ in range(pp)]
        for path, v in flat.items():
            self.own[stage_of(".".join(map(str, path)))][path] = v
        embed = ("model", "embed_tokens", "weight")
        if self.config.tie_word_embeddings and pp > 1:
            src = flat[embed]
            self.own[-1][embed] = jax.device_put(src, NamedSharding(self.meshes[-1], src.sharding.spec))
        self.replicated = [NamedSharding(m, PartitionSpec()) for m in self.meshes]
        self.stage_fns = [
            _on_mesh(jax.jit(self._stage_body(s, attn_fns[s], kv_shardings[r.start:r.stop]),
                             static_argnums=(5,), donate_argnums=(1,)), self.meshes[s])
            for s, r in enumerate(self.ranges)
        ]
        self.head_fn = _on_mesh(jax.jit(self._head_body, static_argnums=(4, 5)), self.meshes[-1])

    def _model(self, own: dict[tuple[Any, ...], jax.Array]) -> Any:
        state = jax.tree.map(lambda x: x, self.template)  # a fresh copy: replace_by_pure_dict mutates
        nnx.replace_by_pure_dict(state, _nest(own))
        return nnx.merge(self.graphdef, state)

    def _stage_body(self, s: int, attn_fn: AttentionFn, kv_shardings: Sequence[Any]) -> Callable[..., Any]:
        layers = self.ranges[s]

        def body(own: dict[Any, jax.Array], kv: KVCaches, x: jax.Array | None, inp: StepInputs,
                 lo: jax.Array, size: int) -> tuple[jax.Array, KVCaches]:
            model = self._model(own)
            md = microbatch_metadata(inp.md, lo, size)
            positions = token_slice(inp.positions, lo, size)
            if x is None:
                x = model.model.embed_tokens(token_slice(inp.input_ids, lo, size))
            inv_freq = jnp.asarray(rope_tables(self.config))
            call = layer_caller(attn_fn)
            new = []
            for i, cache in zip(layers, kv, strict=True):
                x, cache = call(model.model.layers[i], x, positions, inv_freq, cache, md)
                new.append(cache)
            return resolve(x), _constrain(new, kv_shardings)  # a plain array crosses to the next stage

        return body

    def _head_body(self, own: dict[Any, jax.Array], hiddens: list[jax.Array], inp: StepInputs,
                   st: SamplingTensors, flags: SamplingFlags, prompt_top: int) -> StepOutputs:
        model = self._model(own)
        hidden = model.model.norm(jnp.concatenate(hiddens, axis=0))
        return _sample_outputs(model, hidden, inp, st, flags, prompt_top)

    def __call__(self, state: nnx.State, kv_caches: KVCaches, inp: StepInputs, st: SamplingTensors,
                 flags: SamplingFlags, prompt_top: int) -> tuple[KVCaches, StepOutputs]:
        del state  # the stages hold their own parts of it (split once in __init__)
        t = inp.input_ids.shape[0]
        chunks = num_microbatches(t, len(self.meshes))
        size = t // chunks
        inps = [jax.device_put(inp, r) for r in self.replicated]
        kv = [list(kv_caches[r.start:r.stop]) for r in self.ranges]
        hiddens = []
        for m in range(chunks):
            x = None
            for s, fn in enumerate(self.stage_fns):
                if x is not None:
                    x = jax.device_put(x, self.replicated[s])
                x, kv[s] = fn(self.own[s], kv[s], x, inps[s], np.int32(m * size), size)
            hiddens.append(x)
        out = self.head_fn(self.own[-1], hiddens, inps[-1], jax.device_put(st, self.replicated[-1]),
                           flags, prompt_top)
        return [c for stage in kv for c in stage], out


def allocate_kv_caches(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                       head_dim: int, dtype: jnp.dtype, sharding: Any = None) -> KVCaches:
    """One (k, v) pair per layer, each [num_blocks, block_size, kv_heads, head_dim], as separate buffers
    so the donated step updates each in place. `sharding`: one for all layers, or a list per layer
    (pipeline stages); each device allocates only its shard."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    per_layer = sharding if isinstance(sharding, (list, tuple)) else [sharding] * num_layers

    def zeros(s: Any) -> jax.Array:
        return jnp.zeros(shape, dtype, device=s)

    return [(zeros(s), zeros(s)) for s in per_layer]
