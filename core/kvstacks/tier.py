"""One level of the stack: a backend plus the bookkeeping every tier shares.

The tier, not the backend, owns capacity, eviction, pins, in-use marks and
compression, so a backend plugin only stores and fetches. Bookkeeping happens
under one lock because the caller's threads (sync API on an in-process tier)
and the I/O loop (offloads, promotions) both touch it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvstacks import faults, metrics
from kvstacks.backend import Backend, InProcessBackend
from kvstacks.compression import Compressor
from kvstacks.config import TierConfig
from kvstacks.errors import CorruptChunk, InvalidInput, TierFull
from kvstacks.eviction import EvictionPolicy
from kvstacks.keys import CacheKey
from kvstacks.memory import MemoryObj

if TYPE_CHECKING:
    import torch

log = logging.getLogger("kvstacks.tier")

# Returned when nothing was evicted: one shared empty tuple instead of a new list per store,
# since every allocation on this path adds to the garbage collector's work.
_NONE: tuple = ()


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    stores: int = 0
    rejected: int = 0       # refused for lack of evictable room (full of pins or in-use chunks)
    errors: int = 0         # backend calls that raised
    error_kinds: Counter[str] = field(default_factory=Counter)  # errors by kind (ENOSPC, ConnectionError, ...)
    corrupt: int = 0        # chunks that failed validation and were dropped
    dropped: int = 0        # offloads given up (queue or tier full, a permanent failure, retries exhausted, closed)
    retries: int = 0
    bytes_written: int = 0
    bytes_read: int = 0


class Tier:
    def __init__(
        self,
        config: TierConfig,
        backend: Backend,
        policy: EvictionPolicy,
        compressor: Compressor,
        compressors: Callable[[str], Compressor],
        model: str = "default",
        chunk_size: int = 256,
    ) -> None:
        self.config = config
        self.name = config.name
        self.backend = backend
        self.policy = policy
        self.compressor = compressor
        self._compressors = compressors
        self.capacity = config.capacity
        backend.capacity = config.capacity
        self.in_process = isinstance(backend, InProcessBackend)
        self.shared = backend.shared
        self.read_only = backend.read_only
        self.index: dict[CacheKey, int] = {}
        self.chunk_size = chunk_size
        # Tokens of the indexed chunks that hold less than a full chunk (a prompt's last one), so
        # clear can say how many tokens went; kept sparse because almost every chunk is full.
        self.short: dict[CacheKey, int] = {}
        self.used = 0
        self.pins: dict[CacheKey, float | None] = {}
        self._next_expiry = float("inf")  # earliest pin deadline, so expiry checks cost O(1) until one is due
        # Chunks being read are not chosen as victims; the backend's leases keep their memory safe.
        self.in_use: Counter[CacheKey] = Counter()
        # Chunks whose put is in flight: a miss reported meanwhile is not evidence they are gone.
        self.writing: Counter[CacheKey] = Counter()
        self.stats = TierStats()
        #: Told of chunks the tier forgot on its own (gone or corrupt on read), so the engine can report
        #: them; called without the lock held (the agent takes tier locks under its own).
        self.on_lost: Callable[[list[CacheKey]], None] | None = None
        self.lock = threading.RLock()
        self._last_full_log = 0.0
        self.burst = faults.BurstLog(log)
        self.write_seconds = metrics.TIER_WRITE_SECONDS.labels(model, self.name)
        self.read_seconds = metrics.TIER_READ_SECONDS.labels(model, self.name)

    def failed(self, what: str, exc: BaseException) -> bool:
        """Count a failed backend call by kind and log it (one line per burst); return whether it is permanent."""
        permanent = faults.is_permanent(exc)
        kind = faults.kind(exc)
        self.stats.errors += 1
        self.stats.error_kinds[kind] += 1
        self.burst.warning(f"{what}:{kind}", f"tier {self.name}: {what} failed ({kind}, "
                                             f"{'permanent' if permanent else 'transient'}): {exc}")
        return permanent

    # -- bookkeeping (sync, under the lock) ---------------------------------

    def has(self, key: CacheKey) -> bool:
        return key in self.index

    def reserve(self, key: CacheKey, nbytes: int, tokens: int | None = None) -> Sequence[tuple[CacheKey, int]] | None:
        """Account ``nbytes`` for ``key`` and return the victims evicted to make room.

        ``None`` when ``key`` is already present; raises TierFull when no room can be made.
        Otherwise ``key`` is marked as being written (never a victim) until ``written(key)``.
        """
        with self.lock:
            if key in self.index:
                return None
            victims: Sequence[tuple[CacheKey, int]] = _NONE
            if self.capacity is not None and self.used + nbytes > self.capacity:
                if nbytes > self.capacity:
                    self._refuse(f"a {nbytes}-byte chunk exceeds the tier capacity of {self.capacity} bytes")
                victims = self._make_room(nbytes)
            self.index[key] = nbytes
            if tokens is not None and tokens < self.chunk_size:
                self.short[key] = tokens
            self.used += nbytes
            if key not in self.pins:
                self.policy.insert(key, nbytes)
            self.stats.stores += 1
            self.writing[key] += 1
            return victims

    def written(self, key: CacheKey) -> None:
        """The write that ``reserve`` (or a rewrite) marked is over, landed or not."""
        with self.lock:
            self.writing[key] -= 1
            if self.writing[key] <= 0:
                del self.writing[key]

    def _make_room(self, nbytes: int) -> list[tuple[CacheKey, int]]:
        victims: list[tuple[CacheKey, int]] = []
        skipped: list[tuple[CacheKey, int]] = []
        assert self.capacity is not None
        self._expire_pins()
        while self.used + nbytes > self.capacity:
            victim = self.policy.pop_victim()
            if victim is None:
                break
            size = self.index.get(victim)
            if size is None:
                continue
            if self.in_use[victim] or self.writing.get(victim):
                # Being read, or being written: evicting a chunk whose put has not landed
                # would remove nothing and leave the put's bytes in the backend for good.
                skipped.append((victim, size))
                continue
            del self.index[victim]
            self.used -= size
            victims.append((victim, size))
        for key, size in skipped:
            self.policy.insert(key, size)
        if self.used + nbytes > self.capacity:
            # Give the room back: nothing was removed from the backend yet.
            for key, size in victims:
                self.index[key] = size
                self.used += size
                self.policy.insert(key, size)
            self._refuse("no evictable chunk left (the rest are pinned or being read)")
        for key, _ in victims:
            self.short.pop(key, None)
        self.stats.evictions += len(victims)
        return victims

    def _refuse(self, reason: str) -> None:
        self.stats.rejected += 1
        now = time.monotonic()
        if now - self._last_full_log > 10:
            self._last_full_log = now
            log.warning("tier %s refused a chunk: %s (refusals so far: %d)", self.name, reason, self.stats.rejected)
        raise TierFull(f"tier {self.name}: {reason}")

    def forget(self, key: CacheKey) -> bool:
        """Drop ``key`` from the bookkeeping; return whether it was there."""
        with self.lock:
            size = self.index.pop(key, None)
            if size is None:
                return False
            self.used -= size
            self.policy.remove(key)
            self.pins.pop(key, None)
            self.short.pop(key, None)
            return True

    def lose(self, key: CacheKey) -> None:
        """Forget a chunk found gone or corrupt, and say so (unlike ``forget``, which the caller reports)."""
        if self.forget(key) and self.on_lost is not None:
            self.on_lost([key])

    def found_corrupt(self, key: CacheKey, reason: str) -> None:
        """Count and forget a chunk that failed validation (the caller removes it from the backend)."""
        self.stats.corrupt += 1
        self.burst.warning("corrupt", f"tier {self.name}: dropped corrupt chunk {key}: it {reason}")
        self.lose(key)

    def drop_stale(self, key: CacheKey) -> None:
        """The backend does not have ``key``: believe it over the index, unless a write of it is in flight."""
        with self.lock:
            if self.writing.get(key):
                return
        self.lose(key)

    def tokens_of(self, keys: Sequence[CacheKey]) -> dict[CacheKey, int]:
        """Tokens each of ``keys`` holds (a chunk found at start, never stored by this process, counts as full)."""
        with self.lock:
            return {key: self.short.get(key, self.chunk_size) for key in keys}

    def forget_all(self) -> list[CacheKey]:
        with self.lock:
            keys = list(self.index)
            for key in keys:
                self.policy.remove(key)
            self.index.clear()
            self.short.clear()
            self.pins.clear()
            self.used = 0
            return keys

    def touch(self, key: CacheKey) -> None:
        with self.lock:
            if key in self.index and key not in self.pins:
                self.policy.access(key)

    def acquire(self, keys: list[CacheKey]) -> None:
        """Mark chunks as being read (never victims) and count the access, under one lock."""
        with self.lock:
            in_use, pins, index, access = self.in_use, self.pins, self.index, self.policy.access
            for key in keys:
                in_use[key] += 1
                if key in index and key not in pins:
                    access(key)

    def release(self, keys: list[CacheKey]) -> None:
        with self.lock:
            in_use = self.in_use
            for key in keys:
                in_use[key] -= 1
                if in_use[key] <= 0:
                    del in_use[key]

    def pin(self, key: CacheKey, ttl: float | None) -> bool:
        with self.lock:
            if key not in self.index:
                return False
            if key not in self.pins:
                self.policy.remove(key)
            deadline = None if ttl is None else time.monotonic() + ttl
            self.pins[key] = deadline
            if deadline is not None:
                self._next_expiry = min(self._next_expiry, deadline)
            return True

    def unpin(self, key: CacheKey) -> bool:
        with self.lock:
            if self.pins.pop(key, 0) == 0:
                return False
            if key in self.index:
                self.policy.insert(key, self.index[key])
            return True

    def _expire_pins(self) -> None:
        now = time.monotonic()
        if now < self._next_expiry:
            return
        expired = [k for k, deadline in self.pins.items() if deadline is not None and deadline <= now]
        for key in expired:
            self.unpin(key)
        self._next_expiry = min((d for d in self.pins.values() if d is not None), default=float("inf"))

    def snapshot(self) -> dict:
        with self.lock:
            self._expire_pins()
            s = self.stats
            return {
                "backend": self.config.backend,
                "objects": len(self.index),
                "bytes": self.used,
                "capacity": self.capacity,
                "pins": len(self.pins),
                "in_use": len(self.in_use),
                "eviction": self.config.eviction,
                "compressor": self.compressor.name,
                "hits": s.hits,
                "misses": s.misses,
                "evictions": s.evictions,
                "stores": s.stores,
                "rejected": s.rejected,
                "errors": s.errors,
                "error_kinds": dict(s.error_kinds),
                "corrupt": s.corrupt + self.backend.corrupt_count,
                "dropped": s.dropped,
                "retries": s.retries,
                "bytes_written": s.bytes_written,
                "bytes_read": s.bytes_read,
            }

    # -- coding -------------------------------------------------------------

    def encode(self, obj: MemoryObj) -> MemoryObj:
        if obj.compressor == self.compressor.name:
            return obj
        if obj.compressor != "none":
            obj = self.decode(obj)
        return self.compressor.encode(obj)

    def decode(self, obj: MemoryObj) -> MemoryObj:
        if obj.compressor == "none":
            return obj
        coder = self.compressor if obj.compressor == self.compressor.name else self._compressors(obj.compressor)
        return coder.decode_obj(obj)

    # -- data path, in-process backends (caller's thread) -------------------

    def put_now(self, key: CacheKey, obj: MemoryObj, encode: bool = True,
                keep_victims: bool = False) -> Sequence[tuple[CacheKey, MemoryObj | None]]:
        """Store synchronously; return evicted ``(key, obj)`` pairs for ``drop_now``.

        The objects are leased (readable until ``drop_now``) only with ``keep_victims``
        (write-back demotes them); otherwise they are ``None``.
        """
        assert isinstance(self.backend, InProcessBackend)
        encoded = self.encode(obj) if encode and obj.compressor != self.compressor.name else obj
        victims = self.reserve(key, encoded.nbytes, obj.num_tokens)
        if victims is None:
            self.touch(key)
            return _NONE
        try:
            self.backend.put_now(key, encoded)
        except Exception:
            self.forget(key)  # the caller counts the failure
            raise
        finally:
            self.written(key)
        self.stats.bytes_written += encoded.nbytes
        if not victims:
            return _NONE
        if keep_victims:
            return [(victim, self.backend.get_now(victim)) for victim, _ in victims]
        return [(victim, None) for victim, _ in victims]

    def drop_now(self, key: CacheKey, obj: MemoryObj | None = None) -> None:
        """Remove an evicted chunk from an in-process backend and end the lease on ``obj``."""
        assert isinstance(self.backend, InProcessBackend)
        self.backend.remove_now(key)
        if obj is not None:
            self.backend.release_now(obj)

    # -- data path, any backend (I/O loop) ------------------------------------

    async def aput(self, key: CacheKey, obj: MemoryObj, encode: bool = True) -> list[tuple[CacheKey, int]]:
        """Store on the I/O loop; return victims (already removed from the backend).

        ``encode=False`` stores ``obj`` exactly as given (already compressed by the caller).
        """
        if self.read_only:
            raise InvalidInput(f"tier {self.name} ({self.config.backend}) is read-only")
        if self.in_process:
            evicted = self.put_now(key, obj, encode)
            for victim, leased in evicted:
                self.drop_now(victim, leased)
            return [(k, 0) for k, _ in evicted]
        started = time.perf_counter()
        encoded = obj if not encode or obj.compressor == self.compressor.name else await asyncio.to_thread(self.encode, obj)
        victims = self.reserve(key, encoded.nbytes, obj.num_tokens)
        if victims is None:
            # A shared store's server may have forgotten the key (FLUSHALL, a restart, its own
            # eviction): the index is a guess there, so ask before skipping the write.
            if not self.shared or await self._still_there(key):
                self.touch(key)
                return []
            victims = []  # written again below; its room is already accounted
            with self.lock:
                self.writing[key] += 1
        try:
            await self.backend.put(key, encoded)
        except BaseException:
            self.forget(key)
            raise
        finally:
            self.written(key)
        self.stats.bytes_written += encoded.nbytes
        self.write_seconds.observe(time.perf_counter() - started)
        if key not in self.index:
            # Evicted or removed by a concurrent writer while this put was in flight: its
            # removal may have run before the put landed, so remove it now or it would leak.
            try:
                await self.backend.remove(key)
            except Exception as exc:
                log.warning("tier %s: could not remove a chunk evicted during its write: %s", self.name, exc)
        for victim, _ in victims:
            try:
                await self.backend.remove(victim)
            except Exception as exc:
                self.failed("remove of an evicted chunk", exc)
        return victims

    async def _still_there(self, key: CacheKey) -> bool:
        try:
            return await self.backend.contains(key)
        except Exception:
            return False  # unknown: write (a put that fails is counted where it fails)

    async def aget(self, key: CacheKey, decode: bool = True) -> MemoryObj | None:
        """Fetch (and decode) a copy the caller owns; a failure or a corrupt chunk is a miss (and is forgotten)."""
        started = time.perf_counter()
        try:
            if isinstance(self.backend, InProcessBackend):
                leased = self.backend.get_now(key)
                obj = None if leased is None else MemoryObj(key, leased.data.clone(), leased.shape, leased.dtype, leased.compressor)
                if leased is not None:
                    self.backend.release_now(leased)
            else:
                obj = await self.backend.get(key)
        except Exception as exc:
            self.failed("get (a miss)", exc)
            return None
        if obj is None:
            self.drop_stale(key)
            return None
        try:
            decoded = await asyncio.to_thread(self.decode, obj) if decode and obj.compressor != "none" else obj
        except CorruptChunk as exc:
            self.stats.corrupt += 1
            log.warning("tier %s: dropping corrupt chunk %s: %s", self.name, key, exc)
            self.lose(key)
            try:
                await self.backend.remove(key)
            except Exception:
                pass
            return None
        self.stats.bytes_read += obj.nbytes
        self.read_seconds.observe(time.perf_counter() - started)
        self.touch(key)
        return decoded

    async def abatch_get(self, keys: list[CacheKey], places: list[torch.Tensor] | None = None) -> list[MemoryObj | None]:
        """Fetch many chunks as stored (undecoded) in one backend call (one round trip for remote stores).

        With ``places`` (the caller's memory for each chunk's KV, see ``Backend.batch_get_into``)
        a tier that stores chunks uncompressed lets its backend read them straight there.
        """
        if self.in_process:
            return [await self.aget(key, decode=False) for key in keys]
        started = time.perf_counter()
        try:
            if places is not None and self.compressor.name == "none":
                objs = await self.backend.batch_get_into(keys, places)
            else:
                objs = await self.backend.batch_get(keys)
        except Exception as exc:
            self.failed("get (misses)", exc)
            return [None] * len(keys)
        elapsed = (time.perf_counter() - started) / max(1, len(keys))
        for key, obj in zip(keys, objs):
            if obj is None:
                self.drop_stale(key)
                continue
            self.stats.bytes_read += obj.nbytes
            self.read_seconds.observe(elapsed)
            self.touch(key)
        return objs

    async def abatch_contains(self, keys: list[CacheKey]) -> list[bool]:
        """Ask the backend; a key it does not have leaves the index (a shared store may have lost it)."""
        try:
            present = await self.backend.batch_contains(keys)
        except Exception as exc:
            self.failed("lookup (misses)", exc)
            return [False] * len(keys)
        index = self.index
        for key, yes in zip(keys, present):
            if not yes and key in index:
                self.drop_stale(key)
        return present

    async def aremove(self, key: CacheKey) -> bool:
        known = self.forget(key)
        if self.in_process:
            self.backend.remove_now(key)
            return known
        try:
            return await self.backend.remove(key) or known
        except Exception as exc:
            self.failed("remove", exc)
            return known

    async def aclear(self) -> int:
        keys = self.forget_all()
        if self.in_process:
            self.backend.clear_now()
            return len(keys)
        try:
            await self.backend.clear()
        except Exception as exc:
            self.failed("clear", exc)
        return len(keys)

    async def rebuild_index(self) -> int:
        """Learn what the backend already holds (a restart finds everything on disk)."""
        count = 0
        async for key, size in self.backend.keys():
            with self.lock:
                if key in self.index:
                    continue
                self.index[key] = size
                self.used += size
                self.policy.insert(key, size)
            count += 1
        for key in self.trim():
            try:
                await self.backend.remove(key)
            except Exception as exc:
                log.warning("tier %s: could not remove a chunk over capacity: %s", self.name, exc)
        return count

    def trim(self) -> list[CacheKey]:
        """Evict down to capacity (after a restart with a smaller capacity); return victims to remove."""
        with self.lock:
            if self.capacity is None or self.used <= self.capacity:
                return []
            try:
                victims = self._make_room(0)
            except TierFull:
                return []
        return [k for k, _ in victims]
