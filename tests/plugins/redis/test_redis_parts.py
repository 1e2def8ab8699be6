"""Frames longer than ``part_bytes`` stored as several values: the layout in Redis, reads
in one go, a frame that fits stored as before, and a lost part as a miss that cleans up."""

from __future__ import annotations

import os

import pytest
import redis
import torch
from kvstacks import frame
from kvstacks.testing import assert_same_obj, random_key, random_kv, raw_obj
from kvstacks_redis import RedisBackend

PART = 64 << 10


def tier(url: str, **options) -> RedisBackend:
    return RedisBackend(RedisBackend.Options(url=url, prefix=f"parts-{os.urandom(4).hex()}:", part_bytes=PART, **options))


def layout_in_redis(client, backend: RedisBackend, key) -> list[bytes | None]:
    """The values under the chunk's name and its part names, up to the first missing one."""
    name = backend._name(key)
    values = [client.get(name)]
    k = 1
    while values[-1] is not None:
        values.append(client.get(backend._part(name, k)))
        k += 1
    return values[:-1]


@pytest.fixture(params=["standalone", "cluster"])
async def backend(request):
    if request.param == "standalone":
        server = request.getfixturevalue("redis_server")
        b = tier(server.url)
        client = redis.Redis.from_url(server.url)
    else:
        cluster = request.getfixturevalue("redis_cluster")
        b = tier(cluster.url, mode="cluster")
        client = redis.RedisCluster.from_url(cluster.url)
    await b.start()
    b.sync = client
    yield b
    await b.clear()
    await b.close()
    client.close()


def sliced_obj(seed: int):
    """A chunk sliced out of a longer KV, as ``store`` hands it to the tiers: not contiguous."""
    kv = random_kv(2, 512, 256, torch.float16, seed=seed)  # 2 x 2 x 512 x 256: 1 MiB
    return raw_obj(random_key(), kv[:, :, 100:400])


async def test_long_frames_are_stored_in_parts_and_read_whole(backend) -> None:
    objs = [raw_obj(random_key(), random_kv(2, 300, 256, torch.float16, seed=1)), sliced_obj(2), sliced_obj(3)]
    small = raw_obj(random_key(), random_kv(2, 4, 256, torch.float16, seed=4))  # 16 KiB: one value
    await backend.batch_put([(o.key, o) for o in [*objs, small]])
    for obj in objs:
        stored = layout_in_redis(backend.sync, backend, obj.key)
        whole = frame.encode(obj)
        assert len(stored) == -(-len(whole) // PART) > 1
        assert b"".join(stored) == whole and all(len(v) == PART for v in stored[:-1])
    assert layout_in_redis(backend.sync, backend, small.key) == [frame.encode(small)], "a frame that fits: as before"
    got = await backend.batch_get([o.key for o in [*objs, small]])
    for g, obj in zip(got, [*objs, small]):
        assert_same_obj(g, obj)
    assert_same_obj(await backend.get(objs[1].key), objs[1])
    assert await backend.batch_contains([o.key for o in objs]) == [True] * 3
    listed = {key: size async for key, size in backend.keys()}
    assert listed == {o.key: len(frame.encode(o)) for o in [*objs, small]}, "parts are not chunks"
    assert await backend.remove(objs[0].key) is True
    assert layout_in_redis(backend.sync, backend, objs[0].key) == []
    assert not backend.sync.exists(backend._part(backend._name(objs[0].key), 2))


async def test_a_whole_frame_written_by_the_earlier_version_still_reads(backend) -> None:
    obj = raw_obj(random_key(), random_kv(2, 300, 256, torch.float16, seed=5))
    backend.sync.set(backend._name(obj.key), frame.encode(obj))  # one value of 600 KiB
    assert_same_obj(await backend.get(obj.key), obj)


@pytest.mark.parametrize("damage", ["delete", "shorten"])
async def test_a_lost_part_is_a_miss_and_the_rest_is_removed(backend, damage: str) -> None:
    obj = sliced_obj(6)
    other = raw_obj(random_key(), random_kv(2, 300, 256, torch.float16, seed=7))
    await backend.batch_put([(obj.key, obj), (other.key, other)])
    name = backend._name(obj.key)
    count = len(layout_in_redis(backend.sync, backend, obj.key))
    middle = backend._part(name, count // 2)
    if damage == "delete":
        backend.sync.delete(middle)
    else:
        backend.sync.set(middle, backend.sync.get(middle)[:-1])
    got = await backend.batch_get([obj.key, other.key])
    assert got[0] is None, "a chunk with a part missing is a miss"
    assert_same_obj(got[1], other)
    assert backend.sync.exists(name, *backend._parts(name, count)) == 0, "its other parts are removed"
    assert await backend.contains(obj.key) is False
    assert backend.corrupt_count == 0, "a lost part is a miss, not corruption"


async def test_every_part_gets_the_ttl(redis_server) -> None:
    backend = tier(redis_server.url, ttl=60)
    await backend.start()
    client = redis.Redis.from_url(redis_server.url)
    try:
        obj = sliced_obj(8)
        await backend.put(obj.key, obj)
        name = backend._name(obj.key)
        names = [name, *backend._parts(name, len(layout_in_redis(client, backend, obj.key)))]
        assert len(names) > 2 and all(0 < client.pttl(n) <= 60_000 for n in names)
    finally:
        await backend.clear()
        await backend.close()
        client.close()


async def test_parts_share_the_first_parts_cluster_slot(redis_cluster) -> None:
    backend = tier(redis_cluster.url, mode="cluster")
    client = redis.RedisCluster.from_url(redis_cluster.url)
    name = backend._name(random_key())
    assert {client.keyslot(n) for n in [name, *backend._parts(name, 4)]} == {client.keyslot(name)}
    client.close()
