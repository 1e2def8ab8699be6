"""The cpu tier under the real engine: exact round trips, and buffers recycled through leases."""

from __future__ import annotations

import torch
from kvstacks import CacheEngine
from kvstacks.testing import bits, random_kv

CHUNK = 16


def kv_of(tokens: int, seed: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return random_kv(2, tokens, 64, dtype, seed=seed)


def test_round_trip_is_bit_exact_for_each_dtype() -> None:
    config = {"model": "m", "chunk_size": CHUNK, "stack": [{"backend": "cpu", "capacity": "64MiB"}]}
    with CacheEngine.from_config(config) as engine:
        for i, dtype in enumerate((torch.float16, torch.bfloat16, torch.float32)):
            tokens = list(range(1000 * i, 1000 * i + 3 * CHUNK + 5))
            kv = kv_of(len(tokens), seed=i, dtype=dtype)
            engine.store(tokens, kv)
            kv_copy = kv.clone()
            kv.zero_()  # the caller's buffer is reused: the tier must hold its own copy
            got, n = engine.retrieve(tokens)
            assert n == len(tokens)
            assert bits(got) == bits(kv_copy)


def test_a_full_tier_recycles_buffers_instead_of_allocating() -> None:
    one_chunk = 2 * 2 * CHUNK * 64 * 2
    config = {"model": "m", "chunk_size": CHUNK,
              "stack": [{"backend": "cpu", "capacity": 8 * one_chunk}]}
    with CacheEngine.from_config(config) as engine:
        backend = engine.tiers[0].backend
        for i in range(60):
            tokens = list(range(i * 100, i * 100 + 2 * CHUNK))
            engine.store(tokens, kv_of(2 * CHUNK, seed=i))
            got, n = engine.retrieve(tokens)
            assert n == 2 * CHUNK
        stats = backend.pool.stats()
        assert stats.allocations <= 12, f"evicted buffers were not reused: {stats}"
        assert stats.reuses >= 100
        assert backend.leased_after_removal == 0, "the engine left leases open on removed chunks"
        assert stats.in_use_bytes <= 8 * one_chunk
