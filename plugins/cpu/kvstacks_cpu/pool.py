"""A size-classed pool of host buffers, so a busy CPU tier does not fragment memory.

Chunks are nearly all one size (a full chunk of one model), so a free list per
size class turns almost every store into a pop and every removal into a push:
no allocator traffic, no page faults on first touch, no holes. Sizes above a page
are rounded up to whole pages, smaller ones to a power of two. A pool given an
:class:`~kvstacks_cpu.arena.Arena` (``reserve``) carves new buffers out of it,
already faulted in, before asking torch for memory.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from kvstacks_cpu.arena import Arena

PAGE = 4096
MIN_CLASS = 64


def size_class(nbytes: int) -> int:
    """The buffer size the pool hands out for a request of ``nbytes``."""
    if nbytes > PAGE:
        return -(-nbytes // PAGE) * PAGE
    return max(MIN_CLASS, 1 << (nbytes - 1).bit_length()) if nbytes > 1 else MIN_CLASS


class PoolBuffer:
    """One pooled buffer of ``size`` bytes, plus the typed view last made of it.

    Chunks are nearly all one shape, so the view is made once per buffer, not once
    per store (a ``view`` costs microseconds, a real share of a 1 KiB store). A
    buffer whose size class is exactly the chunk's size is born typed; its flat
    ``uint8`` form (``data``) is made only if it is ever reused for another shape.
    """

    __slots__ = ("_data", "_dtype", "_shape", "_view", "arena", "size")

    def __init__(self, data: torch.Tensor | None = None, *, typed: torch.Tensor | None = None,
                 arena: Arena | None = None) -> None:
        self._data = data
        self.arena = arena  # where the memory goes back to when the pool lets the buffer go
        if typed is not None:
            self._view = typed
            self._dtype: torch.dtype | None = typed.dtype
            self._shape: tuple[int, ...] = tuple(typed.shape)
            self.size = typed.numel() * typed.element_size()
        else:
            assert data is not None
            self._view = data
            self._dtype, self._shape = None, ()
            self.size = data.numel()

    @property
    def data(self) -> torch.Tensor:
        """The whole buffer as a 1-D ``uint8`` tensor."""
        if self._data is None:
            self._data = self._view.reshape(-1).view(torch.uint8)
        return self._data

    def typed(self, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The first ``nbytes`` as a contiguous ``dtype`` tensor of ``shape``."""
        if dtype is self._dtype and shape == self._shape:
            return self._view
        data = self.data
        flat = data if self.size == nbytes else data[:nbytes]
        self._view = flat.view(dtype).view(tuple(shape))
        self._dtype, self._shape = dtype, tuple(shape)
        return self._view


@dataclass
class PoolStats:
    reserved_bytes: int  # in use + idle: what the pool holds from the system
    in_use_bytes: int
    free_bytes: int
    free_buffers: int
    allocations: int  # buffers obtained from torch
    reuses: int  # requests served from a free list
    released: int  # buffers let go to the system (over pool_limit, shrink, or lost leases)
    pinned: bool
    arena_bytes: int = 0  # reserved up front (``reserve``); counted in reserved_bytes
    prefaulted_bytes: int = 0  # of the arena, faulted in so far by the background thread


