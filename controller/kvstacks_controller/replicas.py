"""State shared by controller replicas: the chunk index and the worker registry in Redis.

With ``--index redis://host:port/db``, every replica reads and writes one Redis,
so any replica answers lookups and routes for the whole fleet and a worker may
report to any of them. A replica keeps nothing a restart would lose.

Layout, under a key prefix (``kvstacks:index:`` by default, ``?prefix=`` in the URL):

- ``c:<16-byte chunk hash>``: a bitmap, bit ``h`` set when holder ``h`` has the chunk
  (deleted when no holder is left);
- ``h:<holder id>``: the set of chunk hashes holder ``h`` has (to clear a holder), and
  ``x:<holder id>`` the XOR of them (with the set's size, the digest workers compare);
- ``holders`` / ``holder_names``: holder name <-> id; ``next`` and ``free``: id allocation;
  ``live``: chunks with at least one holder;
- ``workers``, ``beats``, ``stats``: per worker its registration (JSON), last
  heartbeat (wall clock) and last stats (JSON).

Every change to the index is one Lua script, so replicas never interleave halfway
through a report. Consistency: a lookup reads the index from Redis, so it sees every
report any replica acknowledged before the lookup started. It sees the worker set
(registrations, heartbeats) as of at most ``registry_ttl`` seconds before (each
replica caches it briefly). Health uses wall clocks: keep the replicas' clocks in
sync (NTP). Redis Cluster is not supported (the scripts touch keys of many slots);
use one server, with a replica or Sentinel for availability.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import numpy as np

from kvstacks_controller.command import CommandError
from kvstacks_controller.index import HASH_BYTES, Holder, prefix_lengths
from kvstacks_controller.registry import Worker, WorkerRegistry

DEFAULT_PREFIX = "kvstacks:index:"

# Keeps ``x:<holder id>`` (see the layout above) in admit and evict, so a worker's digest
# check reads two keys, not the holder's whole set.
_XOR = """
local function xor_into(x, h)
  local a, b, c, d = struct.unpack('<i4i4i4i4', h)
  x[1], x[2], x[3], x[4] = bit.bxor(x[1], a), bit.bxor(x[2], b), bit.bxor(x[3], c), bit.bxor(x[4], d)
end
local function save_xor(p, hid, x, changed)
  if changed == 0 then return end
  local xk = p .. 'x:' .. hid
  local old = redis.call('GET', xk)
  if old then xor_into(x, old) end
  redis.call('SET', xk, struct.pack('<i4i4i4i4', x[1], x[2], x[3], x[4]))
end
"""

_ADMIT = _XOR + """
local p, hid, blob = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local hkey = p .. 'h:' .. hid
local added, born = 0, 0
local x = {0, 0, 0, 0}
for i = 1, #blob, 16 do
  local h = string.sub(blob, i, i + 15)
  local ck = p .. 'c:' .. h
  local existed = redis.call('EXISTS', ck)
  if redis.call('SETBIT', ck, hid, 1) == 0 then
    added = added + 1
    redis.call('SADD', hkey, h)
    xor_into(x, h)
    if existed == 0 then born = born + 1 end
  end
end
if born > 0 then redis.call('INCRBY', p .. 'live', born) end
save_xor(p, hid, x, added)
return added
"""

_EVICT = _XOR + """
local p, hid, blob = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local hkey = p .. 'h:' .. hid
local removed, died = 0, 0
local x = {0, 0, 0, 0}
for i = 1, #blob, 16 do
  local h = string.sub(blob, i, i + 15)
  local ck = p .. 'c:' .. h
  if redis.call('SETBIT', ck, hid, 0) == 1 then
    removed = removed + 1
    redis.call('SREM', hkey, h)
    xor_into(x, h)
    if redis.call('BITCOUNT', ck) == 0 then
      redis.call('DEL', ck)
      died = died + 1
    end
  elseif redis.call('BITCOUNT', ck) == 0 then
    redis.call('DEL', ck)
  end
