"""Padding buckets of the model runner (engine/runner.py): which padded shapes a batch runs in."""

from __future__ import annotations

import pytest

from rtp_jax.engine.runner import FINE_SEQ_BUCKETS_FROM, bucket, seq_bucket


@pytest.mark.parametrize("maximum", [64, 100, 256, 1000, 1024])
def test_seq_buckets_cover_every_count_tightly(maximum: int) -> None:
    """Every sequence count gets the smallest slot count among the powers of two and, from
    FINE_SEQ_BUCKETS_FROM up, their 3/4 midpoints, never above `maximum` and never above the token
    bucket of the same count (so a step's token bucket holds its slots)."""
    for n in range(1, maximum + 1):
        s = seq_bucket(n, 4, maximum)
        assert n <= s <= maximum and s <= bucket(n, 16, maximum)
        allowed = [b for b in range(4, maximum + 1)
                   if (b & (b - 1) == 0) or (b >= FINE_SEQ_BUCKETS_FROM and b % 3 == 0
                                             and (b // 3) & (b // 3 - 1) == 0)] + [maximum]
        assert s == min(b for b in allowed if b >= n), n


def test_large_decode_batches_pad_to_the_midpoints() -> None:
    """555 sequences run in 768 slots, not 1024; small batches keep power-of-two buckets."""
    assert seq_bucket(555, 4, 1024) == 768
    assert seq_bucket(300, 4, 1024) == 384
    assert seq_bucket(130, 4, 1024) == 192
    assert seq_bucket(70, 4, 1024) == 96
    assert seq_bucket(40, 4, 1024) == 64
    assert seq_bucket(3, 4, 1024) == 4
