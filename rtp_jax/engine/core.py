"""EngineCore: requests of token ids in, new token ids (and logprobs) out, one step at a time.

    core = EngineCore(config, graphdef, state)
    core.add_request(request)          # validated; raises ValueError for bad input, engine unaffected
    while core.has_unfinished():
        for out in core.step(): ...    # EngineCoreOutput deltas for the requests that progressed
    core.finish_request(id, status)    # abort, or stop on a stop string found by the detokenizer

The core owns the scheduler, the KV block pool and the runner. It is single-threaded: the server runs it
on its own thread and talks to it through `serve/`'s queues.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from rtp_jax.cache import KVCacheManager
from rtp_jax.config import EngineConfig
from rtp_jax.engine.request import Logprob, PositionLogprobs, Request, RequestStatus
from rtp_jax.engine.runner import HostLogprobs, InFlight, ModelRunner, StepResult
from rtp_jax.engine.sampler import SamplingFlags
from rtp_jax.engine.scheduler import ScheduledSeq, Scheduler
from rtp_jax.engine.step import PipelineStep, allocate_kv_caches, make_decode_fn, make_step_fn
from rtp_jax.models.attention import AttentionBackend, select_attention_backend
from rtp_jax.models.params import place_state
from sharding.attention import shard_attention
from sharding.mesh import make_mesh, replica_meshes, stage_layers, stage_meshes
from sharding.placement import kv_cache_shardings, make_placer, split_replicas
from sharding.rules import param_stage

_CPU_KV_BYTES = 2 << 30  # without device memory stats (CPU), cap the KV pool at 2 GiB


@dataclass
class EngineCoreOutput:
    """What one step added to one request."""

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[PositionLogprobs] = field(default_factory=list)
    new_prompt_logprobs: list[PositionLogprobs | None] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


def _kv_bytes_per_block(config: EngineConfig) -> int:
    """Bytes one block adds on each device: its stage's layers, its share of the kv heads."""
    m, pc = config.model, config.parallel
    itemsize = jnp.dtype(config.dtype).itemsize
    tp = pc.tensor_parallel_size
    kv_heads = m.num_kv_heads // tp if m.num_kv_heads % tp == 0 else m.num_kv_heads  # else replicated
    layers = m.num_layers // pc.pipeline_parallel_size
    return 2 * layers * config.cache.block_size * kv_heads * m.head_dim * itemsize


_MEMORY_GRANULES = 64  # the KV pool grows in steps of 1/64 of device memory (see plan_num_blocks)


