"""EngineArgs: the user-facing engine options, shared by `LLM(...)`, the CLI and the server.

`build_engine(args)` resolves the model, loads config, tokenizer and weights, and assembles the
LLMEngine; everything else in the package receives already-built objects.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from rtp_jax.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig
from rtp_jax.engine.core import make_engine_core
from rtp_jax.engine.llm_engine import LLMEngine
from rtp_jax.loader import iter_weights, load_model_config, resolve_model_path
from rtp_jax.loader.fast import load_model_state, mesh_sharding_for
from rtp_jax.models.params import default_placer, load_state, random_state
from rtp_jax.tokenizer import Tokenizer
from sharding.mesh import initialize_distributed_from_env, make_mesh, validate
from sharding.placement import make_placer

_LOAD_FORMATS = ("auto", "dummy")
_GiB = 1 << 30


def default_batch_limits(on_gpu: bool, device_bytes: int, offline: bool) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) when the user sets neither.

    Offline batch generation on a big GPU (a JAX memory pool of 48 GiB or more: an 80 GB H100 at JAX's
    default 75% preallocation) takes vLLM's `LLM` defaults for such GPUs, 1024 sequences and 16384 tokens
    per step: all of a large batch is admitted at once and the long-output tail decodes in bigger batches
    (H200, the issue-6 workload: 10,491 vs 9,626 output tok/s at 256 x 2048; bench/notes_bench.md). The
    server keeps 256 x 2048, whose few shape buckets `--precompile` compiles in minutes.
    """
    if not on_gpu:
        return 64, 512
    if offline and device_bytes >= 48 * _GiB:
        return 1024, 16384
    return 256, 2048



@dataclass(frozen=True)
class EngineArgs:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    tokenizer: str | None = None
    # "auto": bfloat16 on accelerators; float32 on the CPU, where XLA emulates bf16 matmuls slowly and
    # a 135M model's greedy answers flip on bf16 rounding noise.
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    block_size: int = 16
    num_kv_blocks: int | None = None
    enable_prefix_caching: bool = True
    num_decode_steps: int = 8
    async_scheduling: bool = True
    precompile: bool = False
    seed: int = 0
    attention_backend: str = "auto"
    load_format: str = "auto"  # "dummy": random weights of the checkpoint's shape (benchmarks)
    offline: bool = False  # set by `LLM`: batch-generation defaults (see `default_batch_limits`)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    expert_parallel_size: int = 1
    data_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.load_format not in _LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {_LOAD_FORMATS}, got {self.load_format!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")

    def engine_config(self, model: ModelConfig) -> EngineConfig:
        on_gpu = jax.default_backend() == "gpu"
        max_len = self.max_model_len or model.max_position_embeddings
        stats = (jax.devices()[0].memory_stats() or {}) if on_gpu else {}
        seqs_default, budget_default = default_batch_limits(on_gpu, stats.get("bytes_limit", 0), self.offline)
        # A token budget set alone caps the default sequence count (each running sequence needs a token).
        max_seqs = self.max_num_seqs or min(seqs_default, self.max_num_batched_tokens or seqs_default)
        budget = self.max_num_batched_tokens or max(budget_default, max_seqs)
        parallel = ParallelConfig(self.data_parallel_size, self.pipeline_parallel_size,
                                  self.expert_parallel_size, self.tensor_parallel_size)
        validate(model, parallel, len(jax.devices()))  # a clear error before any weight is read
        return EngineConfig(
            model=model,
            cache=CacheConfig(self.block_size, self.gpu_memory_utilization, self.num_kv_blocks,
                              self.enable_prefix_caching),
            scheduler=SchedulerConfig(max_len, budget, max_seqs, self.num_decode_steps,
                                      self.async_scheduling),
            parallel=parallel,
            dtype=resolve_dtype(self.dtype),
            attention_backend=self.attention_backend,
            seed=self.seed,
        )

    # ---- CLI ------------------------------------------------------------------------------------
    @staticmethod
    def add_cli_args(p: argparse.ArgumentParser) -> None:
        g = p.add_argument_group("engine")
        g.add_argument("--model", default=None, help="HF directory or .gguf file (default: embedded SmolLM2)")
        g.add_argument("--tokenizer", default=None)
        g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"])
        g.add_argument("--max-model-len", type=int, default=None)
        g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
        g.add_argument("--max-num-batched-tokens", type=int, default=None)
        g.add_argument("--max-num-seqs", type=int, default=None)
        g.add_argument("--block-size", type=int, default=16)
        g.add_argument("--num-kv-blocks", type=int, default=None)
        g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false")
        g.add_argument("--num-decode-steps", type=int, default=8,
                       help="decode steps per device call when no request waits (1 = one step per call)")
        g.add_argument("--precompile", action="store_true",
                       help="compile every batch-shape bucket at start-up (no XLA stalls on live traffic)")
        g.add_argument("--no-async-scheduling", dest="async_scheduling", action="store_false",
                       help="read each step's tokens before scheduling the next (no host/device overlap)")
        g.add_argument("--seed", type=int, default=0)
        g.add_argument("--attention-backend", default="auto", choices=["auto", "reference", "pallas"])
        g.add_argument("--load-format", default="auto", choices=list(_LOAD_FORMATS))
        g.add_argument("--tp", "--tensor-parallel-size", dest="tensor_parallel_size", type=int, default=1)
        g.add_argument("--pp", "--pipeline-parallel-size", dest="pipeline_parallel_size", type=int, default=1)
        g.add_argument("--ep", "--expert-parallel-size", dest="expert_parallel_size", type=int, default=1)
        g.add_argument("--dp", "--data-parallel-size", dest="data_parallel_size", type=int, default=1)

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(ns).items() if k in names})

    @classmethod
    def from_kwargs(cls, **kw: Any) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise TypeError(f"unknown engine option(s) {unknown}; known: {sorted(names)}")
        return cls(**kw)


