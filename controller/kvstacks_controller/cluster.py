"""The controller's view of the fleet: the ``ctx`` every command receives."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from kvstacks.keys import as_token_array, chunk_bounds, chunk_hashes

from kvstacks_controller.command import CommandError
from kvstacks_controller.executor import Executor
from kvstacks_controller.index import ChunkIndex
from kvstacks_controller.registry import LOCATION_ALIASES, Worker, WorkerRegistry
from kvstacks_controller.settings import Settings


class Cluster:
    """Index, registry and executor, plus the lookups commands share."""

    def __init__(self, settings: Settings | None = None, registry: WorkerRegistry | None = None) -> None:
        self.settings = settings or Settings()
        self.index: Any
        if self.settings.index == "memory":
            self.index = ChunkIndex()
            self.registry = registry or WorkerRegistry(self.settings.heartbeat_timeout)
        else:
            from kvstacks_controller.replicas import RedisChunkIndex, RedisStore, RedisWorkerRegistry

            store = RedisStore(self.settings.index)
            self.index = RedisChunkIndex(store)
            self.registry = registry or RedisWorkerRegistry(
                store, self.settings.heartbeat_timeout, self.settings.registry_ttl
            )
        self.executor = Executor(
            self.settings.worker_timeout, self.settings.max_events, self.settings.worker_token
        )
        self.chunk_events = {"admit": 0, "evict": 0}
        self.digests = {"match": 0, "stale": 0}  # digest checks by outcome
        self.resyncs = 0  # tiers a worker re-sent in full after a stale digest
        self.commands: dict[str, type] = {}
        self.openapi: dict[str, Any] = {}

    # ---------------------------------------------------------------- workers

    def add_worker(self, worker: Worker) -> None:
        previous = self.registry.get(worker.instance_id, worker.worker_id)
        if previous is not None:
            # A new session starts from nothing: the agent re-reports what it holds.
            for hid in previous.holders.values():
                self.index.release_holder(hid)
        worker.holders = {
            tier: self.index.holder(worker.instance_id, worker.worker_id, tier) for tier in worker.tiers
        }
        # Registered last: a shared registry stores the holders with the worker.
        self.registry.add(worker)

    def remove_worker(self, worker: Worker) -> None:
        self.registry.remove(worker.instance_id, worker.worker_id)
        for hid in worker.holders.values():
            self.index.release_holder(hid)

    def instance_workers(self, instance_id: str, healthy_only: bool = True) -> list[Worker]:
        """The workers of an instance, or a 404 that lists the instances there are."""
        workers = self.registry.instance(instance_id)
        if not workers:
            known = ", ".join(sorted(self.registry.instances())) or "none registered"
            raise CommandError(404, f"unknown instance_id {instance_id!r}; instances: {known}")
        if healthy_only:
            healthy = [w for w in workers if self.registry.healthy(w)]
            if not healthy:
                raise CommandError(
                    409,
                    f"instance {instance_id!r} has no healthy worker (no heartbeat for "
                    f"{self.registry.heartbeat_timeout:g}s); check GET /health",
                )
            if len(healthy) < len(workers):
                down = ", ".join(str(w.worker_id) for w in workers if w not in healthy)
                raise CommandError(
                    409,
                    f"instance {instance_id!r}: workers {down} are unhealthy; "
                    "a command must reach every rank",
                )
            return healthy
        return workers

    def resolve_location(self, workers: list[Worker], location: str | None) -> str | None:
        """The tier name for an operator's location (tier names or LMCache's names); None means every tier."""
        if location is None or location in ("", "all"):
            return None
        tier = workers[0].resolve_tier(location)
        if tier is None:
            aliases = ", ".join(f"{k} (= {v})" for k, v in LOCATION_ALIASES.items())
            raise CommandError(
                404,
                f"instance {workers[0].instance_id!r} has no location {location!r}; its "
                f"locations: {', '.join(workers[0].tiers)} (aliases: {aliases})",
            )
        return tier

    # ---------------------------------------------------------------- lookup

    def lookup(self, tokens: list[int], salt: str = "") -> dict[str, list[Any]]:
        """instance_id -> [location, matched prefix tokens] over healthy workers.

        A worker's prefix counts chunks found in any of its tiers; an instance's is
        the shortest over its ranks (each rank holds its own share of every chunk).
        The location is the tier that alone holds the longest prefix, the upper one
        on a tie.
        """
        workers = self.registry.healthy_workers()
        if not tokens or not workers:
            return {}
        by_size: dict[int, list[Worker]] = {}
        for worker in workers:
            by_size.setdefault(worker.chunk_size, []).append(worker)
        per_instance: dict[str, list[tuple[int, dict[str, int]]]] = {}
        salt_bytes = salt.encode()
        array = _array(tokens)
        for chunk_size, group in by_size.items():
            hashes = chunk_hashes(array, chunk_size, salt_bytes, partial=True)
            ends = [end for _, end in chunk_bounds(len(tokens), chunk_size, True)]
            groups: list[list[int]] = []
            for worker in group:
                groups.append(list(worker.holders.values()))
                groups.extend([hid] for hid in worker.holders.values())
            counts = self.index.prefix_lengths(hashes, groups).tolist()
            tokens_at = [0, *ends]  # chunks matched -> tokens matched
            at = 0
            for worker in group:
                total = counts[at]
                per_tier = {tier: counts[at + 1 + i] for i, tier in enumerate(worker.holders)}
                at += 1 + len(worker.holders)
                per_instance.setdefault(worker.instance_id, []).append(
                    (tokens_at[total], {t: tokens_at[c] for t, c in per_tier.items()})
                )
        layout: dict[str, list[Any]] = {}
        rank_counts = Counter(w.instance_id for w in self.registry.workers.values())
        for instance_id, ranks in per_instance.items():
            if len(ranks) < rank_counts[instance_id]:
                continue  # a rank is down: the instance cannot serve the prefix
            matched = min(total for total, _ in ranks)
            if not matched:
                continue
            tiers = list(ranks[0][1])
            best = max(tiers, key=lambda t: (min(r[1].get(t, 0) for r in ranks), -tiers.index(t)))
            layout[instance_id] = [best, matched]
        return layout

    def holder_tokens(self, worker: Worker, tier: str | None, tokens: list[int]) -> int:
        """Prefix tokens the index says ``worker`` holds in ``tier`` (all tiers when None)."""
        hids = list(worker.holders.values()) if tier is None else [worker.holders[tier]]
        hashes = chunk_hashes(_array(tokens), worker.chunk_size, b"", partial=True)
        count = int(self.index.prefix_lengths(hashes, [hids])[0]) if hashes else 0
        return chunk_bounds(len(tokens), worker.chunk_size, True)[count - 1][1] if count else 0

    def pinned_chunks(self) -> int:
        return int(sum(_tier_sum(w.stats, "pins") for w in self.registry.workers.values()))

    def worker_chunks(self) -> int:
        return int(sum(_tier_sum(w.stats, "objects") for w in self.registry.workers.values()))


def _array(tokens: Any) -> np.ndarray:
    array = getattr(tokens, "array", None)  # schema.TokenList: converted once, at validation
    return array if array is not None else as_token_array(tokens)


def _tier_sum(stats: Any, field: str) -> float:
    if not isinstance(stats, dict):
        return 0
    total = 0.0
    for tier_stats in stats.values():
        if isinstance(tier_stats, dict):
            value = tier_stats.get(field, 0)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
                total += value
    return total
