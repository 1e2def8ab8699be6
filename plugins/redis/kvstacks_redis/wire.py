"""Writing frames to Redis without joining them.

redis-py needs a value as one bytes object, so a frame (header, payload, checksum)
would be joined (a copy of the payload), and asyncio on Python 3.11 joins and buffers
what it writes (one or two more). For a standalone or Sentinel server we instead
speak RESP ourselves on a pooled redis-py connection: the small pieces of a pipeline
are gathered into one buffer, and each payload goes to the socket in slices straight
from the tensor's memory, waiting for the socket to drain between slices, so at most a
slice is ever copied. Redis Cluster goes through redis-py's pipeline (it routes by slot
and follows redirections), with the frame joined once.
"""

from __future__ import annotations

import asyncio

import redis.exceptions as rexc
from redis.asyncio import Redis

#: payload pieces at least this big go to the socket on their own, in slices this big
SLICE = 1 << 20


def _command(name: bytes, size: int, ttl_ms: int | None) -> bytes:
    """RESP for ``SET name <size bytes follow> [PX ttl]`` up to the value's length line."""
    if ttl_ms is None:
        head = b"*3\r\n$3\r\nSET\r\n"
    else:
        head = b"*5\r\n$3\r\nSET\r\n"
    return head + b"$%d\r\n%s\r\n$%d\r\n" % (len(name), name, size)


def _ttl_tail(ttl_ms: int | None) -> bytes:
    if ttl_ms is None:
        return b"\r\n"
    ttl = str(ttl_ms).encode()
    return b"\r\n$2\r\nPX\r\n$%d\r\n%s\r\n" % (len(ttl), ttl)


def _pieces(batch: list[tuple[bytes, list]], ttl_ms: int | None) -> list[bytes | memoryview]:
    """The whole pipeline as a list of buffers: small ones merged, large ones as they are."""
    out: list[bytes | memoryview] = []
    small = bytearray()
    tail = _ttl_tail(ttl_ms)
    for name, parts in batch:
        small += _command(name, sum(len(p) for p in parts), ttl_ms)
        for part in parts:
            if len(part) >= SLICE:
                if small:
                    out.append(bytes(small))
                    small.clear()
                out.append(part)
            else:
                small += part
        small += tail
    if small:
        out.append(bytes(small))
    return out


async def _send(conn, pieces: list, timeout: float | None) -> None:
    writer = conn._writer  # redis-py's asyncio StreamWriter for this connection
    for piece in pieces:
        view = memoryview(piece).cast("B")
        for start in range(0, len(view), SLICE):
            writer.write(view[start : start + SLICE])
            if writer.transport.get_write_buffer_size():
                async with asyncio.timeout(timeout):
                    await writer.drain()
    async with asyncio.timeout(timeout):
        await writer.drain()


async def put_frames_raw(client: Redis, batch: list[tuple[bytes, list]], ttl_ms: int | None) -> None:
    pool = client.connection_pool
    conn = await pool.get_connection()
    try:
        try:
            await _send(conn, _pieces(batch, ttl_ms), conn.socket_timeout)
            errors = []
            for _ in batch:
                try:
                    await conn.read_response()
                except rexc.ResponseError as exc:  # the reply was read in full: the rest still follow
                    errors.append(exc)
        except BaseException:
            # a half-sent pipeline leaves the stream unusable; a half-sent SET is never applied
            await conn.disconnect(nowait=True)
            raise
    finally:
        await pool.release(conn)
    if errors:
        raise errors[0]


async def put_frames_joined(client, batch: list[tuple[bytes, list]], ttl_ms: int | None) -> None:
    if len(batch) == 1:
        name, parts = batch[0]
        await client.set(name, b"".join(parts), px=ttl_ms)
        return
    pipe = client.pipeline(transaction=False)
    for name, parts in batch:
        pipe.set(name, b"".join(parts), px=ttl_ms)
    for result in await pipe.execute(raise_on_error=False):
        if isinstance(result, Exception):
            raise result


async def put_frames(client, batch: list[tuple[bytes, list]], ttl_ms: int | None) -> None:
    """SET every ``(name, frame parts)`` of ``batch`` in one round trip."""
    if isinstance(client, Redis):
        await put_frames_raw(client, batch, ttl_ms)
    else:
        await put_frames_joined(client, batch, ttl_ms)