def resolve_dtype(dtype: str) -> str:
    if dtype == "auto":
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return dtype


def build_engine(args: EngineArgs) -> LLMEngine:
    """Loads model, tokenizer and weights and returns a ready LLMEngine.

    With a multi-device layout (`--tp/--pp/--ep/--dp`) each weight goes from the host straight to its
    shards on the mesh; see `sharding.mesh` for the multi-host launch line.
    """
    initialize_distributed_from_env()  # before anything asks JAX for devices
    path = resolve_model_path(args.model, weights=args.load_format != "dummy")
    model_config = load_model_config(path)
    tok_path = resolve_model_path(args.tokenizer, weights=False) if args.tokenizer else path
    tokenizer = Tokenizer.from_path(tok_path)
    config = args.engine_config(model_config)
    dtype = jnp.dtype(config.dtype)
    mesh = make_mesh(config.parallel) if config.parallel.world_size > 1 else None
    enable_compilation_cache()
    if args.load_format == "dummy":
        graphdef, state = random_state(model_config, dtype, seed=args.seed)  # re-placed by the core
    elif path.is_dir():  # safetensors or orbax: parallel reads overlapped with transfers, shard by shard
        sharding_for = mesh_sharding_for(mesh, model_config, config.parallel) if mesh is not None else None
        graphdef, state = load_model_state(path, model_config, dtype, sharding_for=sharding_for)
    else:  # GGUF: dequantized tensor by tensor on the host
        place = make_placer(mesh, model_config, config.parallel) if mesh is not None else default_placer
        graphdef, state = load_state(model_config, dtype, iter_weights(path, model_config), place)
    core = make_engine_core(config, graphdef, state, mesh)
    if args.precompile:
        core.precompile()
    return LLMEngine(core, tokenizer)


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache, so a restart skips XLA compiles (accelerators only: CPU
    programs compile fast). `RTP_JAX_COMPILATION_CACHE` picks the folder; "0" turns it off; a folder
    the user already configured is kept."""
    folder = os.environ.get("RTP_JAX_COMPILATION_CACHE", str(Path.home() / ".cache" / "rtp_jax" / "xla"))
    if folder == "0" or jax.default_backend() == "cpu" or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", folder)
