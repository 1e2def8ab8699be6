"""The builtin ``p2p`` backend: a read-only last tier that pulls misses from other instances.

On a local miss the engine asks this tier (it is ``shared``, so it is asked rather than
trusted from an index); it asks the controller which other instance holds the longest
run of the missing chunks, and retrieve pulls them from that peer's agent over a
transfer channel. The engine then stores them in the tiers above as it does any
lower-tier hit. A peer that is down, slow or sends other chunks is a miss.
It needs the stack's ``controller:`` section: the worker agent attaches itself.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from kvstacks.backend import Backend
from kvstacks.errors import InvalidInput
from kvstacks.hookspecs import hookimpl
from kvstacks.keys import CacheKey
from kvstacks.memory import MemoryObj


class PeerBackend(Backend):
    """Chunks other instances hold, fetched on demand through this worker's agent."""

    name = "p2p"
    shared = True
    read_only = True

    @dataclass
    class Options:
        #: Transfer channel to pull over; by default the most preferred one both sides have.
        channel: str | None = None
        #: Seconds a whole pull may take before it counts as a miss.
        timeout: float = 10.0
        #: How long a lookup's answer is reused by the retrieve that follows it.
        reuse_seconds: float = 2.0

    def __init__(self, options: Any = None) -> None:
        self.options = options if options is not None else self.Options()
        self.agent: Any = None
        self._last: tuple[CacheKey, float, list[dict[str, Any]]] | None = None

    def attach(self, agent: Any) -> None:
        self.agent = agent

    def _locate(self, keys: list[CacheKey]) -> list[dict[str, Any]]:
        last = self._last
        if last is not None and last[0] == keys[0] and time.monotonic() - last[1] < self.options.reuse_seconds:
            return last[2]
        peers = self.agent.locate(keys)
        self._last = (keys[0], time.monotonic(), peers)
        return peers

    async def batch_contains(self, keys: list[CacheKey]) -> list[bool]:
        if self.agent is None or not keys:
            return [False] * len(keys)
        peers = await asyncio.to_thread(self._locate, keys)
        most = max((p["chunks"] for p in peers if isinstance(p.get("chunks"), int)), default=0)
        return [j < most for j in range(len(keys))]

    async def batch_get(self, keys: list[CacheKey]) -> list[MemoryObj | None]:
        if self.agent is None or not keys:
            return [None] * len(keys)
        peers = await asyncio.to_thread(self._locate, keys)
        self._last = None  # the chunks are local after this retrieve
        objs = await asyncio.to_thread(self.agent.pull, keys, peers, self.options.channel, self.options.timeout)
        return [*objs, *[None] * (len(keys) - len(objs))]

    async def get(self, key: CacheKey) -> MemoryObj | None:
        return (await self.batch_get([key]))[0]

    async def contains(self, key: CacheKey) -> bool:
        return (await self.batch_contains([key]))[0]

    async def put(self, key: CacheKey, obj: MemoryObj) -> None:
        raise InvalidInput("the p2p tier is read-only")

    async def remove(self, key: CacheKey) -> bool:
        return False

    async def clear(self) -> None:
        pass


@hookimpl
def register_backends(register) -> None:
    register(PeerBackend)
