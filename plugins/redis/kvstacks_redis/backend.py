"""The ``redis`` backend: chunks as Redis strings, one frame per key."""

from __future__ import annotations

import asyncio
import logging
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
from kvstacks_redis.lanes import Lanes

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
            frames = [(self._name(key), *frame.encode_streamed(obj)) for key, obj in items]
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
        return bool(await self._guarded("remove", lambda c: c.delete(self._name(key))))

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
                names, self._buffers.take, verify, GET_LANES, watch=frame.RunningCheck
            ))
        elif len(names) == 1:
            values = [await self._guarded("get", lambda c: c.get(names[0]))]
        else:
            values = await self._guarded("get", lambda c: self._pipelined(c, [("GET", n) for n in names]))
        out: list[MemoryObj | None] = []
        for key, name, value in zip(keys, names, values):
            if value is None:
                out.append(None)
                continue
            value, verified = value if isinstance(value, tuple) else (value, _verified(value, key))
            out.append(await self._accept(key, name, value, verified))
        return out

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
                await self._guarded("remove", lambda c: c.delete(name))
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
        names = [name async for name in self._scan()]
        for start in range(0, len(names), 1000):
            part = names[start : start + 1000]
            sizes = await self._guarded("keys", lambda c, part=part: self._pipelined(c, [("STRLEN", n) for n in part]))
            for name, size in zip(part, sizes):
                if not size:
                    continue  # gone since the scan
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
        """SET each frame joined into one bytes object, as redis-py wants it (Redis Cluster:
        its pipeline routes each key to its node and follows redirections)."""
        if len(batch) == 1:
            name, parts = batch[0]
            await client.set(name, b"".join(parts), px=self.ttl_ms)
            return
        pipe = client.pipeline(transaction=False)
        for name, parts in batch:
            pipe.set(name, b"".join(parts), px=self.ttl_ms)
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
