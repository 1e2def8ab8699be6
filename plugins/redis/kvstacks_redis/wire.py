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
from collections.abc import Callable

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


# -- reads ----------------------------------------------------------------------------------------
#
# redis-py reads a reply in 64 KiB pieces, joins them in its parser's buffer and slices the value
# out: a 32 MiB GET took 86 ms here where LMCache's own RESP client took 38. For a standalone
# server we lend the connection's transport a protocol of our own for one pipeline of GETs: the
# transport then receives each value straight into a buffer of its final size (``recv_into``),
# and hands the connection back to redis-py, whose protocol sees nothing of it.


class _GetReplies(asyncio.BufferedProtocol):
    """Parses ``count`` replies to GET, receiving each value into its own ``bytearray``."""

    def __init__(self, count: int, loop: asyncio.AbstractEventLoop, alloc: Callable[[int], bytearray]) -> None:
        self.count = count
        self._alloc = alloc
        self.values: list[memoryview | rexc.ResponseError | None] = []
        self.done: asyncio.Future = loop.create_future()
        self._head = bytearray()  # bytes of reply headers not parsed yet
        self._scratch = bytearray(1 << 16)
        self._value: bytearray | None = None  # the value being received, with its CRLF
        self._filled = 0
        self.overrun = False  # bytes came after the last reply: the stream is out of step

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._value is not None:
            return memoryview(self._value)[self._filled :]
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        if self._value is not None:
            self._filled += nbytes
            if self._filled == len(self._value):
                self._finish_value()
            return
        if self.done.done():
            self.overrun = True
            return
        self._head += memoryview(self._scratch)[:nbytes]
        try:
            self._parse()
        except rexc.InvalidResponse as exc:
            self._fail(exc)

    def _parse(self) -> None:
        head = self._head
        while head and self._value is None and not self.done.done():
            end = head.find(b"\r\n")
            if end < 0:
                if len(head) > 4096:
                    raise rexc.InvalidResponse("a reply line from the server is too long")
                return
            line = bytes(head[:end])
            kind = line[:1]
            if kind == b"$":
                try:
                    size = int(line[1:])
                except ValueError:
                    raise rexc.InvalidResponse(f"bad bulk length from the server: {line[:40]!r}") from None
                if size < 0:
                    del head[: end + 2]
                    self._add(None)
                    continue
                value = self._alloc(size + 2)
                got = min(len(head) - end - 2, size + 2)
                value[:got] = memoryview(head)[end + 2 : end + 2 + got]
                del head[: end + 2 + got]
                self._value, self._filled = value, got
                if got == size + 2:
                    self._finish_value()
            elif kind == b"_":  # RESP3's null
                del head[: end + 2]
                self._add(None)
            elif kind == b"-":
                del head[: end + 2]
                self._add(rexc.ResponseError(line[1:].decode("utf-8", "replace")))
            else:
                raise rexc.InvalidResponse(f"unexpected reply to GET: {line[:40]!r}")
        if head and self.done.done():
            self.overrun = True

    def _finish_value(self) -> None:
        value, self._value = self._value, None
        assert value is not None
        if value[-2:] != b"\r\n":
            self._fail(rexc.InvalidResponse("a bulk reply from the server does not end in CRLF"))
            return
        self._add(memoryview(value)[:-2])
        if self._head:
            self._parse()

    def _add(self, value) -> None:
        self.values.append(value)
        if len(self.values) == self.count and not self.done.done():
            self.done.set_result(self.values)

    def _fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)

    def eof_received(self) -> bool:
        self._fail(rexc.ConnectionError("Redis closed the connection during a GET"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(rexc.ConnectionError(f"connection to Redis lost during a GET: {exc or 'closed'}"))


def _get_command(name: bytes) -> bytes:
    return b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(name), name)


def _lendable(conn) -> bool:
    """Whether this connection's transport can be lent to ``_GetReplies`` now: plain
    TCP or unix socket (a TLS transport may hold decrypted bytes of its own), reading,
    nothing buffered on redis-py's side."""
    writer, reader = getattr(conn, "_writer", None), getattr(conn, "_reader", None)
    if writer is None or reader is None:
        return False
    transport = writer.transport
    return (
        transport.get_extra_info("sslcontext") is None
        and hasattr(transport, "set_protocol")
        and transport.is_reading()
        and not getattr(reader, "_buffer", b"x")
    )


async def get_values_raw(client: Redis, names: list[bytes], alloc: Callable[[int], bytearray] = bytearray) -> list:
    """GET every name in one round trip: each value as a writable ``memoryview`` into a
    buffer from ``alloc(len(value) + 2)`` (``frame.decode`` then shares it; ``.obj`` is the
    buffer), None for a missing key. A value redis-py had to read (a connection that
    cannot be lent) comes as ``bytes``."""
    pool = client.connection_pool
    conn = await pool.get_connection()
    try:
        if not _lendable(conn):
            return await _get_values_redis_py(conn, names)
        transport = conn._writer.transport
        original = transport.get_protocol()
        replies = _GetReplies(len(names), asyncio.get_running_loop(), alloc)
        transport.set_protocol(replies)
        try:
            transport.write(b"".join(_get_command(n) for n in names))
            async with asyncio.timeout(conn.socket_timeout):
                values = await replies.done
            if replies.overrun:
                raise rexc.InvalidResponse("Redis sent more replies than GETs were sent")
        except BaseException:
            await conn.disconnect(nowait=True)  # replies may still be in flight: the stream is unusable
            raise
        finally:
            transport.set_protocol(original)
    finally:
        await pool.release(conn)
    for value in values:
        if isinstance(value, rexc.ResponseError):
            raise value
    return values


async def _get_values_redis_py(conn, names: list[bytes]) -> list:
    try:
        for name in names:
            await conn.send_command("GET", name)
        values = []
        for _ in names:
            values.append(await conn.read_response())
    except BaseException:
        await conn.disconnect(nowait=True)
        raise
    return values
