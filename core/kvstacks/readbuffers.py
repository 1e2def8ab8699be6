"""Receive buffers that a backend lends out with the chunks read into them.

A read into fresh memory pays a page fault per 4 KiB on top of the copy (for a
32 MiB Redis value it doubled the client's CPU time), so a backend that reads
into buffers of its own keeps them for the next read: the engine calls
``release_now(obj)`` once it has copied a chunk out, and the buffer under that
chunk goes back to a free list. A chunk never released keeps its buffer, which
is then freed with the last reference, never reused under a reader.
"""

from __future__ import annotations

import threading
import weakref

from kvstacks.memory import MemoryObj


class LentObj(MemoryObj):
    """A chunk whose tensor lives in a lent buffer; weak-referenceable to notice a lost lease."""

    __slots__ = ("__weakref__",)

    @classmethod
    def of(cls, obj: MemoryObj) -> LentObj:
        return cls(obj.key, obj.data, obj.shape, obj.dtype, obj.compressor)


class ReadBuffers:
    """Free lists of buffers by exact size, idle bytes capped at ``limit``; thread-safe.

    Buffers are ``bytearray`` unless a subclass's ``make`` says otherwise (anything
    whose ``len`` is its size in bytes, e.g. a 1-D ``uint8`` tensor).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free: dict[int, list] = {}
        self._idle = 0
        self._lent: dict[int, tuple[weakref.ref, object]] = {}
        self._lock = threading.Lock()

    def make(self, size: int):
        """A new buffer of ``size`` bytes."""
        return bytearray(size)

    def take(self, size: int):
        """A buffer of exactly ``size`` bytes, contents undefined."""
        with self._lock:
            free = self._free.get(size)
            if free:
                self._idle -= size
                return free.pop()
        return self.make(size)

    def give_back(self, buffer) -> None:
        size = len(buffer)
        with self._lock:
            if self._idle + size > self.limit:
                # The newest size is the likeliest next: drop idle buffers of other sizes first.
                for other in [s for s in self._free if s != size]:
                    while self._free[other] and self._idle + size > self.limit:
                        self._free[other].pop()
                        self._idle -= other
                if self._idle + size > self.limit:
                    return
            self._free.setdefault(size, []).append(buffer)
            self._idle += size

    def lend(self, obj: MemoryObj, buffer) -> LentObj:
        """``obj`` (whose tensor lives in ``buffer``) as the object to hand out."""
        lent = LentObj.of(obj)
        ident = id(lent)
        with self._lock:
            self._lent[ident] = (weakref.ref(lent, lambda ref: self._lost(ident, ref)), buffer)
        return lent

    def release(self, obj: MemoryObj) -> None:
        """The reader is done with ``obj`` from ``lend``; anything else is ignored."""
        with self._lock:
            entry = self._lent.get(id(obj))
            if entry is None or entry[0]() is not obj:
                return
            del self._lent[id(obj)]
        self.give_back(entry[1])

    @property
    def idle_bytes(self) -> int:
        return self._idle

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
            self._idle = 0

    def _lost(self, ident: int, ref: weakref.ref) -> None:
        # Runs wherever the last reference died, maybe under our lock: one atomic
        # dict operation, no lock. The buffer goes with the object, not to the free list.
        entry = self._lent.get(ident)
        if entry is not None and entry[0] is ref:
            self._lent.pop(ident, None)
