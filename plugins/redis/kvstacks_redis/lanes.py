"""Chunk values between tensor memory and Redis on blocking sockets, in worker threads.

redis-py copies a large value on its way several times (a command is one bytes object,
asyncio buffers what the socket does not take at once, the parser joins 64 KiB reads),
and one event loop thread makes every kernel copy one after another. For a standalone or
Sentinel server the tier instead moves values on the connections of a second, synchronous
redis-py pool, which does everything but the transfer itself (connecting, AUTH, SELECT,
TLS, asking Sentinel for the master, reconnecting a socket the server closed). A batch is
spread over a few such connections, each driven by a worker thread:

- a pipeline of SETs leaves with ``sendmsg``, gathered straight from the tensors'
  memory: header, the payload's contiguous runs (``frame.encode_runs``) and checksum;
- each GET's value is received with ``recv_into`` into a buffer of its final size, and
  checked (the frame's checksum) in the same thread;
- a value stored in several parts (several keys) is sent as one SET per part, cut from
  the same buffers, and read whole: the other parts' GETs follow as soon as the first
  part says how long the whole value is, each part received at its offset.

The threads release the GIL in every send, receive and checksum, so the copies of a
batch run on all cores while the event loop stays free, and each socket's timeout bounds
every send and receive. A connection whose pipeline did not finish cleanly is closed,
never handed back out of step.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
import redis.exceptions as rexc

#: buffers handed to one ``sendmsg`` (Linux refuses more than 1024)
MAX_IOV = 512
#: bytes gathered into one send
GATHER = 1 << 20
#: a value to SET: the ``(name, size)`` of each of its parts, and the buffers that hold them
#: in order (an iterable consumed in the worker thread)
Value = tuple[list[tuple[bytes, int]], Iterable]
#: the longest reply line accepted before a value (``$<length>``, an error message)
MAX_LINE = 1 << 16
#: bytes of a value read before its buffer is chosen: enough to learn a stored-in-parts
#: value's whole length (a kvstacks frame's length fields, ``frame.LENGTH_FIELDS``)
PEEK = 64
#: the most parts a value is read in (a damaged first part may claim any length)
MAX_PARTS = 4096


def set_command(name: bytes, size: int, ttl_ms: int | None) -> bytes:
    """RESP for ``SET name <size bytes follow> [PX ttl]`` up to the value's length line."""
    head = b"*3\r\n$3\r\nSET\r\n" if ttl_ms is None else b"*5\r\n$3\r\nSET\r\n"
    return head + b"$%d\r\n%s\r\n$%d\r\n" % (len(name), name, size)


def set_tail(ttl_ms: int | None) -> bytes:
    """RESP after a SET's value: its CRLF, then ``PX ttl`` if there is one."""
    if ttl_ms is None:
        return b"\r\n"
    ttl = str(ttl_ms).encode()
    return b"\r\n$2\r\nPX\r\n$%d\r\n%s\r\n" % (len(ttl), ttl)


def get_command(name: bytes) -> bytes:
    return b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(name), name)


def set_stream(batch: list[Value], ttl_ms: int | None) -> Iterator[bytes | memoryview]:
    """A pipeline of SETs as the buffers to send, in order: for each ``(layout, pieces)``
    of ``batch``, one SET per ``(name, size)`` of ``layout``, its value the next ``size``
    bytes of ``pieces`` (views of them: nothing is copied)."""
    tail = set_tail(ttl_ms)
    for layout, pieces in batch:
        pieces = (piece for piece in pieces if len(piece))
        rest = memoryview(b"")
        for n, (name, size) in enumerate(layout):
            yield set_command(name, size, ttl_ms)
            left = size
            while left:
                if not len(rest):
                    piece = next(pieces, None)
                    if piece is None:
                        # the connection is closed on the way out, so the SET is never applied
                        raise ValueError(f"a value of {sum(s for _, s in layout)} bytes was announced and fewer were given")
                    rest = memoryview(piece).cast("B")
                take = min(left, len(rest))
                yield rest[:take]
                rest, left = rest[take:], left - take
            if n == len(layout) - 1 and (len(rest) or next(pieces, None) is not None):
                raise ValueError(f"a value of {sum(s for _, s in layout)} bytes was announced and more were given")
            yield tail


