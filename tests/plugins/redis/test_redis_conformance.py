"""The core's backend conformance kit against real servers: standalone, unix socket, cluster, sentinel."""

from __future__ import annotations

import pytest_asyncio
from kvstacks.testing import BackendConformance
from kvstacks_redis import RedisBackend


def make(url: str, **options) -> RedisBackend:
    return RedisBackend(RedisBackend.Options(url=url, prefix="kit:", **options))


async def flip_payload_byte(backend: RedisBackend, key) -> None:
    """Damage a stored frame the way bit rot would: the magic stays, the checksum fails."""
    name = backend._name(key)
    raw = await backend.client.get(name)
    damaged = bytearray(raw)
    damaged[len(damaged) // 2] ^= 0xFF
    await backend.client.set(name, bytes(damaged))


class RedisKit(BackendConformance):
    """What every server kind below shares: frames (a stale carried check is a miss), and how to damage one."""

    corrupt = staticmethod(flip_payload_byte)
    frames = True


class TestStandalone(RedisKit):
    @pytest_asyncio.fixture
    async def backend(self, redis_server):
        backend = make(redis_server.url)
        await backend.start()
        return backend


class TestUnixSocket(RedisKit):
    concurrency = 16

    @pytest_asyncio.fixture
    async def backend(self, redis_server):
        backend = make(f"unix://{redis_server.socket}?db=0")
        await backend.start()
        return backend


class TestCluster(RedisKit):
    @pytest_asyncio.fixture
    async def backend(self, redis_cluster):
        backend = make(redis_cluster.url, mode="cluster")
        await backend.start()
        return backend


class TestStandaloneInParts(RedisKit):
    """Every chunk of the kit longer than 64 KiB stored in several values (and read in one go)."""

    @pytest_asyncio.fixture
    async def backend(self, redis_server):
        backend = make(redis_server.url, part_bytes=64 << 10)
        await backend.start()
        return backend


class TestClusterInParts(RedisKit):
    @pytest_asyncio.fixture
    async def backend(self, redis_cluster):
        backend = make(redis_cluster.url, mode="cluster", part_bytes=64 << 10)
        await backend.start()
        return backend


class TestSentinel(RedisKit):
    concurrency = 16

    @pytest_asyncio.fixture
    async def backend(self, redis_sentinel):
        backend = make(f"redis://127.0.0.1:{redis_sentinel.sentinel.port}/0", mode="sentinel", service="mymaster")
        await backend.start()
        return backend
