"""Capacity: the server's maxmemory policy bounds the shared store; a tier capacity bounds one instance."""

from __future__ import annotations

import pytest
import torch
from kvstacks import CacheEngine
from kvstacks.errors import TierFull
from kvstacks.testing import random_key, random_kv, raw_obj
from kvstacks_redis import RedisBackend

MiB = 1 << 20


def one_mib_obj(i: int):
    key = random_key()
    kv = torch.full((2, 2, 16, 8192), float(i), dtype=torch.float16)  # 2*2*16*8192*2 bytes = 1 MiB
    return key, raw_obj(key, kv)


async def test_server_lru_evicts_old_chunks_and_they_become_misses(own_redis):
    server = own_redis("--maxmemory", "16mb", "--maxmemory-policy", "allkeys-lru")
    b = RedisBackend(RedisBackend.Options(url=server.url, prefix="evict:"))
    await b.start()
    items = [one_mib_obj(i) for i in range(48)]
    for key, obj in items:
        await b.put(key, obj)  # never refused: the server makes room
    keys = [k for k, _ in items]
    present = await b.batch_contains(keys)
    assert 0 < sum(present) <= 16, f"{sum(present)} of 48 one-MiB chunks fit in 16 MiB"
    assert present[-1], "the chunk written last was evicted"
    assert not all(present[:8]), "the oldest chunks should have been evicted first"
    first_missing = present.index(False)
    assert await b.get(keys[first_missing]) is None
    assert b.breaker.state == "closed"
    await b.close()


async def test_server_noeviction_full_raises_tier_full(own_redis):
    server = own_redis("--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
    b = RedisBackend(RedisBackend.Options(url=server.url, prefix="full:"))
    await b.start()
    with pytest.raises(TierFull, match="maxmemory-policy allkeys-lru"):
        for i in range(16):
            await b.batch_put([one_mib_obj(i)])
    assert b.breaker.state == "closed", "a full server is up: it must not open the breaker"
    assert await b.contains(random_key()) is False  # reads still work
    await b.close()


async def test_tier_capacity_evicts_only_this_instances_chunks(own_redis):
    server = own_redis()
    prefix = "quota:"
    other = RedisBackend(RedisBackend.Options(url=server.url, prefix=prefix))
    await other.start()
    others = [random_key() for _ in range(3)]
    for i, key in enumerate(others):
        await other.put(key, raw_obj(key, random_kv(seed=i)))

    chunk_bytes = 2 * 2 * 16 * 32 * 2
    config = {
        "model": "quota-test",
        "chunk_size": 16,
        "stack": [
            {"backend": "cpu", "capacity": "1MiB"},
            {"backend": "redis", "url": server.url, "prefix": prefix, "capacity": 4 * chunk_bytes},
        ],
    }
    with CacheEngine.from_config(config) as engine:
        tokens = list(range(160))
        kv = torch.randn(2, 2, 160, 32).half()
        engine.store(tokens, kv)
        assert engine.offloader.drain(30)
        stats = engine.stats()["redis"]
        assert stats["objects"] == 4 and stats["evictions"] == 6
        ours = [k for k, _ in [item async for item in other.keys()] if k.model == "quota-test"]
        assert len(ours) == 4, f"redis holds {len(ours)} of this instance's chunks; its capacity is 4"
        mine = set(engine.chunk_keys(tokens)[-4:])
        assert set(ours) == mine, "LRU keeps the chunks written last"
    assert all(await other.batch_contains(others)), "another instance's chunks were evicted"
    await other.close()