end
if died > 0 then redis.call('DECRBY', p .. 'live', died) end
save_xor(p, hid, x, removed)
return removed
"""

_CLEAR = """
local p, hid = ARGV[1], tonumber(ARGV[2])
local hkey = p .. 'h:' .. hid
local members = redis.call('SMEMBERS', hkey)
local died = 0
for _, h in ipairs(members) do
  local ck = p .. 'c:' .. h
  redis.call('SETBIT', ck, hid, 0)
  if redis.call('BITCOUNT', ck) == 0 then
    redis.call('DEL', ck)
    died = died + 1
  end
end
redis.call('DEL', hkey, p .. 'x:' .. hid)
if died > 0 then redis.call('DECRBY', p .. 'live', died) end
if ARGV[3] == 'release' then
  local name = redis.call('HGET', p .. 'holder_names', hid)
  if name then redis.call('HDEL', p .. 'holders', name) end
  redis.call('HDEL', p .. 'holder_names', hid)
  redis.call('ZADD', p .. 'free', hid, hid)
end
return #members
"""

_HOLDER = """
local p, name = ARGV[1], ARGV[2]
local id = redis.call('HGET', p .. 'holders', name)
if id then return tonumber(id) end
local free = redis.call('ZPOPMIN', p .. 'free')
if #free > 0 then id = tonumber(free[1]) else id = redis.call('INCR', p .. 'next') - 1 end
redis.call('HSET', p .. 'holders', name, id)
redis.call('HSET', p .. 'holder_names', id, name)
return id
"""


class IndexUnavailable(CommandError):
    def __init__(self, url: str, exc: Exception) -> None:
        super().__init__(
            503,
            f"the shared index at {url} is unreachable ({type(exc).__name__}: {exc}); "
            "check that redis-server runs there, then retry",
        )


def parse_url(url: str) -> tuple[str, str]:
    """``redis://host:port/db?prefix=p`` -> (the URL redis-py takes, the key prefix)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"index: expected 'memory' or redis://host:port/db, got {url!r}")
    query = parse_qs(parts.query)
    prefix = query.pop("prefix", [DEFAULT_PREFIX])[0]
    rest = "&".join(f"{k}={v}" for k, vals in query.items() for v in vals)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, rest, "")), prefix


