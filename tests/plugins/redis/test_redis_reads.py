"""Values move in worker threads on blocking sockets (lanes.py): replies parsed however the
bytes arrive, values received into buffers of their size, strided chunks sent uncopied."""

from __future__ import annotations

import os

import pytest
import redis
import redis.exceptions as rexc
import torch
from kvstacks.keys import CacheKey
from kvstacks.memory import MemoryObj
from kvstacks_redis.backend import RedisBackend
from kvstacks_redis.connect import RedisOptions
from kvstacks_redis.lanes import Lanes, ReplyReader, read_get_reply, read_set_replies, spread


class Trickle:
    """A socket that delivers ``stream`` at most ``piece`` bytes per receive."""

    def __init__(self, stream: bytes, piece: int) -> None:
        self.stream, self.piece, self.at = stream, piece, 0

    def recv_into(self, view) -> int:
        n = min(self.piece, len(view), len(self.stream) - self.at)
        view[:n] = self.stream[self.at : self.at + n]
        self.at += n
        return n


@pytest.mark.parametrize("piece", [1, 3, 7, 4096, 1 << 20])
def test_replies_parse_however_the_bytes_arrive(piece: int) -> None:
    big = os.urandom(100_000)
    stream = b"$5\r\nhello\r\n$-1\r\n_\r\n$0\r\n\r\n-WRONGTYPE no\r\n$100000\r\n" + big + b"\r\n+OK\r\n-OOM full\r\n"
    reader = ReplyReader(Trickle(stream, piece))
    values = [read_get_reply(reader, bytearray)[0] for _ in range(6)]
    assert bytes(values[0]) == b"hello" and values[1] is None and values[2] is None
    assert bytes(values[3]) == b"" and isinstance(values[4], rexc.ResponseError)
    assert bytes(values[5]) == big and len(values[5].obj) == len(big), "the value lands in a buffer of its size"
    errors = read_set_replies(reader, 2)
    assert [str(e) for e in errors] == ["OOM full"] and reader.pending == 0


@pytest.mark.parametrize("stream", [b"+OK\r\n", b"$abc\r\n", b"$3\r\nabcXY", b":1\r\n"])
def test_a_reply_that_is_not_an_answer_to_get_is_an_error(stream: bytes) -> None:
    with pytest.raises(rexc.InvalidResponse):
        read_get_reply(ReplyReader(Trickle(stream, 2)), bytearray)


def test_a_reply_that_is_not_an_answer_to_set_is_an_error() -> None:
    with pytest.raises(rexc.InvalidResponse, match="SET"):
        read_set_replies(ReplyReader(Trickle(b"$1\r\na\r\n", 4)), 1)


@pytest.mark.parametrize("stream", [b"", b"$10\r\nabc", b"$3\r\nabc"])
def test_a_connection_closed_mid_reply_is_a_connection_error(stream: bytes) -> None:
    with pytest.raises(rexc.ConnectionError):
        read_get_reply(ReplyReader(Trickle(stream, 4)), bytearray)


def test_an_endless_line_is_refused() -> None:
    with pytest.raises(rexc.InvalidResponse, match="too long"):
        read_get_reply(ReplyReader(Trickle(b"-" + b"x" * (1 << 17), 1 << 12)), bytearray)


def test_bytes_after_the_last_reply_are_noticed() -> None:
    reader = ReplyReader(Trickle(b"$1\r\na\r\n$1\r\nb\r\n", 64))
    assert bytes(read_get_reply(reader, bytearray)[0]) == b"a" and reader.pending


def test_spread_deals_round_robin() -> None:
    assert spread(list("abcde"), 2) == [[0, 2, 4], [1, 3]]
    assert spread(list("ab"), 8) == [[0], [1]]
    assert spread([], 4) == [[]]


async def test_lanes_set_and_get_on_a_real_server_and_the_pool_after_an_error(redis_server) -> None:
    client = redis.Redis.from_url(redis_server.url, max_connections=4)
    lanes = Lanes(client, 4)
    prefix = os.urandom(6).hex().encode()
    values = {prefix + b"empty": b"", prefix + b"one": b"x", prefix + b"big": os.urandom(3 << 20)}
    try:
        await lanes.set_many([([(n, len(v))], [v[:10], memoryview(v)[10:]]) for n, v in values.items()], None, 2)
        client.rpush(prefix + b"list", b"a")
        names = [prefix + b"big", prefix + b"missing", prefix + b"one", prefix + b"empty"]
        got = await lanes.get_many(names, bytearray, lambda i, v, w: (i, bytes(v)), 3)
        assert got == [None if values.get(n) is None else (i, values[n]) for i, n in enumerate(names)]
        with pytest.raises(rexc.ResponseError, match="WRONGTYPE"):
            await lanes.get_many([prefix + b"one", prefix + b"list"], bytearray, lambda i, v, w: v, 1)
        # a SET with a ttl, and the pool still serves after the error above
        await lanes.set_many([([(prefix + b"ttl", 1)], [b"v"])], 60_000, 1)
        assert 0 < client.pttl(prefix + b"ttl") <= 60_000
        assert (await lanes.get_many([prefix + b"big"], bytearray, lambda i, v, w: bytes(v), 1)) == [values[prefix + b"big"]]
    finally:
        client.delete(*values, prefix + b"list", prefix + b"ttl")
        lanes.close()


def test_a_sliced_chunk_is_sent_as_views_of_its_memory() -> None:
    kv = torch.randn(2, 4, 1024, 256).to(torch.float16)  # runs of 128 KiB
    part = kv[:, :, 256:512]
    obj = MemoryObj(CacheKey("m", "kv", 1, 0, b"\x01" * 16), part, tuple(part.shape), part.dtype)
    runs = obj.payload_runs()
    assert len(runs) == 8, "one run per [k/v, layer] block"
    assert runs[0].obj.__array_interface__["data"][0] == part.data_ptr(), "a run is the tensor's memory, not a copy"
    assert b"".join(bytes(r) for r in runs) == bytes(obj.payload())
    tiny = kv[:, :, :, :4]  # runs of 8 bytes: one copy instead
    assert len(MemoryObj(obj.key, tiny, tuple(tiny.shape), tiny.dtype).payload_runs()) == 1


async def test_a_sliced_chunk_round_trips_and_buffers_are_reused_only_after_release(redis_server) -> None:
    backend = RedisBackend(RedisOptions(url=redis_server.url, prefix=f"reads-{os.urandom(4).hex()}:"))
    await backend.start()
    key = CacheKey("m", "kv", 1, 0, b"\x07" * 16)
    kv = torch.randn(2, 2, 256, 64).to(torch.bfloat16)[:, :, 64:128]
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


async def test_a_value_shorter_than_announced_is_never_applied(redis_server) -> None:
    client = redis.Redis.from_url(redis_server.url, max_connections=2)
    lanes = Lanes(client, 2)
    name = os.urandom(6).hex().encode()
    try:
        with pytest.raises(ValueError, match="announced"):
            await lanes.set_many([([(name, 10)], [b"short"])], None, 1)
        assert client.exists(name) == 0
        await lanes.set_many([([(name, 5)], [b"right"])], None, 1)
        assert client.get(name) == b"right"
    finally:
        client.delete(name)
        lanes.close()
