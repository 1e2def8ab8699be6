"""Large GETs read straight into reusable buffers (wire.get_values_raw), beside redis-py."""

from __future__ import annotations

import asyncio
import os

import pytest
import redis.exceptions as rexc
import torch
from kvstacks.keys import CacheKey
from kvstacks.memory import MemoryObj
from kvstacks_redis.backend import RedisBackend
from kvstacks_redis.connect import RedisOptions
from kvstacks_redis.wire import _GetReplies, get_values_raw
from redis.asyncio import Redis


def feed(replies: _GetReplies, stream: bytes, piece: int) -> None:
    """Deliver ``stream`` as the transport would, at most ``piece`` bytes per receive."""
    at = 0
    while at < len(stream):
        buf = replies.get_buffer(-1)
        n = min(piece, len(buf), len(stream) - at)
        buf[:n] = stream[at : at + n]
        replies.buffer_updated(n)
        at += n


@pytest.mark.parametrize("piece", [1, 3, 7, 4096, 1 << 20])
def test_replies_parse_however_the_bytes_arrive(piece: int) -> None:
    big = os.urandom(100_000)
    stream = b"$5\r\nhello\r\n$-1\r\n_\r\n$0\r\n\r\n-WRONGTYPE no\r\n$100000\r\n" + big + b"\r\n"
    loop = asyncio.new_event_loop()
    try:
        replies = _GetReplies(6, loop, bytearray)
        feed(replies, stream, piece)
        values = replies.done.result()
    finally:
        loop.close()
    assert bytes(values[0]) == b"hello" and values[1] is None and values[2] is None
    assert bytes(values[3]) == b"" and isinstance(values[4], rexc.ResponseError)
    assert bytes(values[5]) == big and len(values[5].obj) == len(big) + 2, "the value lands in a buffer of its size"


@pytest.mark.parametrize("stream", [b"+OK\r\n", b"$abc\r\n", b"$3\r\nabcXY"])
def test_a_reply_that_is_not_an_answer_to_get_is_an_error(stream: bytes) -> None:
    loop = asyncio.new_event_loop()
    try:
        replies = _GetReplies(1, loop, bytearray)
        feed(replies, stream, 2)
        with pytest.raises(rexc.InvalidResponse):
            replies.done.result()
    finally:
        loop.close()


def test_bytes_after_the_last_reply_are_noticed() -> None:
    loop = asyncio.new_event_loop()
    try:
        replies = _GetReplies(1, loop, bytearray)
        feed(replies, b"$1\r\na\r\n$1\r\nb\r\n", 2)
        assert bytes(replies.done.result()[0]) == b"a" and replies.overrun
    finally:
        loop.close()


async def test_a_pipeline_of_gets_and_the_connection_after_it(redis_server) -> None:
    client = Redis.from_url(redis_server.url, single_connection_client=False)
    prefix = os.urandom(6).hex().encode()
    values = {prefix + b"empty": b"", prefix + b"one": b"x", prefix + b"big": os.urandom(3 << 20)}
    try:
        for name, value in values.items():
            await client.set(name, value)
        await client.rpush(prefix + b"list", b"a")
        names = [prefix + b"big", prefix + b"missing", prefix + b"one", prefix + b"empty"]
        got = await get_values_raw(client, names)
        assert [None if v is None else bytes(v) for v in got] == [values.get(n) for n in names]
        # The connection went back to redis-py intact: it reads its own replies again.
        assert await client.get(prefix + b"one") == b"x"
        with pytest.raises(rexc.ResponseError, match="WRONGTYPE"):
            await get_values_raw(client, [prefix + b"one", prefix + b"list"])
        assert await client.ping()
        assert [bytes(v) for v in await get_values_raw(client, [prefix + b"big"])] == [values[prefix + b"big"]]
    finally:
        await client.delete(*values, prefix + b"list")
        await client.aclose()


async def test_read_buffers_are_reused_only_after_release(redis_server) -> None:
    backend = RedisBackend(RedisOptions(url=redis_server.url, prefix=f"reads-{os.urandom(4).hex()}:"))
    await backend.start()
    key = CacheKey("m", "kv", 1, 0, b"\x07" * 16)
    kv = torch.randn(2, 2, 64, 64).to(torch.float16)
    try:
        await backend.put(key, MemoryObj(key, kv, tuple(kv.shape), kv.dtype))
        first = await backend.get(key)
        second = await backend.get(key)
        assert torch.equal(first.data, kv) and torch.equal(second.data, kv)
        assert first.data.data_ptr() != second.data.data_ptr(), "a buffer still lent must not be read into"
        address = first.data.data_ptr()
        backend.release_now(first)
        backend.release_now(first)  # twice: ignored
        del first
        third = await backend.get(key)
        assert third.data.data_ptr() == address, "a released buffer should take the next read"
        assert torch.equal(third.data, kv)
    finally:
        await backend.clear()
        await backend.close()
