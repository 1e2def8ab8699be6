"""Prometheus metrics of the controller, in a registry of its own.

Request counts and latencies are recorded as requests end; everything about the
fleet (workers, index, pins, pending events) is read from the cluster at scrape
time, so a scrape always sees the current state.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class ClusterCollector(Collector):
    def __init__(self, cluster) -> None:
        self.cluster = cluster

    def collect(self) -> Iterator:
        c = self.cluster
        reg = c.registry
        status = GaugeMetricFamily(
            "kvstacks_controller_workers", "Registered workers by health", labels=["status"]
        )
        healthy_gauge = GaugeMetricFamily(
            "kvstacks_worker_healthy",
            "1 while a worker heartbeats within the timeout",
            labels=["instance_id", "worker_id"],
        )
        held = GaugeMetricFamily(
            "kvstacks_controller_holder_chunks",
            "Chunks the index holds per worker and location",
            labels=["instance_id", "worker_id", "location"],
        )
        healthy = unhealthy = 0
        for worker in list(reg.workers.values()):
            ok = reg.healthy(worker)
            healthy += ok
            unhealthy += not ok
            healthy_gauge.add_metric([worker.instance_id, str(worker.worker_id)], 1.0 if ok else 0.0)
            for tier, hid in worker.holders.items():
                held.add_metric([worker.instance_id, str(worker.worker_id), tier], c.index.count(hid))
        status.add_metric(["healthy"], healthy)
        status.add_metric(["unhealthy"], unhealthy)
        yield status
        yield healthy_gauge
        yield held
        yield GaugeMetricFamily(
            "kvstacks_controller_chunks_indexed",
            "Distinct chunks held by at least one worker",
            value=len(c.index),
        )
        yield GaugeMetricFamily(
            "kvstacks_controller_index_bytes", "Memory of the chunk index arrays", value=c.index.nbytes
        )
        yield GaugeMetricFamily(
            "kvstacks_controller_pinned_chunks",
            "Pinned chunks over all workers (from heartbeats)",
            value=c.pinned_chunks(),
        )
        yield GaugeMetricFamily(
            "kvstacks_controller_worker_chunks",
            "Chunks stored over all workers and tiers (from heartbeats)",
            value=c.worker_chunks(),
        )
        yield GaugeMetricFamily(
            "kvstacks_controller_pending_events", "Commands still running", value=c.executor.pending
        )
        events = CounterMetricFamily(
            "kvstacks_controller_chunk_events", "Chunk admit/evict events ingested", labels=["kind"]
        )
        for kind, n in c.chunk_events.items():
            events.add_metric([kind], n)
        yield events
        digests = CounterMetricFamily(
            "kvstacks_controller_index_digests",
            "Workers' per-tier digest checks, by outcome (stale: the index differed somewhere)",
            labels=["result"],
        )
        for result, n in c.digests.items():
            digests.add_metric([result], n)
        yield digests
        yield CounterMetricFamily(
            "kvstacks_controller_index_resyncs",
            "Tiers re-sent in full by their worker after a stale digest",
            value=c.resyncs,
        )


class ControllerMetrics:
    def __init__(self, cluster) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.latency = Histogram(
            "kvstacks_controller_request_duration_seconds",
            "Time to answer a request",
            ["endpoint"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.requests = Counter(
            "kvstacks_controller_requests", "Requests answered", ["endpoint", "code"], registry=self.registry
        )
        self.registry.register(ClusterCollector(cluster))

    def observe(self, endpoint: str, code: int, seconds: float) -> None:
        self.latency.labels(endpoint).observe(seconds)
        self.requests.labels(endpoint, str(code)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
