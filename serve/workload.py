"""A seeded synthetic workload with ShareGPT-like lengths, shared by the online and offline benchmarks.

    requests = synthetic_requests(num_prompts=200, seed=0, vocab_size=32000)
    requests[0].prompt_token_ids, requests[0].output_len

Lengths follow log-normal fits of ShareGPT (input median ~170 tokens, output median ~140), clipped
to [4, 1024] (or to tighter bounds for small models). Prompts are random token ids (exact input
lengths, no tokenizer needed) or random words (when a server must see text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but "
          "have an they you were her she there been one all we their has would when if so no will more can "
          "out up about into them than only other new some time could these two may first then do any like "
          "my now over such our man me even most made after also did many before must through back years "
          "where much your way well down should because each just those people how too little state good "
          "very make world still own see men work long get here between both life being under never day "
          "same another know while last might us great old year off come since against go came right used "
          "take three").split()


@dataclass(frozen=True)
class SyntheticRequest:
    prompt_token_ids: list[int]
    prompt_text: str  # random words of about the same length (for text-only endpoints)
    output_len: int

    @property
    def input_len(self) -> int:
        return len(self.prompt_token_ids)


def sharegpt_lengths(num: int, rng: np.random.Generator, max_input_len: int = 1024,
                     max_output_len: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Input and output lengths: log-normal around ShareGPT's medians, clipped to [4, max]."""
    inputs = np.clip(rng.lognormal(math.log(170), 0.75, num), 4, min(1024, max_input_len)).astype(int)
    outputs = np.clip(rng.lognormal(math.log(140), 0.8, num), 4, min(1024, max_output_len)).astype(int)
    return inputs, outputs


def synthetic_requests(num_prompts: int, seed: int = 0, vocab_size: int = 32000, max_input_len: int = 1024,
                       max_output_len: int = 1024, reserved_ids: int = 16) -> list[SyntheticRequest]:
    """`num_prompts` requests; token ids avoid the first `reserved_ids` ids (special tokens live there)."""
    rng = np.random.default_rng(seed)
    inputs, outputs = sharegpt_lengths(num_prompts, rng, max_input_len, max_output_len)
    low = min(reserved_ids, max(vocab_size - 1, 0))
    out = []
    for n_in, n_out in zip(inputs, outputs, strict=True):
        ids = rng.integers(low, vocab_size, int(n_in)).tolist()
        words = " ".join(rng.choice(_WORDS, int(n_in)).tolist())
        out.append(SyntheticRequest(ids, words, int(n_out)))
    return out


def poisson_arrivals(num: int, request_rate: float, rng: np.random.Generator) -> np.ndarray:
    """Send offsets in seconds: exponential gaps at `request_rate`/s; all zero for an infinite rate."""
    if math.isinf(request_rate):
        return np.zeros(num)
    return np.cumsum(rng.exponential(1.0 / request_rate, num))