def plan_num_blocks(config: EngineConfig, device: jax.Device | None = None,
                    weight_bytes: int | None = None) -> int:
    """Blocks that fit in `gpu_memory_utilization` of device memory after the weights (already placed
    and transferred: the caller waits for them).

    The pool's size is baked into every compiled program (the KV arrays are inputs), so it must come out
    the same on every start of the same configuration, or a restart misses the persistent compilation
    cache and compiles everything again. Two measures: with `weight_bytes` (the weights' bytes on
    `device`), memory in use beyond them counts only when it exceeds a tolerance (`_memory_in_use`:
    loader buffers not yet freed and library workspaces differ between starts; on an H200 the cold- and
    warm-cache starts of one checkpoint differed by enough to plan 30197 and 31036 blocks); and the free
    bytes are rounded down to a multiple of 1/64 of the device's memory.

    On devices without memory stats (CPU) the pool is capped at what `max_num_seqs` full-length
    sequences need, and at 2 GiB.
    """
    if config.cache.num_blocks is not None:
        return config.cache.num_blocks
    sc, per_block = config.scheduler, _kv_bytes_per_block(config)
    blocks_per_seq = -(-sc.max_model_len // config.cache.block_size)
    stats = (device or jax.devices()[0]).memory_stats()
    if stats and "bytes_limit" in stats:
        limit, util = stats["bytes_limit"], config.cache.gpu_memory_utilization
        granule = limit // _MEMORY_GRANULES
        free = limit * util - _memory_in_use(stats.get("bytes_in_use", 0), weight_bytes, granule,
                                             limit * (1 - util) / 2)
        # Leave room for activations and logits of the largest step.
        free -= 4 * sc.max_num_batched_tokens * config.model.hidden_size * 4 * 16
        free -= sc.max_num_seqs * config.model.vocab_size * 4 * 4
        num_blocks = int((free - free % granule) // per_block)
    else:
        num_blocks = min(_CPU_KV_BYTES // per_block, sc.max_num_seqs * blocks_per_seq + 1)
    if num_blocks < blocks_per_seq + 1:
        raise ValueError(
            f"the KV cache fits {max(num_blocks, 0)} blocks of {config.cache.block_size} tokens, fewer than "
            f"one max_model_len ({sc.max_model_len}) sequence needs; lower max_model_len or raise "
            f"gpu_memory_utilization"
        )
    return num_blocks


def _memory_in_use(in_use: int, weight_bytes: int | None, granule: int, headroom: float) -> int:
    """Bytes the plan treats as taken: the weights, plus what else is in use where it exceeds the smaller
    of 4 granules and half the utilization headroom (rounded up to granules; smaller amounts are
    transient or fit the headroom). Without `weight_bytes`, what is in use."""
    if weight_bytes is None:
        return in_use
    other = in_use - weight_bytes
    if other <= min(4 * granule, headroom):
        return weight_bytes
    return weight_bytes + -(-other // granule) * granule


def _weight_bytes_on(state: nnx.State, device: jax.Device) -> int:
    """Bytes of `state`'s arrays that live on `device` (its shards of sharded weights)."""
    return sum(s.data.nbytes for x in jax.tree.leaves(state) if isinstance(x, jax.Array)
               for s in x.addressable_shards if s.device == device)


@dataclass
class _Launched:
    """A dispatched step: what it scheduled, which sequences sample, and the device handle."""

    seqs: tuple[ScheduledSeq, ...]
    samples: tuple[bool, ...]
    num_decode_steps: int
    handle: InFlight


class EngineCore:
    def __init__(self, config: EngineConfig, graphdef: nnx.GraphDef, state: nnx.State,
                 mesh: Mesh | None = None) -> None:
        """`mesh`: this replica's devices (dp size 1; see `make_engine_core` for dp > 1). Without one,
        a multi-device `config.parallel` gets `make_mesh(config.parallel)`. The state is re-placed
        onto the mesh where it is not there already (loaded weights usually are)."""
        self.config = config
        m, cc, sc = config.model, config.cache, config.scheduler
        if mesh is None and config.parallel.world_size > 1:
            mesh = make_mesh(config.parallel)
        if mesh is not None and mesh.shape["dp"] != 1:
            raise ValueError("EngineCore runs one dp replica; use make_engine_core for data parallelism")
        self.mesh = mesh
        plan_device = jax.devices()[0] if mesh is None else mesh.devices.flat[0]
        weight_bytes = None
        if cc.num_blocks is None and jax.default_backend() != "cpu":
            # Memory in use settles once the weights have arrived and unreferenced loader buffers are
            # gone (the CPU pool does not depend on it, and a collection costs tests time).
            jax.block_until_ready(state)
            gc.collect()
            weight_bytes = _weight_bytes_on(state, plan_device)
        stats = plan_device.memory_stats() or {}
        # What the KV pool was planned from (bench/run_all.py's start-up children report it).
        self.memory_plan = {"weight_bytes": weight_bytes, "bytes_in_use": stats.get("bytes_in_use"),
                            "bytes_limit": stats.get("bytes_limit")}
        self.num_blocks = plan_num_blocks(config, plan_device, weight_bytes)
        self.kv = KVCacheManager(self.num_blocks, cc.block_size,
                                 enable_prefix_caching=cc.enable_prefix_caching, defer_hashing=True)
        self.scheduler = Scheduler(sc, self.kv)
        backend = select_attention_backend(config.attention_backend)
        self.attention_backend = backend.name
        kv_shardings = None
        if mesh is not None:
            state = place_state(state, make_placer(mesh, m, config.parallel))
            kv_shardings = kv_cache_shardings(mesh, m, config.parallel)
        kv_caches = allocate_kv_caches(m.num_layers, self.num_blocks, cc.block_size, m.num_kv_heads,
                                       m.head_dim, jnp.dtype(config.dtype), kv_shardings)
        step_fn, decode_fn, fresh_fn = _step_fns(config, graphdef, state, backend, mesh, kv_shardings)
        last_tokens = None
        if not isinstance(step_fn, PipelineStep):
            where = None if mesh is None else NamedSharding(mesh, PartitionSpec())
            last_tokens = jnp.zeros((sc.max_num_seqs,), jnp.int32, device=where)
        self.runner = ModelRunner(
            state, kv_caches, step_fn, decode_fn, block_size=cc.block_size, num_blocks=self.num_blocks,
            max_blocks_per_seq=-(-sc.max_model_len // cc.block_size),
            max_num_batched_tokens=sc.max_num_batched_tokens, max_num_seqs=sc.max_num_seqs,
            bucket_block_tables=self.attention_backend == "reference", last_tokens=last_tokens,
            fresh_fn=fresh_fn,
        )
        self._inflight: _Launched | None = None
        self.requests: dict[str, Request] = {}
        self._rng = np.random.default_rng(config.seed)
        self.num_steps = 0  # model steps (a K-step decode call counts K)
        self.num_device_calls = 0
        self.num_overlapped_calls = 0  # dispatched while the previous call was still unread

    def precompile(self, flags: Sequence[SamplingFlags] | None = None, max_workers: int = 8) -> int:
        """Compiles every bucket's step program for `flags` (default: all-greedy batches and sampled
        batches without top-k/top-p) before serving, so live traffic never waits on XLA. Returns the
        number of programs compiled; the persistent compilation cache makes a restart's pass fast."""
        if flags is None:
            flags = [SamplingFlags(), SamplingFlags(all_greedy=False)]
        return self.runner.precompile(flags, self.config.scheduler.num_decode_steps, max_workers)

    # ---- requests -------------------------------------------------------------------------------
    def draw_seed(self) -> int:
        return int(self._rng.integers(0, 2**63))

    def validate(self, prompt_token_ids: Sequence[int]) -> list[int]:
        """The prompt's ids as plain ints; ValueError (naming what is wrong) if it is empty, too long
        for `max_model_len`, or holds anything but integers in [0, vocab_size)."""
        m, sc = self.config.model, self.config.scheduler
        if len(prompt_token_ids) == 0:
            raise ValueError("prompt is empty: at least one token is needed")
        if len(prompt_token_ids) >= sc.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_token_ids)} tokens, but max_model_len is {sc.max_model_len} "
                f"(the prompt plus at least one generated token must fit)"
            )
        # One vectorised check (a per-token Python loop cost ~0.2 ms per 2k-token prompt, paid on TTFT).
        try:
            ids = np.asarray(prompt_token_ids)
        except ValueError:  # ragged nesting: reported below
            ids = np.zeros((0, 0))
        if ids.ndim == 1 and ids.dtype.kind in "biu" and ids.min() >= 0 and ids.max() < m.vocab_size:
            return ids.astype(np.int64).tolist()
        bad = [t for t in prompt_token_ids
               if not (isinstance(t, (int, np.integer)) and 0 <= t < m.vocab_size)]
        raise ValueError(f"prompt token ids must be integers in [0, {m.vocab_size}), got {bad[:3]}")

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        request.prompt_token_ids = self.validate(request.prompt_token_ids)
        if request.params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        self.requests[request.request_id] = request
        self.scheduler.add(request)

    def finish_request(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED,
                       stop_reason: int | str | None = None) -> None:
        """Aborts (or stops) a request and frees its KV blocks at once; unknown ids are ignored."""
        req = self.requests.pop(request_id, None)
        if req is not None and not req.is_finished:
            req.stop_reason = stop_reason
            self.scheduler.finish(req, status)
            self.runner.release(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0 or self._inflight is not None

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        """Schedules and dispatches the next step, then returns the outputs of the previous one.

        With overlapped scheduling (the default where the step supports it) the host schedules step
        N + 1 and launches it before reading step N's tokens, so scheduling, input building and output
        processing run while the device computes. Tokens step N sampled are fed to step N + 1 on the
        device; a request that stops at step N (stop token) has run one step more, whose output is
        dropped. Requests whose sampling reads their own output tokens (penalties) wait for the step in
        flight instead, as does every request when overlapping is off.
        """
        outputs: list[EngineCoreOutput] = []
        if self._inflight is not None and not self._may_overlap():
            outputs += self._collect()
        sched = self.scheduler.schedule()
        for rid in sched.preempted:
            self.runner.release(rid)
        launched = None
        if sched.seqs:
            seqs = sched.seqs
            k = self._num_decode_steps(seqs)
            tables = [self.kv.block_table(s.request.request_id) for s in seqs]
            samples = tuple(s.samples for s in seqs)
            handle = self.runner.dispatch(seqs, tables, [s.request.seed for s in seqs], num_decode_steps=k)
            self.kv.register_full_blocks()  # the prompt's block hashes while the device computes
            self.scheduler.advance(sched, k)
            self.num_steps += k
            self.num_device_calls += 1
            self.num_overlapped_calls += self._inflight is not None
            launched = _Launched(seqs, samples, k, handle)
        if self._inflight is not None:
            outputs += self._collect()
        self._inflight = launched
        if launched is not None and not self._may_overlap():
            outputs += self._collect()
        return outputs

    def _may_overlap(self) -> bool:
        """The next step may be scheduled before the one in flight is read."""
        if not (self.config.scheduler.async_scheduling and self.runner.can_overlap):
            return False
        return not any(r.num_pending and r.needs_host_tokens for r in self.scheduler.running)

    def _collect(self) -> list[EngineCoreOutput]:
        launched, self._inflight = self._inflight, None
        assert launched is not None
        return self._process(launched, self.runner.collect(launched.handle))

    def _num_decode_steps(self, seqs: tuple[ScheduledSeq, ...]) -> int:
        """K > 1 when a multi-step decode gives the same outputs as K single steps and delays nothing:
        every sequence decodes one token, no request waits for admission, nothing needs per-token host
        state (penalties and min_tokens bans read the tokens just produced), and K more tokens fit
        each sequence's blocks and max_model_len."""
        sc = self.config.scheduler
        k = sc.num_decode_steps
        if k <= 1 or not self.runner.can_multi_step:
            return 1
        if self.scheduler.waiting and len(self.scheduler.running) < sc.max_num_seqs:
            return 1
        reqs = [s.request for s in seqs]
        if not all(s.num_new_tokens == 1 and s.samples for s in seqs):
            return 1
        for r in reqs:
            if r.needs_host_tokens or r.num_output_tokens < r.params.min_tokens:
                return 1
        # Tokens past a request's max_tokens are wasted work, so stop at the longest remaining need.
        remaining = max((r.params.max_tokens or sc.max_model_len) - r.num_output_tokens for r in reqs)
        k = min(k, remaining, min(sc.max_model_len - r.num_total_tokens for r in reqs))
        if k <= 1:
            return 1
        k = 1 << (k.bit_length() - 1)  # powers of two only: each K is its own compiled program
        for s in seqs:
            r = s.request
            if not self.kv.allocate_slots(r.request_id, r.token_view(), s.start, 1,
                                          num_lookahead_tokens=k - 1, num_pending_tokens=r.num_pending):
                return 1  # blocks already taken stay with the request; they will be used later
        return k

    def _process(self, launched: _Launched, result: StepResult) -> list[EngineCoreOutput]:
        """Appends a collected step's tokens (and logprobs) to its requests; requests that finished or
        were aborted meanwhile are skipped."""
        seqs = launched.seqs
        outputs: dict[str, EngineCoreOutput] = {}
        now = time.monotonic()
        for i, first, count in result.prompt_lp_spans:
            req = seqs[i].request
            if req.is_finished:
                continue
            out = outputs.setdefault(req.request_id, EngineCoreOutput(req.request_id))
            row0 = sum(c for j, _, c in result.prompt_lp_spans if j < i)
            for r in range(row0, row0 + count):
                target = req.prompt_token_ids[first + 1 + r - row0]
                entry = _position_logprobs(result.prompt_logprobs, r, target, req.params.prompt_logprobs or 0)
                req.prompt_logprobs.append(entry)
                out.new_prompt_logprobs.append(entry)
        num_rows = result.tokens.shape[0]
        for i, s in enumerate(seqs):
            req = s.request
            if not launched.samples[i]:
                continue
            req.num_pending -= launched.num_decode_steps
            if req.is_finished:
                continue
            if req.first_token_time is None:
                req.first_token_time = now
            out = outputs.setdefault(req.request_id, EngineCoreOutput(req.request_id))
            for k in range(num_rows):
                token = int(result.tokens[k, i])
                req.output_token_ids.append(token)
                out.new_token_ids.append(token)
                if req.params.logprobs is not None:
                    entry = _position_logprobs(_row(result.logprobs, k), i, token, req.params.logprobs)
                    req.logprobs.append(entry)
                    out.new_logprobs.append(entry)
                status = self._check_stop(req, token)
                if status is not None:
                    self.scheduler.finish(req, status)
                    self.runner.release(req.request_id)
                    self.requests.pop(req.request_id, None)
                    out.finish_reason, out.stop_reason = req.finish_reason, req.stop_reason
                    break
        return list(outputs.values())

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        n_out = len(req.output_token_ids)
        if n_out >= req.params.min_tokens and token in req.stop_token_ids():
            req.stop_reason = None if token in req.eos_token_ids else token
            return RequestStatus.FINISHED_STOPPED
        if req.params.max_tokens is not None and n_out >= req.params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if req.num_tokens >= self.config.scheduler.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None


def _step_fns(config: EngineConfig, graphdef: nnx.GraphDef, state: nnx.State, backend: AttentionBackend,
              mesh: Mesh | None, kv_shardings: list[Any] | None) -> tuple[Any, Any, Any]:
    """(mixed step, multi-step decode or None, fresh-prompt step or None) for this core's devices."""
    treedef = jax.tree.structure(state)
    if mesh is None:
        fresh = None if backend.fresh is None else make_step_fn(graphdef, treedef, backend.fresh)
        return (make_step_fn(graphdef, treedef, backend.mixed),
                make_decode_fn(graphdef, treedef, backend.decode), fresh)
    m = config.model
    stages = stage_meshes(mesh)
    attn_fns = [shard_attention(backend.mixed, sm, m.num_heads, m.num_kv_heads) for sm in stages]
    if len(stages) == 1:
        decode_attn = shard_attention(backend.decode, stages[0], m.num_heads, m.num_kv_heads)
        fresh = None
        if backend.fresh is not None:
            fresh_attn = shard_attention(backend.fresh, stages[0], m.num_heads, m.num_kv_heads,
                                         uses_new_kv=True)
            fresh = make_step_fn(graphdef, treedef, fresh_attn, mesh, kv_shardings)
        return (make_step_fn(graphdef, treedef, attn_fns[0], mesh, kv_shardings),
                make_decode_fn(graphdef, treedef, decode_attn, mesh, kv_shardings), fresh)
    pp = len(stages)
    return PipelineStep(graphdef, state, attn_fns, stages, stage_layers(m.num_layers, pp),
                        lambda name: param_stage(name, m.num_layers, pp), kv_shardings), None, None


class DataParallelEngineCore:
    """dp replicas, each an EngineCore on its own sub-mesh with its own KV pool and scheduler.

    A new request goes to the replica with the fewest unfinished requests; the caller sees one core
    (same methods as EngineCore). Replicas step one after another on the host; each step's device
    work is independent, so no collective crosses replicas.
    """

    def __init__(self, cores: list[EngineCore]) -> None:
        self.cores = cores
        self.config = cores[0].config
        self.num_blocks = cores[0].num_blocks
        self.attention_backend = cores[0].attention_backend
        self._owner: dict[str, EngineCore] = {}

    @property
    def num_steps(self) -> int:
        return sum(c.num_steps for c in self.cores)

    def draw_seed(self) -> int:
        return self.cores[0].draw_seed()

    def precompile(self, flags: Sequence[SamplingFlags] | None = None, max_workers: int = 8) -> int:
        return sum(c.precompile(flags, max_workers) for c in self.cores)

    def validate(self, prompt_token_ids: Sequence[int]) -> list[int]:
        return self.cores[0].validate(prompt_token_ids)

    def add_request(self, request: Request) -> None:
        if request.request_id in self._owner:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        core = min(self.cores, key=lambda c: c.scheduler.num_unfinished)
        core.add_request(request)
        self._owner[request.request_id] = core

    def finish_request(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_ABORTED,
                       stop_reason: int | str | None = None) -> None:
        core = self._owner.pop(request_id, None)
        if core is not None:
            core.finish_request(request_id, status, stop_reason)

    def has_unfinished(self) -> bool:
        return any(c.has_unfinished() for c in self.cores)

    def step(self) -> list[EngineCoreOutput]:
        outputs: list[EngineCoreOutput] = []
        for core in self.cores:
            if core.has_unfinished():
                outputs.extend(core.step())
        for out in outputs:
            if out.finish_reason is not None:
                self._owner.pop(out.request_id, None)
        return outputs


def make_engine_core(config: EngineConfig, graphdef: nnx.GraphDef, state: nnx.State,
                     mesh: Mesh | None = None) -> EngineCore | DataParallelEngineCore:
    """One EngineCore, or one per dp replica when `config.parallel.data_parallel_size` > 1."""
    if config.parallel.world_size > 1 and mesh is None:
        mesh = make_mesh(config.parallel)
    if mesh is None or mesh.shape["dp"] == 1:
        return EngineCore(config, graphdef, state, mesh)
    state = place_state(state, make_placer(mesh, config.model, config.parallel))  # no-op when loaded so
    replicas = replica_meshes(mesh)
    views = split_replicas(state, len(replicas))
    return DataParallelEngineCore([EngineCore(config, graphdef, v, r) for v, r in zip(views, replicas,
                                                                                       strict=True)])


def _row(lp: HostLogprobs | None, k: int) -> HostLogprobs | None:
    """Decode step k's logprobs: fields [S, ...]."""
    return None if lp is None else HostLogprobs(lp.target[k], lp.rank[k], lp.top_ids[k], lp.top[k])


def _position_logprobs(lp: HostLogprobs | None, row: int, target: int, num_top: int) -> PositionLogprobs:
    """The target token's Logprob first, then the top `num_top` alternatives at one scored position."""
    assert lp is not None  # the step computed logprobs because this request asked for them
    entry: PositionLogprobs = {target: Logprob(float(lp.target[row]), rank=int(lp.rank[row]))}
    for k in range(num_top):
        entry.setdefault(int(lp.top_ids[row, k]), Logprob(float(lp.top[row, k]), rank=k + 1))
    return entry
