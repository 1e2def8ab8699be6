"""The server is the truth of a shared tier: what Redis forgot is written again, never skipped on a guess."""

from __future__ import annotations

import time

import torch
from kvstacks import CacheEngine


def stack(url: str, prefix: str, cpu: str = "64MiB") -> dict:
    return {
        "model": "forget-test",
        "chunk_size": 16,
        "stack": [
            {"backend": "cpu", "capacity": cpu},
            {"backend": "redis", "url": url, "prefix": prefix, "connect_timeout": 0.5, "timeout": 2.0,
             "breaker_failures": 1, "breaker_backoff": 0.1, "breaker_backoff_max": 0.2},
        ],
    }


def prompt(seed: int, tokens: int = 64, hidden: int = 32) -> tuple[list[int], torch.Tensor]:
    ids = list(range(seed * 1000, seed * 1000 + tokens))
    return ids, torch.randn(2, 2, tokens, hidden, generator=torch.Generator().manual_seed(seed)).half()


def store(engine: CacheEngine, tokens: list[int], kv: torch.Tensor) -> None:
    engine.store(tokens, kv)
    assert engine.flush(30)


def test_flushall_and_a_restart_then_storing_again_repopulates_redis(own_redis):
    # On main the tier's index kept listing the flushed keys, so write-through skipped Redis for good.
    server = own_redis()
    with CacheEngine.from_config(stack(server.url, "flush:")) as engine:
        tokens, kv = prompt(1)
        store(engine, tokens, kv)
        assert engine.lookup_tiers(tokens) == {"cpu": 64, "redis": 64}

        server.cli("FLUSHALL")                       # the cpu tier still holds the prompt
        assert engine.lookup_tiers(tokens) == {"cpu": 64, "redis": 0}
        store(engine, tokens, kv)
        assert engine.lookup_tiers(tokens) == {"cpu": 64, "redis": 64}

        server.cli("FLUSHALL")                       # and now the cpu tier lost it too: no lookup in between
        engine.clear("cpu")
        store(engine, tokens, kv)
        assert engine.lookup_tiers(tokens) == {"cpu": 64, "redis": 64}

        server.stop()                                # a restart without persistence comes back empty
        server.start()
        engine.clear("cpu")
        deadline = time.monotonic() + 20
        while engine.lookup_tiers(tokens)["redis"] < 64:  # the breaker lets calls through again shortly
            assert time.monotonic() < deadline, engine.stats()["redis"]
            store(engine, tokens, kv)
            time.sleep(0.05)
        engine.clear("cpu")
        out, n = engine.retrieve(tokens)
        assert n == 64 and torch.equal(out, kv)


def test_keys_redis_evicted_under_maxmemory_are_written_again(own_redis):
    # Redis's LRU is sampled: with the default 5 samples a chunk of the oldest prompt survived
    # once in CI. 64 samples over these ~64 keys make it the exact order the test relies on.
    server = own_redis("--maxmemory", "8mb", "--maxmemory-policy", "allkeys-lru", "--maxmemory-samples", "64")
    # 256 KiB chunks, a 1 MiB cpu tier: 32 two-chunk prompts are 16 MiB, twice what Redis may keep.
    with CacheEngine.from_config(stack(server.url, "lru:", cpu="1MiB")) as engine:
        prompts = [prompt(seed, 32, 2048) for seed in range(32)]
        for tokens, kv in prompts:
            store(engine, tokens, kv)
        first_tokens, first_kv = prompts[0]
        assert engine.lookup_tiers(first_tokens) == {"cpu": 0, "redis": 0}, "Redis should have evicted the oldest"
        store(engine, first_tokens, first_kv)
        assert engine.lookup_tiers(first_tokens) == {"cpu": 32, "redis": 32}
        engine.clear("cpu")
        out, n = engine.retrieve(first_tokens)
        assert n == 32 and torch.equal(out, first_kv)
        # a read that misses drops the stale entries: the tier's count follows the server
        listed = engine.stats()["redis"]["objects"]
        assert engine.retrieve(prompts[1][0]) == (None, 0)
        assert engine.stats()["redis"]["objects"] == listed - 2, "the tier still lists chunks Redis evicted"
