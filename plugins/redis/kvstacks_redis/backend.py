"""The ``redis`` backend: chunks as Redis strings, one frame per key (a frame longer than
``part_bytes`` in several, see ``RedisBackend._layout``)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TypeVar

import redis.exceptions as rexc
import torch
from kvstacks import frame
from kvstacks.backend import Backend
from kvstacks.errors import CorruptChunk, InvalidInput, TierFull
from kvstacks.keys import CacheKey
from kvstacks.memory import MemoryObj
from kvstacks.readbuffers import ReadBuffers
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from kvstacks_redis.breaker import CLOSED, CircuitBreaker, RedisUnavailable
from kvstacks_redis.connect import RedisOptions, build_client, build_sync_client, redacted, validate
from kvstacks_redis.lanes import MAX_PARTS, Incomplete, Lanes

log = logging.getLogger("kvstacks.redis")
T = TypeVar("T")

#: a batch is spread over at most this many connections at once, each with its own thread
#: (puts: the server reads one socket while the client's threads fill the others; gets:
#: the server's writes to many sockets at once cost it more CPU than they save)
PUT_LANES = 4
GET_LANES = 2

#: failures that mean "the server is not there", which feed the circuit breaker
UNREACHABLE = (
    rexc.ConnectionError,  # also authentication failures and an unreachable Sentinel master
    rexc.TimeoutError,
    rexc.ClusterDownError,
    rexc.ClusterError,
    rexc.TryAgainError,
    asyncio.TimeoutError,
    OSError,
)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "..."


class RedisBackend(Backend):
    """A tier on Redis (standalone, Sentinel or Cluster), shared by every instance that uses it."""

    name = "redis"
    shared = True
    Options = RedisOptions

    @classmethod
    def check_options(cls, options: RedisOptions) -> None:
        validate(options)

    def __init__(self, options: RedisOptions | None = None) -> None:
        super().__init__(options)
        o: RedisOptions = self.options
        self.prefix = o.prefix.encode("utf-8")
        self.ttl_ms = None if o.ttl is None else max(1, int(o.ttl * 1000))
        self.breaker = CircuitBreaker(o.breaker_failures, o.breaker_backoff, o.breaker_backoff_max)
        self.client: Redis | RedisCluster | None = None
        self._slots: asyncio.Semaphore | None = None
        self._closed = False
        self.corrupt_count = 0  # chunks found corrupt or foreign: the tier's ``corrupt`` statistic
        self._buffers = _UnfilledBuffers(o.read_buffers)
        self._lanes: Lanes | None = None  # standalone and Sentinel: values move in worker threads

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Build the client and ping; an unreachable server opens the breaker instead of raising.

        Bad options (and a credential variable that is not set) raise ConfigError.
        """
        self.client = build_client(self.options)
        sync_client = build_sync_client(self.options)
        if sync_client is not None:
            self._lanes = Lanes(sync_client, self.options.pool_size)
        self._slots = asyncio.Semaphore(self.options.pool_size)
        try:
            async with asyncio.timeout(self.options.connect_timeout + self.options.timeout):
                await self.client.ping()
        except (rexc.AuthenticationError, rexc.AuthorizationError) as exc:
            # a wrong password is not an outage: say so once, loudly, and stay open
            self.breaker.trip(f"authentication failed: {_describe(exc)}")
            log.error("redis tier %s: authentication failed (%s); check username_env/password_env",
                      self._where(), _describe(exc))
        except UNREACHABLE as exc:
            self.breaker.trip(_describe(exc))
            log.warning("redis tier %s is unreachable at start (%s); the tier misses until it answers",
                        self._where(), _describe(exc))
        except rexc.RedisError as exc:
            self.breaker.trip(_describe(exc))
            log.warning("redis tier %s failed at start: %s", self._where(), _describe(exc))

    async def close(self) -> None:
        """Drop every connection; bounded by ``close_timeout`` even if the server hangs."""
        if self._closed or self.client is None:
            self._closed = True
            return
        self._closed = True
        self._buffers.clear()
        client, self.client = self.client, None
        lanes, self._lanes = self._lanes, None
        if lanes is not None:
            try:
                lanes.close()  # in-use sockets are shut down: a thread stuck on a hung server returns at once
            except Exception as exc:
                log.warning("redis tier %s: closing the transfer connections: %s", self._where(), _describe(exc))
        try:
            async with asyncio.timeout(self.options.close_timeout):
                await client.aclose()
        except Exception as exc:  # closing is best effort: never keep the engine from shutting down
            log.warning("redis tier %s did not close cleanly: %s", self._where(), _describe(exc))

    def _where(self) -> str:
        o = self.options
        return f"{o.mode} {redacted(o.url)} prefix {o.prefix!r}"

    # -- the guard every call goes through ----------------------------------------------------

    async def _guarded(self, what: str, call: Callable[[Redis | RedisCluster], Awaitable[T]]) -> T:
        self._check_open()
        self.breaker.check()
        recovering = self.breaker.state != CLOSED
        assert self._slots is not None
        settled = False
        try:
            async with self._slots:
                # things may have changed while this call waited for a connection
                self._check_open()
                if not recovering and self.breaker.state != CLOSED:
                    self.breaker.check()  # raises unless this call may be the probe
                    recovering = True
                assert self.client is not None
                result = await call(self.client)
            settled = True
            self.breaker.success()
            if recovering:
                await self._drop_stale_connections()
            return result
        except RedisUnavailable:
            settled = True  # refused before reaching the server: nothing learnt
            raise
        except UNREACHABLE as exc:
            settled = True
            self.breaker.failure(_describe(exc))
            raise RedisUnavailable(f"redis {what} failed ({self._where()}): {_describe(exc)}") from exc
        except rexc.ResponseError as exc:
            settled = True
            self.breaker.success()  # the server answered: it is up
            if isinstance(exc, rexc.OutOfMemoryError) or str(exc).startswith("OOM"):
                raise TierFull(
                    f"Redis is out of memory ({self._where()}): maxmemory is reached and its policy refuses writes; "
                    "set maxmemory-policy allkeys-lru (or volatile-lru with a ttl), raise maxmemory, or lower this tier's capacity"
                ) from exc
            raise
        finally:
            if not settled:
                self.breaker.abandon()

    def _check_open(self) -> None:
        if self.client is None:
            raise RedisUnavailable(f"redis tier {self._where()} is {'closed' if self._closed else 'not started'}")

    async def _drop_stale_connections(self) -> None:
        """After an outage every idle pooled socket is suspect: reconnect instead of failing once more."""
        pool = getattr(self.client, "connection_pool", None)  # a cluster client reconnects per node itself
        try:
            if pool is not None:
                await pool.disconnect(inuse_connections=False)
            if self._lanes is not None:
                self._lanes.drop_idle()
        except Exception as exc:
            log.debug("redis tier: dropping idle connections: %s", exc)

    def _name(self, key: CacheKey) -> bytes:
        return self.prefix + key.to_string().encode("utf-8")

    def _part(self, name: bytes, k: int) -> bytes:
        """The name of part ``k`` (from 1) of the frame stored under ``name``. It starts with
        the prefix (``clear`` finds it) and, in braces, holds all of ``name``, which Redis
        Cluster then hashes alone: the parts share the first part's slot. (A name with
        braces of its own gets just the suffix: its parts still work, maybe on other slots.)"""
        if b"{" in name or b"}" in name:
            return name + b"#%d" % k
        return self.prefix + b"{" + name + b"}#%d" % k

    def _parts(self, name: bytes, count: int) -> list[bytes]:
        return [self._part(name, k) for k in range(1, count)]

    def _layout(self, name: bytes, size: int) -> list[tuple[bytes, int]]:
        """Where a frame of ``size`` bytes is stored: ``(name, bytes)`` of each part. Redis
        faults in every page of a value of 8 MiB or more afresh, half its CPU time in a put
        (docs/tiers-redis.md): longer frames go in parts of ``part_bytes``. The first part is
        under the chunk's own name, so a frame that fits is stored as it always was, and a
        reader learns the whole length from the first part's frame header."""
        step = self.options.part_bytes
        count = max(1, -(-size // step))
        return [(name, min(step, size))] + [(self._part(name, k), min(step, size - k * step)) for k in range(1, count)]

    # -- writes ---------------------------------------------------------------------------------

    async def put(self, key: CacheKey, obj: MemoryObj) -> None:
        await self.batch_put([(key, obj)])

    async def batch_put(self, items: Iterable[tuple[CacheKey, MemoryObj]]) -> None:
        items = list(items)
        for key, obj in items:
            if obj.key != key:
                raise InvalidInput(f"object holds key {obj.key} but is stored under {key}")
        if not items:
            return
        lanes = self._lanes
        if lanes is not None:
            # each frame is made (hashed) in a worker thread, run by run as it is sent
            frames = []
            for key, obj in items:
                size, pieces = frame.encode_streamed(obj)
                frames.append((self._layout(self._name(key), size), pieces))
            await self._guarded("put", lambda _: lanes.set_many(frames, self.ttl_ms, PUT_LANES))
            return
        frames = [(self._name(key), frame.encode_parts(obj)) for key, obj in items]
        await asyncio.gather(*(
            self._guarded("put", lambda client, batch=batch: self._put_joined(client, batch))
            for batch in self._split(frames)
        ))

    def _split(self, frames: list[tuple[bytes, list]]) -> Iterable[list]:
        """Batches of at most ``pipeline_bytes`` (one chunk may exceed it alone)."""
        limit = self.options.pipeline_bytes
        batch: list = []
        size = 0
        for name, parts in frames:
            n = sum(len(p) for p in parts)
            if batch and size + n > limit:
                yield batch
                batch, size = [], 0
            batch.append((name, parts))
            size += n
        if batch:
            yield batch

    async def remove(self, key: CacheKey) -> bool:
        return await self._forget(self._name(key))

    async def _forget(self, name: bytes) -> bool:
        """Delete the frame under ``name`` with all its parts (their count is in its first
        part: one round trip to read it, one to delete); whether it was there."""
        size, start = await self._guarded("remove", lambda c: self._pipelined(
            c, [("STRLEN", name), ("GETRANGE", name, 0, frame.LENGTH_FIELDS - 1)]
        ))
        return bool((await self._unlink([name, *self._parts(name, _count(start, size))]))[0])

    async def _unlink(self, names: list[bytes]) -> list:
        return await self._guarded("remove", lambda c: self._pipelined(c, [("UNLINK", n) for n in names]))

    async def clear(self) -> None:
        """Remove every key under this tier's prefix (what any instance with this prefix wrote)."""
        names = [name async for name in self._scan()]
        for start in range(0, len(names), 1000):
            part = names[start : start + 1000]
            await self._guarded("clear", lambda c, part=part: self._pipelined(c, [("UNLINK", n) for n in part]))

    # -- reads ----------------------------------------------------------------------------------

    async def get(self, key: CacheKey) -> MemoryObj | None:
        return (await self.batch_get([key]))[0]

    async def batch_get(self, keys: list[CacheKey]) -> list[MemoryObj | None]:
        if not keys:
            return []
        names = [self._name(k) for k in keys]
        lanes = self._lanes
        if lanes is not None:
            def verify(i: int, value: memoryview, running: frame.RunningCheck):  # in a worker thread
                return value, _verified(value, keys[i], running)

            values = await self._guarded("get", lambda _: lanes.get_many(
                names, self._buffers.take, verify, GET_LANES,
                watch=frame.RunningCheck, whole=frame.length, parts=self._parts,
            ))
        else:
            if len(names) == 1:
                values = [await self._guarded("get", lambda c: c.get(names[0]))]
            else:
                values = await self._guarded("get", lambda c: self._pipelined(c, [("GET", n) for n in names]))
            values = await self._joined(names, values)
        out: list[MemoryObj | None] = []
        for key, name, value in zip(keys, names, values):
            if isinstance(value, Incomplete):
                # a part expired, was evicted or removed: a miss, and the rest of it goes too
                if value.buffer is not None:
                    self._buffers.give_back(value.buffer.obj)
                try:
                    await self._unlink(value.names)
                except Exception as exc:  # the miss stands either way
                    log.warning("redis tier: could not remove the parts of incomplete chunk %s: %s", key, _describe(exc))
                value = None
            if value is None:
                out.append(None)
                continue
            value, verified = value if isinstance(value, tuple) else (value, _verified(value, key))
            out.append(await self._accept(key, name, value, verified))
        return out

    async def _joined(self, names: list[bytes], values: list) -> list:
        """Values read with one GET each (cluster mode), those stored in parts completed
        with one more pipeline and joined; a part missing or short makes one Incomplete."""
        wanted = []
        for i, value in enumerate(values):
            count = 1 if value is None else _count(value[: frame.LENGTH_FIELDS], len(value))
            if count > 1:
                wanted.append((i, self._parts(names[i], count)))
        if not wanted:
            return values
        got = iter(await self._guarded("get", lambda c: self._pipelined(
            c, [("GET", n) for _, more in wanted for n in more]
        )))
        for i, more in wanted:
            first = values[i]
            whole = bytearray(frame.length(first[: frame.LENGTH_FIELDS]))
            whole[: len(first)] = first
            at = len(first)
            for part in [next(got) for _ in more]:
                if at is not None and part is not None and len(part) == min(len(first), len(whole) - at):
                    whole[at : at + len(part)] = part
                    at += len(part)
                else:
                    at = None
            values[i] = whole if at is not None else Incomplete([names[i], *more], None)
        return values

    def release_now(self, obj: MemoryObj) -> None:
        self._buffers.release(obj)

    async def release(self, obj: MemoryObj) -> None:
        self.release_now(obj)

    async def _accept(
        self, key: CacheKey, name: bytes, value: bytes | memoryview, verified: MemoryObj | CorruptChunk
    ) -> MemoryObj | None:
        """A read value's chunk, lent with its buffer; or, if it failed its checks, a miss."""
        buffer = value.obj if isinstance(value, memoryview) else None
        if isinstance(verified, MemoryObj):
            return verified if buffer is None else self._buffers.lend(verified, buffer)
        ours = bytes(value[:4]) == frame.MAGIC
        if buffer is not None:
            self._buffers.give_back(buffer)
        self.corrupt_count += 1
        if ours:
            # one of ours gone bad: drop it so nobody reads it again
            log.warning("redis tier: removing corrupt chunk %s: %s", key, verified)
            try:
                await self._forget(name)
            except Exception as exc:  # the miss stands either way
                log.warning("redis tier: could not remove corrupt chunk %s: %s", key, _describe(exc))
        else:
            # not a kvstacks frame: someone else's value under our prefix; never served, never deleted
            log.warning("redis tier: key %r holds a foreign value; treated as a miss", name)
        return None

    async def contains(self, key: CacheKey) -> bool:
        return (await self.batch_contains([key]))[0]

    async def batch_contains(self, keys: list[CacheKey]) -> list[bool]:
        """One round trip (one pipeline of EXISTS) for a whole prefix."""
        if not keys:
            return []
        names = [self._name(k) for k in keys]
        found = await self._guarded("lookup", lambda c: self._pipelined(c, [("EXISTS", n) for n in names]))
        return [bool(f) for f in found]

    async def keys(self) -> AsyncIterator[tuple[CacheKey, int]]:
        names = [name async for name in self._scan() if not _PART.search(name)]
        for start in range(0, len(names), 1000):
            part = names[start : start + 1000]
            replies = await self._guarded("keys", lambda c, part=part: self._pipelined(c, [
                command for n in part for command in (("STRLEN", n), ("GETRANGE", n, 0, frame.LENGTH_FIELDS - 1))
            ]))
            for name, size, start_bytes in zip(part, replies[::2], replies[1::2]):
                if not size:
                    continue  # gone since the scan
                if _count(start_bytes, size) > 1:
                    size = frame.length(start_bytes)  # the whole frame, stored in parts
                try:
                    key = CacheKey.from_string(name[len(self.prefix):].decode("utf-8"))
                except (InvalidInput, UnicodeDecodeError):
                    continue  # not a key we write
                yield key, int(size)

    async def _scan(self) -> AsyncIterator[bytes]:
        pattern = _glob_escape(self.prefix) + b"*"

        async def collect(client: Redis | RedisCluster) -> list[bytes]:
            return [name async for name in client.scan_iter(match=pattern, count=1000)]

        for name in await self._guarded("scan", collect):
            yield name

    async def _put_joined(self, client: Redis | RedisCluster, batch: list[tuple[bytes, list]]) -> None:
        """SET each frame joined into one bytes object, as redis-py wants it, cut into its
        parts (Redis Cluster: its pipeline routes each key to its node and follows redirections)."""
        sets = []
        for name, pieces in batch:
            value = memoryview(b"".join(pieces))
            at = 0
            for part, size in self._layout(name, len(value)):
                sets.append((part, value[at : at + size]))
                at += size
        if len(sets) == 1:
            await client.set(*sets[0], px=self.ttl_ms)
            return
        pipe = client.pipeline(transaction=False)
        for part, value in sets:
            pipe.set(part, value, px=self.ttl_ms)
        for result in await pipe.execute(raise_on_error=False):
            if isinstance(result, Exception):
                raise result

    @staticmethod
    async def _pipelined(client: Redis | RedisCluster, commands: list[tuple]) -> list:
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        results = await pipe.execute(raise_on_error=False)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    def stats(self) -> dict:
        b = self.breaker
        return {"breaker": b.state, "breaker_opened": b.opened, "corrupt": self.corrupt_count}


#: how a part's name (``RedisBackend._part``) ends; a chunk's own name ends in its hash's hex
_PART = re.compile(rb"#\d+\Z")


def _count(start: bytes | memoryview, size: int) -> int:
    """How many parts the frame whose first part is ``size`` bytes and starts with ``start``
    is stored in (1 if that is not a frame's start: its check will tell)."""
    whole = frame.length(start)
    if whole is None or not size or whole <= size or whole > size * MAX_PARTS:
        return 1
    return -(-whole // size)


def _glob_escape(raw: bytes) -> bytes:
    out = bytearray()
    for byte in raw:
        if byte in b"*?[]\\":
            out += b"\\"
        out.append(byte)
    return bytes(out)


def _verified(
    value: bytes | memoryview, key: CacheKey, running: frame.RunningCheck | None = None
) -> MemoryObj | CorruptChunk:
    """The chunk in ``value`` if its frame checks out and holds ``key``, else why not."""
    try:
        return frame.decode(value, expect_key=key, running=running)
    except CorruptChunk as exc:
        return exc


class _UnfilledBuffers(ReadBuffers):
    """Receive buffers whose pages are not zeroed first: the socket writes every byte."""

    def make(self, size: int):
        return torch.empty(size, dtype=torch.uint8).numpy()