def send_stream(sock, pieces: Iterable, gather: int = GATHER) -> None:
    """Send ``pieces`` in order, about ``gather`` bytes per call: each goes out while the
    next is being made (hashed), not after all of them."""
    group: list = []
    size = 0
    for piece in pieces:
        group.append(piece)
        size += len(piece)
        if size >= gather:
            send_all(sock, group)
            group, size = [], 0
    if group:
        send_all(sock, group)


def send_all(sock, pieces: list) -> None:
    """Send every buffer of ``pieces`` in order, gathered where the socket can."""
    views = [memoryview(p).cast("B") for p in pieces if len(p)]
    if isinstance(sock, ssl.SSLSocket):  # no sendmsg over TLS: it encrypts piece by piece anyway
        for view in views:
            sock.sendall(view)
        return
    at = 0
    while at < len(views):
        sent = sock.sendmsg(views[at : at + MAX_IOV])
        while sent:
            if sent >= len(views[at]):
                sent -= len(views[at])
                at += 1
            else:
                views[at] = views[at][sent:]
                sent = 0


class ReplyReader:
    """Reads RESP replies from a blocking socket: lines through a small buffer of its own,
    values straight into the caller's."""

    def __init__(self, sock) -> None:
        self.sock = sock
        self._buf = bytearray(1 << 16)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    @property
    def pending(self) -> int:
        """Bytes received past what was read: after the last reply, the stream is out of step."""
        return self._end - self._start

    def line(self) -> bytes:
        """The next line, without its CRLF."""
        while True:
            at = self._buf.find(b"\r\n", self._start, self._end)
            if at >= 0:
                line = bytes(self._view[self._start : at])
                self._start = at + 2
                return line
            if self._end - self._start >= MAX_LINE:
                raise rexc.InvalidResponse("a reply line from the server is too long")
            self._receive()

    def skip(self, size: int) -> None:
        """Read past the next ``size`` bytes of the stream (a value that is not wanted)."""
        scratch = memoryview(bytearray(min(size, 1 << 16)))
        while size:
            take = min(size, len(scratch))
            self.read_into(scratch[:take])
            size -= take

    def read_into(self, view: memoryview, feed: Callable[[memoryview], Any] | None = None) -> None:
        """Fill ``view`` with the next ``len(view)`` bytes of the stream; ``feed`` sees each
        piece right after it arrived."""
        got = min(self.pending, len(view))
        view[:got] = self._view[self._start : self._start + got]
        self._start += got
        if feed is not None and got:
            feed(view[:got])
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if not n:
                raise rexc.ConnectionError("Redis closed the connection in the middle of a reply")
            if feed is not None:
                feed(view[got : got + n])
            got += n

    def _receive(self) -> None:
        if self._start:
            kept = self._end - self._start
            self._view[:kept] = self._view[self._start : self._end]
            self._start, self._end = 0, kept
        n = self.sock.recv_into(self._view[self._end :])
        if not n:
            raise rexc.ConnectionError("Redis closed the connection")
        self._end += n


def read_set_replies(reader: ReplyReader, count: int) -> list[rexc.ResponseError]:
    """Read ``count`` replies to SET; the errors among them (the rest were ``+OK``)."""
    errors = []
    for _ in range(count):
        line = reader.line()
        if line[:1] == b"-":
            errors.append(rexc.ResponseError(line[1:].decode("utf-8", "replace")))
        elif line[:1] != b"+":
            raise rexc.InvalidResponse(f"unexpected reply to SET: {line[:40]!r}")
    return errors


