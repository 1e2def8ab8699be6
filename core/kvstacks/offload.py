"""Asynchronous writes to lower tiers: bounded queues, retries with backoff.

The caller never waits on a lower tier: ``submit`` either queues the write or,
when the queue's byte budget is spent, drops it (counted) or waits, as the
stack's ``offload.when_full`` says. A write that fails transiently is retried with
exponential backoff, then dropped and counted; one that fails permanently (disk full,
read-only, permission denied: see ``kvstacks.faults``) is dropped at once. Nothing
raises into ``store``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from kvstacks.config import OffloadConfig
from kvstacks.errors import TierFull
from kvstacks.keys import CacheKey
from kvstacks.loop import IOLoop
from kvstacks.memory import MemoryObj
from kvstacks.tier import Tier

log = logging.getLogger("kvstacks.offload")


@dataclass(eq=False)
class Job:
    tier: Tier
    key: CacheKey
    obj: MemoryObj
    nbytes: int
    done: Callable[[], None] | None = None  # releases whatever kept ``obj`` alive


class Offloader:
    def __init__(self, io: IOLoop, tiers: list[Tier], config: OffloadConfig,
                 on_stored: Callable[[Tier, CacheKey, list[tuple[CacheKey, int]]], None],
                 queue_bytes: int) -> None:
        self.io = io
        self.config = config
        #: the byte budget of everything queued (``config.queue_budget`` of the top tier's capacity)
        self.queue_bytes = queue_bytes
        self.on_stored = on_stored
        self._queued_bytes = 0
        self._cond = threading.Condition()
        self._pending = 0
        # (tier, key) of every queued write: a chunk queued twice (stored again before its
        # first write landed) is written once.
        self._queued: set[tuple[str, CacheKey]] = set()
        self._queues: dict[str, asyncio.Queue[Job]] = {}
        self._workers: list[asyncio.Task] = []
        self.depth: dict[str, int] = {t.name: 0 for t in tiers}
        io.run(self._start(tiers))

    async def _start(self, tiers: list[Tier]) -> None:
        for tier in tiers:
            queue: asyncio.Queue[Job] = asyncio.Queue()
            self._queues[tier.name] = queue
            for _ in range(self.config.workers):
                self._workers.append(asyncio.get_running_loop().create_task(self._work(queue)))

    def submit(self, job: Job) -> bool:
        """Queue a write from any thread; False when dropped for lack of room."""
        with self._cond:
            if (job.tier.name, job.key) in self._queued:
                if job.done:
                    job.done()
                return True
            budget = self.queue_bytes
            if self._queued_bytes + job.nbytes > budget and self._queued_bytes > 0:
                # The loop thread must never wait on itself: it drops instead.
                if self.config.when_full == "drop" or self.io.in_loop_thread:
                    job.tier.stats.dropped += 1
                    log.debug("offload queue full; dropped a chunk for tier %s", job.tier.name)
                    if job.done:
                        job.done()
                    return False
                while self._queued_bytes > 0 and self._queued_bytes + job.nbytes > budget:
                    self._cond.wait()
            self._queued_bytes += job.nbytes
            self._queued.add((job.tier.name, job.key))
            self._pending += 1
            self.depth[job.tier.name] += 1
        self.io.call_soon(self._queues[job.tier.name].put_nowait, job)
        return True

    async def _work(self, queue: asyncio.Queue[Job]) -> None:
        while True:
            job = await queue.get()
            try:
                await self._write(job)
            except asyncio.CancelledError:
                job.tier.stats.dropped += 1  # closing with this write unfinished
                raise
            finally:
                self._finish(job)

    def _finish(self, job: Job) -> None:
        if job.done:
            job.done()
        with self._cond:
            self._queued_bytes -= job.nbytes
            self._queued.discard((job.tier.name, job.key))
            self._pending -= 1
            self.depth[job.tier.name] -= 1
            self._cond.notify_all()

    async def _write(self, job: Job) -> None:
        tier = job.tier
        delay = self.config.backoff_s
        for attempt in range(self.config.retries + 1):
            try:
                victims = await tier.aput(job.key, job.obj)
            except TierFull:
                tier.stats.dropped += 1  # the refusal is logged by the tier; retrying cannot make room
                return
            except Exception as exc:
                # Counted by kind and logged once per burst; a permanent failure (a full or
                # read-only disk) is not retried: backing off would only delay the drop.
                if tier.failed("offload write", exc) or attempt == self.config.retries:
                    tier.stats.dropped += 1
                    return
                tier.stats.retries += 1
                await asyncio.sleep(delay)
                delay *= 2
                continue
            self.on_stored(tier, job.key, victims)
            return
        tier.stats.dropped += 1  # unreachable with a validated config; a dropped write is counted regardless

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued write finished; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    async def stop(self) -> None:
        """Stop the writers; writes still queued are dropped (counted) and their memory let go."""
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        for queue in self._queues.values():
            while not queue.empty():
                job = queue.get_nowait()
                job.tier.stats.dropped += 1
                self._finish(job)
