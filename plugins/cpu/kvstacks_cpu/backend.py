"""The ``cpu`` backend: chunks copied into pooled host buffers.

Leases. ``get_now``/``get`` hand out the stored object itself (no copy) and
count it as a *lease* on that chunk's buffer. A caller that has finished reading
calls ``release_now(obj)`` (or ``await release(obj)``). A buffer goes back to the
pool only when its chunk is removed *and* every lease on it was released, so a
store can never overwrite bytes someone is still copying out. A lease that is
never released is safe too: when the chunk is removed its buffer is simply not
recycled, and torch frees it once the last reference to the object is gone.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from functools import partial

import torch
from kvstacks import frame
from kvstacks.backend import InProcessBackend
from kvstacks.config import Size
from kvstacks.errors import ConfigError
from kvstacks.keys import CacheKey
from kvstacks.memory import MemoryObj

from kvstacks_cpu.pool import BufferPool, PoolBuffer, PoolStats


class PooledObj(MemoryObj):
    """A stored chunk; weak-referenceable so a forgotten lease can be noticed."""

    __slots__ = ("__weakref__",)


class _Slot:
    __slots__ = ("buffer", "leases", "nbytes", "obj")

    def __init__(self, obj: PooledObj, buffer: PoolBuffer, nbytes: int) -> None:
        self.obj: PooledObj | weakref.ref = obj
        self.buffer = buffer
        self.nbytes = nbytes
        self.leases = 0


class CpuBackend(InProcessBackend):
    """Host-memory tier. Capacity and eviction belong to the tier; this only stores."""

    name = "cpu"

    @dataclass
    class Options:
        #: Most idle bytes the pool keeps for reuse after chunks are removed; null: the
        #: tier's capacity (no cap on an unbounded tier).
        pool_limit: Size | None = None
        #: Page-locked buffers for fast GPU copies; null: pinned exactly when CUDA is available.
        pin_memory: bool | None = None
        #: Reserve the tier's capacity at start and fault it in from a background thread, so a
        #: fresh tier stores at copy speed instead of page-fault speed. Only with a capacity;
        #: the memory is held until close. false: take memory on demand.
        prefault: bool = True

    @classmethod
    def check_options(cls, options: CpuBackend.Options) -> None:
        if options.pin_memory and not torch.cuda.is_available():
            raise ConfigError(
                "pin_memory", "pinned host memory needs CUDA, which this torch does not see; "
                "drop pin_memory or set it to false"
            )

    def __init__(self, options: CpuBackend.Options | None = None) -> None:
        super().__init__(options)
        self.check_options(self.options)
        pin = self.options.pin_memory
        if pin is None:
            pin = torch.cuda.is_available()
        self.pool = BufferPool(self.options.pool_limit, pin_memory=pin)
        self._slots: dict[CacheKey, _Slot] = {}
        # Removed chunks whose buffers are still leased, by id of the stored object.
        self._leased: dict[int, _Slot] = {}
        self._lock = threading.Lock()

    async def start(self) -> None:
        # Idle buffers never outgrow what the tier may hold: buffers leased past their
        # eviction (by offloads, by readers) that come back together are let go, not kept.
        self.pool.ceiling = self.capacity
        # Pinned buffers are faulted in by the allocation itself.
        if self.options.prefault and self.capacity and not self.pool.pin_memory:
            self.pool.reserve(self.capacity)

    # -- the data path ------------------------------------------------------

    def put_now(self, key: CacheKey, obj: MemoryObj) -> None:
        src = obj.data
        if src.requires_grad:
            src = src.detach()  # the stored copy must not join the caller's autograd graph
        nbytes = src.numel() * src.element_size()
        buffer = self.pool.take(nbytes, src.dtype, src.shape)
        try:
            dst = buffer.typed(nbytes, src.dtype, src.shape)
            stored = PooledObj(key, dst, obj.shape, obj.dtype, obj.compressor)
            if self.carry_checks:
                # hashed block by block as it is copied, while in cache: the tiers below
                # send this check instead of reading the chunk from memory again
                stored.check = frame.copy_checked(dst, src, frame.header(stored))
            else:
                dst.copy_(src)
        except BaseException:
            self.pool.give_back(buffer)
            raise
        slot = _Slot(stored, buffer, nbytes)
        with self._lock:
            old = self._slots.get(key)
            self._slots[key] = slot
            recycle = old is not None and self._retire(old)
        if recycle:
            self.pool.give_back(old.buffer)

    def get_now(self, key: CacheKey) -> MemoryObj | None:
        """The stored object, leased: call ``release_now(obj)`` when done reading it."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                return None
            slot.leases += 1
            return slot.obj  # type: ignore[return-value]

    def release_now(self, obj: MemoryObj) -> None:
        """End one lease taken by ``get_now``/``get``; the object must not be read afterwards."""
        with self._lock:
            slot = self._slots.get(obj.key)
            if slot is not None and slot.obj is obj:
                if slot.leases:
                    slot.leases -= 1
                return
            ident = id(obj)
            slot = self._leased.get(ident)
            if slot is None or not isinstance(slot.obj, weakref.ref) or slot.obj() is not obj:
                return
            slot.leases -= 1
            if slot.leases > 0:
                return
            del self._leased[ident]
            slot.obj = None  # type: ignore[assignment]
            obj.check = None  # its buffer is about to hold another chunk
        self.pool.give_back(slot.buffer)

    def contains_now(self, key: CacheKey) -> bool:
        return key in self._slots

    def remove_now(self, key: CacheKey) -> bool:
        with self._lock:
            slot = self._slots.pop(key, None)
            if slot is None:
                return False
            recycle = self._retire(slot)
        if recycle:
            self.pool.give_back(slot.buffer)
        return True

    def keys_now(self) -> list[tuple[CacheKey, int]]:
        with self._lock:
            return [(key, slot.nbytes) for key, slot in self._slots.items()]

    def clear_now(self) -> None:
        with self._lock:
            slots, self._slots = self._slots, {}
            recycled = [slot.buffer for slot in slots.values() if self._retire(slot)]
        for buffer in recycled:
            self.pool.give_back(buffer)

    async def release(self, obj: MemoryObj) -> None:
        self.release_now(obj)

    async def close(self) -> None:
        self.clear_now()
        self.pool.close()

    # -- introspection --------------------------------------------------------

    def pool_stats(self) -> PoolStats:
        return self.pool.stats()

    @property
    def leased_after_removal(self) -> int:
        """Removed chunks whose buffers wait for a reader's ``release_now``."""
        return len(self._leased)

    # -- leases ----------------------------------------------------------------

    def _retire(self, slot: _Slot) -> bool:
        """With the lock held: whether a slot leaving the map can be recycled now."""
        if slot.leases == 0:
            # The buffer will hold other bytes: a stale reference to this object must not
            # keep a check that no longer matches them.
            slot.obj.check = None  # type: ignore[union-attr]
            return True
        obj = slot.obj
        ident = id(obj)
        # Hold the object weakly from here: if every reader drops it without a
        # release, nobody can prove the buffer is unread, so it is let go, not reused.
        slot.obj = weakref.ref(obj, partial(self._lost, ident))  # type: ignore[arg-type]
        self._leased[ident] = slot
        return False

    def _lost(self, ident: int, ref: weakref.ref) -> None:
        # Runs wherever the last reference died, maybe inside our own locked
        # section, so it takes no backend lock: single dict operations are atomic.
        slot = self._leased.get(ident)
        if slot is not None and slot.obj is ref and self._leased.pop(ident, None) is slot:
            self.pool.forget(slot.buffer)