def read_get_reply(
    reader: ReplyReader, alloc: Callable[[int], Any], watch: Callable[[int], Any] | None = None
) -> tuple[memoryview | rexc.ResponseError | None, Any]:
    """The next reply to GET: the value as a memoryview of a buffer from ``alloc(length)``,
    None for a missing key, or the server's error; and the watcher ``watch(length)``, whose
    ``update`` was given each piece of the value as it arrived (None without a value)."""
    size = read_length(reader)
    if not isinstance(size, int):
        return size, None
    value = memoryview(alloc(size)).cast("B")
    watcher = watch(size) if watch is not None else None
    reader.read_into(value, None if watcher is None else watcher.update)
    read_crlf(reader)
    return value, watcher


def read_crlf(reader: ReplyReader) -> None:
    crlf = memoryview(bytearray(2))
    reader.read_into(crlf)
    if crlf != b"\r\n":
        raise rexc.InvalidResponse("a bulk reply from the server does not end in CRLF")


def read_length(reader: ReplyReader) -> int | rexc.ResponseError | None:
    """The length line of the next reply to GET: the value's length (its bytes follow),
    None for a missing key, or the server's error."""
    line = reader.line()
    kind = line[:1]
    if kind == b"$":
        try:
            size = int(line[1:])
        except ValueError:
            raise rexc.InvalidResponse(f"bad bulk length from the server: {line[:40]!r}") from None
        return None if size < 0 else size
    if kind == b"_":  # RESP3's null
        return None
    if kind == b"-":
        return rexc.ResponseError(line[1:].decode("utf-8", "replace"))
    raise rexc.InvalidResponse(f"unexpected reply to GET: {line[:40]!r}")


class Incomplete:
    """A value stored in parts of which one is missing or has the wrong length: a miss.
    ``names`` are all its parts (to delete), ``buffer`` what was received into."""

    def __init__(self, names: list[bytes], buffer: memoryview) -> None:
        self.names, self.buffer = names, buffer


def spread(items: list, lanes: int) -> list[list[int]]:
    """Indexes of ``items`` dealt round robin into at most ``lanes`` non-empty groups."""
    lanes = max(1, min(lanes, len(items)))
    return [list(range(start, len(items), lanes)) for start in range(lanes)]


