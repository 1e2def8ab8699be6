"""The worker registry: who registered, from where, and whether it still beats."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

#: LMCache's location names, accepted wherever a tier name is expected.
LOCATION_ALIASES = {"LocalCPUBackend": "cpu", "LocalDiskBackend": "disk"}


@dataclass
class Worker:
    instance_id: str
    worker_id: int
    session: str
    address: str
    chunk_size: int
    tiers: list[str]
    model: str = ""
    pid: int = 0
    version: str = ""
    transfer: dict[str, str] = field(default_factory=dict)
    registered_at: float = 0.0  # wall clock
    last_heartbeat: float = 0.0  # monotonic
    last_heartbeat_wall: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    holders: dict[str, int] = field(default_factory=dict)  # tier -> holder id in the chunk index

    def healthy(self, now: float, timeout: float) -> bool:
        return now - self.last_heartbeat <= timeout

    def resolve_tier(self, location: str) -> str | None:
        if location in self.tiers:
            return location
        alias = LOCATION_ALIASES.get(location)
        return alias if alias in self.tiers else None

    def describe(self, now: float, timeout: float, brief: bool = False) -> dict[str, Any]:
        """The worker as the API shows it; ``brief`` for unauthenticated GET /health (no addresses)."""
        host, _, port = self.address.rpartition(":")
        out = {
            "instance_id": self.instance_id,
            "worker_id": self.worker_id,
            "status": "healthy" if self.healthy(now, timeout) else "unhealthy",
            "last_heartbeat": _iso(self.last_heartbeat_wall),
            "seconds_since_heartbeat": round(now - self.last_heartbeat, 3),
            "locations": list(self.tiers),
        }
        if brief:
            return out
        return {
            **out,
            "registered_at": _iso(self.registered_at),
            "ip": host,
            "port": int(port) if port.isdigit() else 0,
            "address": self.address,
            "pid": self.pid,
            "version": self.version,
            "model": self.model,
            "chunk_size": self.chunk_size,
            "transfer": dict(self.transfer),
            "stats": self.stats,
        }


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class WorkerRegistry:
    def __init__(self, heartbeat_timeout: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.heartbeat_timeout = heartbeat_timeout
        self.clock = clock
        self._workers: dict[tuple[str, int], Worker] = {}

    @property
    def workers(self) -> dict[tuple[str, int], Worker]:
        """(instance_id, worker_id) -> worker; a shared registry brings its view up to date first."""
        self.sync()
        return self._workers

    def sync(self) -> None:
        """Bring this process's view of the fleet up to date (nothing to do when it is the only one)."""

    def add(self, worker: Worker) -> Worker | None:
        """Register (or re-register) a worker; return the entry it replaces."""
        now = self.clock()
        worker.registered_at = worker.last_heartbeat_wall = time.time()
        worker.last_heartbeat = now
        previous = self._workers.get((worker.instance_id, worker.worker_id))
        self._workers[(worker.instance_id, worker.worker_id)] = worker
        return previous

    def get(self, instance_id: str, worker_id: int, session: str | None = None) -> Worker | None:
        worker = self._workers.get((instance_id, worker_id))
        if worker is None or (session is not None and worker.session != session):
            return None
        return worker

    def beat(self, worker: Worker, stats: dict[str, Any] | None = None) -> None:
        worker.last_heartbeat = self.clock()
        worker.last_heartbeat_wall = time.time()
        if stats is not None:
            worker.stats = stats

    def remove(self, instance_id: str, worker_id: int) -> Worker | None:
        return self._workers.pop((instance_id, worker_id), None)

    def healthy(self, worker: Worker) -> bool:
        return worker.healthy(self.clock(), self.heartbeat_timeout)

    def instance(self, instance_id: str) -> list[Worker]:
        return sorted(
            (w for w in self.workers.values() if w.instance_id == instance_id), key=lambda w: w.worker_id
        )

    def instances(self) -> dict[str, list[Worker]]:
        out: dict[str, list[Worker]] = {}
        for worker in sorted(self.workers.values(), key=lambda w: (w.instance_id, w.worker_id)):
            out.setdefault(worker.instance_id, []).append(worker)
        return out

    def healthy_workers(self) -> list[Worker]:
        now = self.clock()
        return [w for w in self.workers.values() if w.healthy(now, self.heartbeat_timeout)]

    def describe(self, worker: Worker, brief: bool = False) -> dict[str, Any]:
        return worker.describe(self.clock(), self.heartbeat_timeout, brief)
