"""Prometheus metrics for engines, read from tier statistics at scrape time.

Counters and gauges cost nothing on the hot path: a collector reads each live
engine's ``stats()`` when Prometheus scrapes. Only the two latency histograms
are observed per call. Serve them with ``prometheus_client.start_http_server``
or any app that exposes ``REGISTRY``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

_BUCKETS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
STORE_SECONDS = Histogram("kvstacks_store_seconds", "Time spent in store() per call", buckets=_BUCKETS, registry=REGISTRY)
RETRIEVE_SECONDS = Histogram("kvstacks_retrieve_seconds", "Time spent in retrieve() per call", buckets=_BUCKETS, registry=REGISTRY)
TIER_WRITE_SECONDS = Histogram("kvstacks_tier_write_seconds", "Time to write one chunk to a tier on the I/O loop",
                               ["model", "tier"], buckets=_BUCKETS, registry=REGISTRY)
TIER_READ_SECONDS = Histogram("kvstacks_tier_read_seconds", "Time to read one chunk from a tier on the I/O loop",
                              ["model", "tier"], buckets=_BUCKETS, registry=REGISTRY)

_engines: weakref.WeakSet[Any] = weakref.WeakSet()

COUNTERS = {
    "hits": "Chunks served by the tier",
    "misses": "Chunks looked for in the tier and not found there",
    "evictions": "Chunks evicted to make room",
    "stores": "Chunks admitted",
    "rejected": "Chunks refused because nothing evictable was left",
    "errors": "Backend calls that failed",
    "corrupt": "Chunks that failed validation and were dropped",
    "dropped": "Offloads given up (queue or tier full, a permanent failure, retries exhausted, or pending at close)",
    "bytes_written": "Bytes written to the tier",
    "bytes_read": "Bytes read from the tier",
}
GAUGES = {
    "objects": "Chunks held",
    "bytes": "Bytes held",
    "capacity": "Capacity in bytes (absent when unbounded)",
    "pins": "Pinned chunks",
    "queue_depth": "Offload writes waiting for the tier",
}


def track(engine: Any) -> None:
    _engines.add(engine)


def untrack(engine: Any) -> None:
    _engines.discard(engine)


class TierCollector(Collector):
    def collect(self) -> Iterator[Any]:
        labels = ["model", "tier"]
        counters = {k: CounterMetricFamily(f"kvstacks_tier_{k}", doc, labels=labels) for k, doc in COUNTERS.items()}
        gauges = {k: GaugeMetricFamily(f"kvstacks_tier_{k}", doc, labels=labels) for k, doc in GAUGES.items()}
        kinds = CounterMetricFamily("kvstacks_tier_errors_by_kind", "Failed backend calls by kind (errno name or "
                                    "exception class)", labels=[*labels, "kind"])
        for engine in list(_engines):
            for tier, snap in engine.stats().items():
                values = [engine.config.model, tier]
                for k, family in counters.items():
                    family.add_metric(values, snap[k])
                for k, family in gauges.items():
                    if snap.get(k) is not None:
                        family.add_metric(values, snap[k])
                for kind, count in snap.get("error_kinds", {}).items():
                    kinds.add_metric([*values, kind], count)
        yield from counters.values()
        yield from gauges.values()
        yield kinds


REGISTRY.register(TierCollector())