class BufferPool:
    """Free lists of :class:`PoolBuffer`, one list per size class.

    ``limit`` caps the idle bytes kept for reuse (``None``: keep every buffer
    handed back). ``ceiling`` (the tier's capacity) caps the idle bytes when ``limit``
    does not: buffers leased past their eviction (by offloads, by readers) that come
    back together never stay behind as more idle memory than the tier may hold. On a
    miss, idle buffers of *other* classes totalling the request are let go first, so the memory held tracks the peak in use even
    when chunk sizes drift. Thread-safe.
    """

    def __init__(self, limit: int | None = None, pin_memory: bool = False) -> None:
        self.limit = limit
        self.ceiling: int | None = None
        self.pin_memory = pin_memory
        self._free: dict[int, list[PoolBuffer]] = {}
        self._lock = threading.Lock()
        self._in_use = 0
        self._idle = 0
        self._allocations = 0
        self._reuses = 0
        self._released = 0
        self._arena: Arena | None = None

    def reserve(self, nbytes: int, prefault: bool = True) -> None:
        """Hold ``nbytes`` up front for new buffers, faulted in by a background thread."""
        with self._lock:
            if self._arena is None and nbytes >= PAGE:
                self._arena = Arena(-(-nbytes // PAGE) * PAGE, prefault)

    def close(self) -> None:
        """Let every idle buffer and the arena go (buffers still in use keep their memory)."""
        self.trim()
        with self._lock:
            arena, self._arena = self._arena, None
        if arena is not None:
            arena.close()

    def take(self, nbytes: int, dtype: torch.dtype | None = None, shape: tuple[int, ...] | None = None) -> PoolBuffer:
        """A buffer of at least ``nbytes`` (exactly ``size_class(nbytes)``), contents undefined.

        With ``dtype`` and ``shape`` (describing ``nbytes``), a new buffer that fits
        exactly is allocated in that form, saving two views on a store.
        """
        size = size_class(nbytes)
        with self._lock:
            free = self._free.get(size)
            if free:
                self._idle -= size
                self._in_use += size
                self._reuses += 1
                return free.pop()
            if self._idle:
                self._shrink(size)
            self._in_use += size
            self._allocations += 1
            arena = self._arena
        if arena is not None:
            view = arena.carve(size)
            if view is not None:
                if dtype is not None and shape is not None and size == nbytes:
                    return PoolBuffer(view, typed=view.view(dtype).view(shape), arena=arena)
                return PoolBuffer(view, arena=arena)
        try:
            if dtype is not None and shape is not None and size == nbytes:
                return PoolBuffer(typed=torch.empty(shape, dtype=dtype, pin_memory=self.pin_memory))
            return PoolBuffer(torch.empty(size, dtype=torch.uint8, pin_memory=self.pin_memory))
        except BaseException:
            with self._lock:
                self._in_use -= size
            raise

    def give_back(self, buffer: PoolBuffer) -> None:
        """Return a buffer from ``take``; nobody may read or write it afterwards."""
        size = buffer.size
        with self._lock:
            self._in_use -= size
            limit = self.limit if self.limit is not None else self.ceiling
            if limit is not None and self._idle + size > limit:
                self._let_go(buffer)
                return
            self._free.setdefault(size, []).append(buffer)
            self._idle += size

    def forget(self, buffer: PoolBuffer) -> None:
        """Stop accounting a buffer from ``take`` that will not come back (torch frees it)."""
        with self._lock:
            self._in_use -= buffer.size
            self._released += 1

    def trim(self) -> int:
        """Let every idle buffer go; return the bytes released."""
        with self._lock:
            released = self._idle
            for free in self._free.values():
                for buffer in free:
                    self._let_go(buffer)
            self._free.clear()
            self._idle = 0
        return released

    def _shrink(self, wanted: int) -> None:
        # Called with the lock held, on a miss for class ``wanted``.
        freed = 0
        for size in list(self._free):
            if size == wanted:
                continue
            free = self._free[size]
            while free and freed < wanted:
                self._let_go(free.pop())
                freed += size
                self._idle -= size
            if not free:
                del self._free[size]
            if freed >= wanted:
                return

    def _let_go(self, buffer: PoolBuffer) -> None:
        # With the lock held. Heap buffers are freed by torch with their last reference.
        self._released += 1
        if buffer.arena is not None:
            buffer.arena.give_back(buffer.data)

    def stats(self) -> PoolStats:
        with self._lock:
            arena = self._arena
            return PoolStats(
                reserved_bytes=self._in_use + self._idle + (arena.free_bytes if arena else 0),
                in_use_bytes=self._in_use,
                free_bytes=self._idle,
                free_buffers=sum(len(v) for v in self._free.values()),
                allocations=self._allocations,
                reuses=self._reuses,
                released=self._released,
                pinned=self.pin_memory,
                arena_bytes=arena.size if arena else 0,
                prefaulted_bytes=arena.populated if arena else 0,
            )
