"""The tier backend interface that storage plugins implement."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from kvstacks.keys import CacheKey
from kvstacks.memory import MemoryObj

if TYPE_CHECKING:
    import torch


class Backend:
    """Where a tier keeps its chunks. Subclass it and register it with ``register_backends``.

    Methods are coroutines run on the engine's I/O event loop. A backend raises
    on failure (the tier counts, logs and retries); a missing or corrupt chunk is
    ``None`` from ``get`` (remove a corrupt one before returning ``None``).

    Capacity, eviction, pins and compression are the tier's job, not the
    backend's: a backend only stores what it is given.
    """

    name: ClassVar[str]
    #: True when others can write the store too (Redis, Mooncake): the tier then
    #: asks the backend in ``lookup`` instead of trusting its own index.
    shared: ClassVar[bool] = False
    #: True for a backend the engine only reads (the ``p2p`` peer tier): nothing is
    #: offloaded, demoted or promoted into it.
    read_only: ClassVar[bool] = False
    #: Chunks this backend found corrupt, dropped and reported as misses; the tier adds it
    #: to its ``corrupt`` statistic (and metric).
    corrupt_count: int = 0
    #: The tier's capacity in bytes (None: unbounded), set by the tier before ``start``; a
    #: backend may use it to reserve memory up front, never to refuse or evict chunks.
    capacity: int | None = None

    @dataclass
    class Options:
        pass

    def __init__(self, options: Backend.Options | None = None) -> None:
        self.options = options if options is not None else self.Options()

    @classmethod
    def check_options(cls, options: Backend.Options) -> None:
        """Refuse, with a ``ConfigError``, options that ``__init__`` or ``start()`` would refuse.

        Called for every tier by ``kvstacks check`` and before the engine builds the
        tier, so a mistake shows up in ``check``, not at serving time. It must have
        no side effects: no connection, no file or directory created, nothing
        allocated. Name options relative to the tier entry (``"path"``).
        """

    @classmethod
    def claims(cls, options: Backend.Options) -> list[str]:
        """What this tier must have to itself (``"directory /var/cache/kv"``).

        Two tiers of one stack claiming the same thing are refused at config time.
        """
        return []

    async def start(self) -> None:
        """Connect or open; called once before any other call."""

    async def close(self) -> None:
        """Release resources; must return promptly even if the store is unreachable."""

    async def put(self, key: CacheKey, obj: MemoryObj) -> None:
        raise NotImplementedError

    async def get(self, key: CacheKey) -> MemoryObj | None:
        raise NotImplementedError

    async def contains(self, key: CacheKey) -> bool:
        raise NotImplementedError

    async def remove(self, key: CacheKey) -> bool:
        """Remove ``key``; return whether it was there."""
        raise NotImplementedError

    async def clear(self) -> None:
        """Remove every chunk this backend wrote (and only those)."""
        async for key, _ in self.keys():
            await self.remove(key)

    async def keys(self) -> AsyncIterator[tuple[CacheKey, int]]:
        """Yield ``(key, stored_bytes)`` for every chunk present, to rebuild a tier's index at start."""
        return
        yield  # pragma: no cover

    def release_now(self, obj: MemoryObj) -> None:
        """The caller has finished reading ``obj`` (from ``get``, ``batch_get`` or ``get_now``).

        Objects are leases: a backend that recycles memory (the CPU pool, the disk
        tier's aligned read buffers) must not reuse ``obj``'s bytes until it is
        released, even if the key is removed meanwhile. The engine releases what it
        reads once it has copied it out; an object never released is simply not
        recycled. Called from any thread; must not block.
        """

    async def batch_put(self, items: Iterable[tuple[CacheKey, MemoryObj]]) -> None:
        for key, obj in items:
            await self.put(key, obj)

    async def batch_get(self, keys: list[CacheKey]) -> list[MemoryObj | None]:
        return [await self.get(key) for key in keys]

    async def batch_contains(self, keys: list[CacheKey]) -> list[bool]:
        """Whether each key is present; override to test a whole prefix in one round trip."""
        return [await self.contains(key) for key in keys]

    async def batch_get_into(self, keys: list[CacheKey], places: list[torch.Tensor]) -> list[MemoryObj | None]:
        """``batch_get``, with the caller's memory for each chunk's KV.

        ``places[i]`` is where key ``i``'s KV goes, a view ``[2, layers, tokens, hidden]`` of the
        caller's ``out`` (strided) in the dtype and shape that chunk must have, uncompressed. A
        backend that can read a payload straight there returns an object whose ``data`` is
        ``places[i]`` itself, saving a buffer and a copy; for any chunk it cannot (another
        layout, a compressed or a lying chunk), it returns what ``batch_get`` would, and the
        engine copies and releases it as usual. Bytes of ``places[i]`` may be written even when
        that chunk then turns out to be a miss. The default is ``batch_get``.
        """
        return await self.batch_get(keys)


class InProcessBackend(Backend):
    """A backend whose operations never wait on I/O (the CPU tier).

    It implements the ``*_now`` methods; the engine calls them directly from the
    caller's thread, so a hit in this tier costs no thread hop and no event loop.
    """

    #: Set by the engine when a tier below writes this tier's objects as frames as they are
    #: (same coding): a backend that copies chunks in may then compute each copy's frame
    #: check while copying (``kvstacks.frame.copy_checked``) and set ``MemoryObj.check`` on
    #: the object it stores, so those tiers need not read the chunk again to hash it.
    carry_checks: bool = False

    def put_now(self, key: CacheKey, obj: MemoryObj) -> None:
        raise NotImplementedError

    def get_now(self, key: CacheKey) -> MemoryObj | None:
        """The stored object itself (no copy), leased to the caller until ``release_now``."""
        raise NotImplementedError


    def contains_now(self, key: CacheKey) -> bool:
        raise NotImplementedError

    def remove_now(self, key: CacheKey) -> bool:
        raise NotImplementedError

    def keys_now(self) -> list[tuple[CacheKey, int]]:
        raise NotImplementedError

    def clear_now(self) -> None:
        for key, _ in self.keys_now():
            self.remove_now(key)

    async def put(self, key: CacheKey, obj: MemoryObj) -> None:
        self.put_now(key, obj)

    async def get(self, key: CacheKey) -> MemoryObj | None:
        return self.get_now(key)

    async def contains(self, key: CacheKey) -> bool:
        return self.contains_now(key)

    async def remove(self, key: CacheKey) -> bool:
        return self.remove_now(key)

    async def clear(self) -> None:
        self.clear_now()

    async def keys(self) -> AsyncIterator[tuple[CacheKey, int]]:
        for item in self.keys_now():
            yield item
