"""rtp-jax: LLM inference on JAX/XLA with a paged KV cache and continuous batching."""

from rtp_jax.config import SamplingParams
from rtp_jax.engine.request import Logprob
from rtp_jax.llm import LLM
from rtp_jax.outputs import CompletionOutput, RequestOutput

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