class Lanes:
    """Worker threads, each moving values on one connection of a synchronous redis-py pool."""

    def __init__(self, client: redis.Redis, threads: int) -> None:
        self.client = client
        self.threads = threads
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="kvstacks-redis")

    async def set_many(self, batch: list[Value], ttl_ms: int | None, lanes: int) -> None:
        """SET every value of ``batch`` (in its parts, see ``set_stream``), the values spread
        over up to ``lanes`` connections. Its pieces are consumed in the worker thread: an
        iterator that makes them (``frame.encode_streamed``) runs beside the loop."""
        groups = spread(batch, lanes)
        await self._run([(self._set_group, [batch[i] for i in group], ttl_ms) for group in groups])

    async def get_many(
        self,
        names: list[bytes],
        alloc: Callable[[int], Any],
        check: Callable[[int, memoryview, Any], Any],
        lanes: int,
        watch: Callable[[int], Any] | None = None,
        whole: Callable[[memoryview], int | None] | None = None,
        parts: Callable[[bytes, int], list[bytes]] | None = None,
    ) -> list:
        """GET every name, spread over up to ``lanes`` connections. Each value is received
        into ``alloc(length)``, its pieces shown as they arrive to ``watch(length)`` (e.g. a
        running checksum), and replaced, in the worker thread, by
        ``check(index, value, watcher)`` before the next one is read; a missing key is None.

        A value may be stored in parts (see ``set_stream``): ``whole(first bytes)`` says how
        long the whole value is (from the first ``PEEK`` bytes of its first part; None: this
        part is all of it), and ``parts(name, count)`` names the other parts. Their GETs are
        sent as soon as the first part's length is read, while the server still sends the
        rest of the batch, and each part is received into the whole value's buffer at its
        offset. A part missing or of the wrong length makes the value ``Incomplete``."""
        groups = spread(names, lanes)
        results = await self._run([
            (self._get_group, group, [names[i] for i in group], alloc, check, watch, whole, parts)
            for group in groups
        ])
        out: list = [None] * len(names)
        for group, values in zip(groups, results):
            for i, value in zip(group, values):
                out[i] = value
        return out

    async def _run(self, calls: list[tuple]) -> list:
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(
            *(loop.run_in_executor(self._executor, *call) for call in calls), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    def _set_group(self, batch: list[Value], ttl_ms: int | None) -> None:
        with _Borrowed(self.client.connection_pool) as sock:
            send_stream(sock, set_stream(batch, ttl_ms))
            reader = ReplyReader(sock)
            errors = read_set_replies(reader, sum(len(layout) for layout, _ in batch))
            _check_in_step(reader)
        if errors:
            raise errors[0]

    def _get_group(self, indexes: list[int], names: list[bytes], alloc, check, watch, whole, parts) -> list:
        out: list = [None] * len(names)
        errors = []
        with _Borrowed(self.client.connection_pool) as sock:
            sock.sendall(b"".join(get_command(name) for name in names))
            reader = ReplyReader(sock)
            # the replies to come, in order: (j, None) for a first part, else (j, that value's state)
            expected: deque = deque((j, None) for j in range(len(names)))
            while expected:
                j, part = expected.popleft()
                size = read_length(reader)
                if isinstance(size, rexc.ResponseError):
                    errors.append(size)  # the other replies still follow: read them
                    size = None
                if part is None:
                    if size is None:
                        continue
                    head = memoryview(bytearray(min(size, PEEK)))
                    reader.read_into(head)
                    total = whole(head) if whole is not None else None
                    if total is None or total <= size or total > size * MAX_PARTS:
                        total = size  # one value (or not one we can read in parts: its check will say)
                    value = memoryview(alloc(total)).cast("B")
                    value[: len(head)] = head
                    watcher = watch(total) if watch is not None else None
                    if watcher is not None:
                        watcher.update(head)
                    reader.read_into(value[len(head) : size], None if watcher is None else watcher.update)
                    read_crlf(reader)
                    if total > size:
                        more = parts(names[j], -(-total // size))
                        sock.sendall(b"".join(get_command(name) for name in more))
                        state = _Parts([names[j], *more], value, watcher, size)
                        expected.extend((j, state) for _ in more)
                        continue
                elif part.broken or size is None or size != part.expected:
                    if size is not None:
                        reader.skip(size + 2)
                    if not part.broken:
                        part.broken = True
                        out[j] = Incomplete(part.names, part.value)
                    continue
                else:
                    value, watcher = part.value, part.watcher
                    reader.read_into(value[part.at : part.at + size], None if watcher is None else watcher.update)
                    read_crlf(reader)
                    part.at += size
                    if part.at < len(value):
                        continue
                # checked now, while the server already sends the next value
                out[j] = check(indexes[j], value, watcher)
            _check_in_step(reader)
        if errors:
            raise errors[0]
        return out

    def drop_idle(self) -> None:
        """Close the idle connections (after an outage they are suspect)."""
        self.client.connection_pool.disconnect(inuse_connections=False)

    def close(self) -> None:
        """Close every connection, also those in use (which fails their transfers at once)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.client.connection_pool.disconnect(inuse_connections=True)


class _Parts:
    """A value read in parts: where the next part goes."""

    def __init__(self, names: list[bytes], value: memoryview, watcher: Any, first: int) -> None:
        self.names, self.value, self.watcher = names, value, watcher
        self.part_size = self.at = first
        self.broken = False

    @property
    def expected(self) -> int:
        return min(self.part_size, len(self.value) - self.at)


def _check_in_step(reader: ReplyReader) -> None:
    if reader.pending:
        raise rexc.InvalidResponse("Redis sent more replies than commands were sent")


class _Borrowed:
    """A pooled connection's socket for one pipeline; closed instead of returned if it failed."""

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self.pool = pool
        self.conn = pool.get_connection()

    def __enter__(self):
        sock = self.conn._sock
        if sock is None:
            self.pool.release(self.conn)
            raise rexc.ConnectionError("the Redis connection closed before the transfer")
        return sock

    def __exit__(self, kind, exc, tb) -> None:
        if kind is not None:
            self.conn.disconnect()  # replies may still be in flight: the stream is unusable
        self.pool.release(self.conn)