def _safe_url(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{':' + str(parts.port) if parts.port else ''}{parts.path}"


class RedisStore:
    """One Redis connection pool and key prefix, shared by the index and the registry."""

    def __init__(self, url: str) -> None:
        import redis

        self.redis_errors = (redis.RedisError, OSError)
        client_url, self.prefix = parse_url(url)
        self.url = _safe_url(client_url)
        self.client = redis.Redis.from_url(client_url, socket_timeout=5, socket_connect_timeout=5)
        self.key = self.prefix.encode()
        self._scripts = {
            name: self.client.register_script(source)
            for name, source in (("admit", _ADMIT), ("evict", _EVICT), ("clear", _CLEAR), ("holder", _HOLDER))
        }

    def call(self, fn, *args: Any) -> Any:
        try:
            return fn(*args)
        except self.redis_errors as exc:
            raise IndexUnavailable(self.url, exc) from None

    def script(self, name: str, *args: Any) -> Any:
        return self.call(lambda: self._scripts[name](args=[self.prefix, *args]))

    def close(self) -> None:
        self.client.close()


def _blob(hashes: bytes | list[bytes] | np.ndarray) -> bytes:
    if isinstance(hashes, np.ndarray):
        return hashes.astype("<u8").tobytes()
    if isinstance(hashes, list):
        return b"".join(hashes)
    if len(hashes) % HASH_BYTES:
        raise ValueError(f"chunk hashes are {HASH_BYTES} bytes each; got {len(hashes)} bytes")
    return bytes(hashes)


def _holder_name(key: Holder) -> str:
    return json.dumps([key.instance_id, key.worker_id, key.tier])


class RedisChunkIndex:
    """The chunk index in Redis, with the methods of :class:`~kvstacks_controller.index.ChunkIndex`."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store

    def holder(self, instance_id: str, worker_id: int, tier: str) -> int:
        return int(self.store.script("holder", _holder_name(Holder(instance_id, worker_id, tier))))

    def holder_of(self, hid: int) -> Holder | None:
        raw = self.store.call(self.store.client.hget, self.store.prefix + "holder_names", hid)
        return Holder(*json.loads(raw)) if raw else None

    def holder_ids(self, instance_id: str, worker_id: int | None = None) -> list[int]:
        names = self.store.call(self.store.client.hgetall, self.store.prefix + "holders")
        out = []
        for name, hid in names.items():
            inst, wid, _ = json.loads(name)
            if inst == instance_id and (worker_id is None or wid == worker_id):
                out.append(int(hid))
        return out

    def count(self, hid: int) -> int:
        return int(self.store.call(self.store.client.scard, f"{self.store.prefix}h:{hid}"))

    def digest(self, hid: int) -> tuple[int, str]:
        """``(chunks, xor)`` of holder ``hid``, as :meth:`ChunkIndex.digest` gives them."""
        p = self.store.prefix

        def read() -> list[Any]:
            pipe = self.store.client.pipeline(transaction=False)
            pipe.scard(f"{p}h:{hid}")
            pipe.get(f"{p}x:{hid}")
            return pipe.execute()

        count, xor = self.store.call(read)
        return int(count), (xor or bytes(HASH_BYTES)).ljust(HASH_BYTES, b"\0").hex()

    def clear_holder(self, hid: int) -> int:
        return int(self.store.script("clear", hid, "keep"))

    def release_holder(self, hid: int) -> None:
        self.store.script("clear", hid, "release")

    def admit(self, hid: int, hashes: bytes | list[bytes] | np.ndarray) -> int:
        blob = _blob(hashes)
        return int(self.store.script("admit", hid, blob)) if blob else 0

    def evict(self, hid: int, hashes: bytes | list[bytes] | np.ndarray) -> int:
        blob = _blob(hashes)
        return int(self.store.script("evict", hid, blob)) if blob else 0

    def presence(self, hashes: bytes | list[bytes]) -> np.ndarray:
        blob = _blob(hashes)
        chunk_key = self.store.key + b"c:"
        keys = [chunk_key + blob[i : i + HASH_BYTES] for i in range(0, len(blob), HASH_BYTES)]

        def read() -> list[Any]:
            pipe = self.store.client.pipeline(transaction=False)
            pipe.get(self.store.prefix + "next")
            if keys:
                pipe.mget(keys)
            return pipe.execute()

        replies = self.store.call(read)
        n_holders = int(replies[0] or 0)
        present = np.zeros((len(keys), n_holders), dtype=bool)
        if not keys or not n_holders:
            return present
        width = (n_holders + 7) // 8
        bits = np.zeros((len(keys), width), dtype=np.uint8)
        for row, value in enumerate(replies[1]):
            if value:
                raw = np.frombuffer(value[:width], dtype=np.uint8)
                bits[row, : raw.size] = raw
        # SETBIT numbers bits from the most significant bit of the first byte.
        return np.unpackbits(bits, axis=1, bitorder="big")[:, :n_holders].astype(bool)

    def prefix_lengths(self, hashes: bytes | list[bytes], groups: list[list[int]]) -> np.ndarray:
        return prefix_lengths(self.presence(hashes), groups)

    def __len__(self) -> int:
        return int(self.store.call(self.store.client.get, self.store.prefix + "live") or 0)

    @property
    def nbytes(self) -> int:
        """The whole Redis server's memory (the index shares it with anything else stored there)."""
        info = self.store.call(self.store.client.info, "memory")
        return int(info.get("used_memory", 0))


class RedisWorkerRegistry(WorkerRegistry):
    """The worker registry in Redis; each replica keeps a view at most ``ttl`` seconds old."""

    def __init__(self, store: RedisStore, heartbeat_timeout: float = 10.0, ttl: float = 0.05) -> None:
        super().__init__(heartbeat_timeout)
        self.store = store
        self.ttl = ttl
        self._synced = -float("inf")

    def _key(self, instance_id: str, worker_id: int) -> str:
        return json.dumps([instance_id, worker_id])

    def _worker(self, record: bytes, beat: bytes | None, stats: bytes | None) -> Worker:
        fields = json.loads(record)
        worker = Worker(**fields)
        wall = float(beat) if beat else worker.registered_at
        worker.last_heartbeat_wall = wall
        # Health is judged on this process's monotonic clock, from the shared wall-clock beat.
        worker.last_heartbeat = self.clock() - max(0.0, time.time() - wall)
        worker.stats = json.loads(stats) if stats else {}
        return worker

    def sync(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._synced < self.ttl:
            return
        p = self.store.prefix

        def read() -> list[Any]:
            pipe = self.store.client.pipeline(transaction=False)
            for name in ("workers", "beats", "stats"):
                pipe.hgetall(p + name)
            return pipe.execute()

        records, beats, stats = self.store.call(read)
        fresh: dict[tuple[str, int], Worker] = {}
        for key, record in records.items():
            worker = self._worker(record, beats.get(key), stats.get(key))
            fresh[(worker.instance_id, worker.worker_id)] = worker
        self._workers = fresh
        self._synced = now

    def _record(self, worker: Worker) -> str:
        return json.dumps(
            {
                "instance_id": worker.instance_id,
                "worker_id": worker.worker_id,
                "session": worker.session,
                "address": worker.address,
                "chunk_size": worker.chunk_size,
                "tiers": worker.tiers,
                "model": worker.model,
                "pid": worker.pid,
                "version": worker.version,
                "transfer": worker.transfer,
                "registered_at": worker.registered_at,
                "holders": worker.holders,
            }
        )

    def add(self, worker: Worker) -> Worker | None:
        previous = self.get(worker.instance_id, worker.worker_id)
        super().add(worker)
        key = self._key(worker.instance_id, worker.worker_id)
        p = self.store.prefix

        def write() -> None:
            pipe = self.store.client.pipeline(transaction=True)
            pipe.hset(p + "workers", key, self._record(worker))
            pipe.hset(p + "beats", key, repr(worker.last_heartbeat_wall))
            pipe.hdel(p + "stats", key)
            pipe.execute()

        self.store.call(write)
        return previous

    def get(self, instance_id: str, worker_id: int, session: str | None = None) -> Worker | None:
        worker = super().get(instance_id, worker_id, session)
        if worker is not None and session is None:
            return worker
        # A worker's own call (with its session) always checks Redis: it may have registered
        # again through another replica since this view was taken, and a report from its old
        # session must not land in the new session's holders.
        key = self._key(instance_id, worker_id)
        p = self.store.prefix

        def read() -> list[Any]:
            pipe = self.store.client.pipeline(transaction=False)
            for name in ("workers", "beats", "stats"):
                pipe.hget(p + name, key)
            return pipe.execute()

        record, beat, stats = self.store.call(read)
        if record is None:
            self._workers.pop((instance_id, worker_id), None)
            return None
        worker = self._worker(record, beat, stats)
        self._workers[(instance_id, worker_id)] = worker
        return super().get(instance_id, worker_id, session)

    def beat(self, worker: Worker, stats: dict[str, Any] | None = None) -> None:
        super().beat(worker, stats)
        key = self._key(worker.instance_id, worker.worker_id)
        p = self.store.prefix

        def write() -> None:
            pipe = self.store.client.pipeline(transaction=False)
            pipe.hset(p + "beats", key, repr(worker.last_heartbeat_wall))
            if stats is not None:
                pipe.hset(p + "stats", key, json.dumps(stats))
            pipe.execute()

        self.store.call(write)

    def remove(self, instance_id: str, worker_id: int) -> Worker | None:
        previous = self.get(instance_id, worker_id)
        super().remove(instance_id, worker_id)
        key = self._key(instance_id, worker_id)
        p = self.store.prefix

        def write() -> None:
            pipe = self.store.client.pipeline(transaction=True)
            for name in ("workers", "beats", "stats"):
                pipe.hdel(p + name, key)
            pipe.execute()

        self.store.call(write)
        return previous
