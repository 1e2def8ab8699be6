"""The controller's index matches what a real engine holds, whatever path changed it.

A real engine (cpu over disk) with its agent reports to a real controller on
loopback; every check goes through ``POST /lookup``.
"""

from __future__ import annotations

import itertools
import time

import pytest
import torch
from kvstacks import CacheEngine
from kvstacks.testing import require

CHUNK = 4
CHUNK_BYTES = 2 * 1 * CHUNK * 8 * 2  # [2, 1 layer, 4 tokens, 8] fp16
_instances = itertools.count()

pytestmark = pytest.mark.timeout(120)


def kv(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 1, n, 8, generator=torch.Generator().manual_seed(seed)).to(torch.float16)


@pytest.fixture
def make_engine(live_controller, tmp_path):
    require("kvstacks_cpu", "pip install -e plugins/cpu")
    require("kvstacks_disk", "pip install -e plugins/disk")
    engines = []

    def make(cpu_chunks: int = 4, **controller) -> CacheEngine:
        instance = f"truth-{next(_instances)}"
        engine = CacheEngine.from_config(
            {
                "model": "m",
                "chunk_size": CHUNK,
                "offload": {"queue_bytes": "1MiB"},  # the default, a quarter of this tiny cpu tier, drops
                "stack": [
                    {"backend": "cpu", "capacity": cpu_chunks * CHUNK_BYTES},
                    {"backend": "disk", "path": str(tmp_path / instance), "capacity": "1MiB"},
                ],
                "controller": {
                    "url": live_controller.url,
                    "instance_id": instance,
                    "heartbeat_interval": 0.2,
                    "flush_interval": 0.01,
                    **controller,
                },
            }
        )
        engine.instance = instance
        engines.append(engine)
        live_controller.wait(lambda: engine.agent.registered, "the agent to register")
        return engine

    yield make
    for engine in engines:
        engine.close()


def layout(controller, engine, tokens):
    return controller.lookup(tokens).get(engine.instance)


def held(controller, engine, tier: str) -> int:
    """Chunks the controller's index says ``engine`` holds in ``tier``."""
    worker = controller.cluster.registry.get(engine.instance, 0)
    return controller.cluster.index.count(worker.holders[tier]) if worker else -1


def test_a_move_that_fills_cpu_reports_what_it_evicted(live_controller, make_engine):
    # Fails before the fix: engine._move ignored the victims of the target's put, so /lookup kept
    # answering ["cpu", 12] for a prompt the worker no longer held (issue 10, item 1).
    engine = make_engine(cpu_chunks=4)
    a, b = list(range(12)), list(range(100, 116))
    engine.store(a, kv(12))
    engine.store(b, kv(16, seed=1))
    assert engine.flush(10)
    engine.clear("cpu")
    assert engine.move(a, "disk", "cpu", copy=False) == 12  # a is now only in cpu
    live_controller.wait(lambda: layout(live_controller, engine, a) == ["cpu", 12], "a indexed in cpu", timeout=30)
    assert engine.move(b, "disk", "cpu", copy=False) == 16  # fills cpu: a's chunks evicted, held nowhere
    assert engine.lookup(a) == 0
    live_controller.wait(lambda: layout(live_controller, engine, a) is None, "a gone from /lookup", timeout=30)
    # The admissions of b may come in a later report batch than the evictions of a.
    live_controller.wait(lambda: layout(live_controller, engine, b) == ["cpu", 16], "b indexed in cpu", timeout=30)


def test_a_promotion_is_reported_and_survives_clearing_the_lower_tier(live_controller, make_engine):
    # Fails before the fix: promotion reported evictions but not admissions, so /lookup said disk,
    # and clearing disk made the instance vanish although cpu held the prompt (issue 10, item 2).
    engine = make_engine(cpu_chunks=8)
    a = list(range(12))
    engine.store(a, kv(12))
    assert engine.flush(10)
    engine.clear("cpu")
    live_controller.wait(lambda: layout(live_controller, engine, a) == ["disk", 12], "a indexed in disk only")
    _, n = engine.retrieve(a)
    assert n == 12 and engine.lookup_tiers(a) == {"cpu": 12, "disk": 12}
    live_controller.wait(lambda: layout(live_controller, engine, a) == ["cpu", 12], "the promotion indexed")
    engine.clear("disk")
    live_controller.wait(lambda: held(live_controller, engine, "disk") == 0, "the disk clear indexed")
    assert layout(live_controller, engine, a) == ["cpu", 12]


def test_chunks_a_tier_finds_gone_on_read_leave_the_index(live_controller, make_engine, tmp_path):
    # Fails before the fix: a tier forgot chunks it found missing on read without a report.
    engine = make_engine()
    a = list(range(12))
    engine.store(a, kv(12))
    assert engine.flush(10)
    engine.clear("cpu")
    live_controller.wait(lambda: layout(live_controller, engine, a) == ["disk", 12], "a indexed in disk")
    for path in (tmp_path / engine.instance).rglob("*"):
        if path.is_file():
            path.unlink()  # behind the engine's back
    assert engine.retrieve(a) == (None, 0)
    live_controller.wait(lambda: layout(live_controller, engine, a) is None, "the lost chunks unindexed")


def test_lost_reports_are_healed_by_the_digest_check(live_controller, make_engine):
    # Fails before the fix: nothing compared the index with the engine, so a lost report stayed
    # lost until the worker happened to register again (issue 10, item 3).
    interval = 0.5
    engine = make_engine(cpu_chunks=16, resync_interval=interval)
    agent = engine.agent
    a, b = list(range(12)), list(range(200, 212))
    engine.store(a, kv(12))
    assert engine.flush(10)
    live_controller.wait(lambda: layout(live_controller, engine, a) == ["cpu", 12], "a indexed")
    report = agent.report
    agent.report = lambda *args: None  # every report lost on the way, as a dropped batch would be
    try:
        engine.store(b, kv(12, seed=2))
        assert engine.flush(10)
        engine.remove(a)
    finally:
        agent.report = report
    started = time.monotonic()
    live_controller.wait(
        lambda: layout(live_controller, engine, a) is None and layout(live_controller, engine, b) == ["cpu", 12],
        "the index to converge",
        timeout=interval + 1.0 + 10,  # a check, its confirmation, the resync (and a loaded machine)
    )
    healed = time.monotonic() - started
    assert agent.resyncs >= 1
    metrics = live_controller.http.get("/metrics").text
    assert "kvstacks_controller_index_resyncs_total" in metrics
    print(f"healed in {healed:.2f} s (resync_interval {interval} s)")


def test_a_quiet_index_costs_one_digest_per_interval_and_no_resync(live_controller, make_engine):
    engine = make_engine(cpu_chunks=4, resync_interval=0.1)
    for i in range(6):  # evictions from cpu too: every path reports, so the digests agree
        engine.store(list(range(100 * i, 100 * i + 8)), kv(8, seed=i))
    assert engine.flush(10)
    time.sleep(0.3)  # a check that straddled the stores may still confirm and resync once
    checks, resyncs = engine.agent.digest_checks, engine.agent.resyncs
    live_controller.wait(lambda: engine.agent.digest_checks >= checks + 5, "five digest checks")
    assert engine.agent.resyncs == resyncs


def test_clear_says_how_many_tokens_went(live_controller, make_engine):
    # Fails before the fix: /clear answered chunks x chunk_size, so a 6-token prompt (a full
    # chunk of 4 and a partial one of 2) said 8, and a prompt in cpu and disk counted twice.
    engine = make_engine(cpu_chunks=4)
    engine.store(list(range(6)), kv(6))
    engine.flush()
    live_controller.wait(lambda: layout(live_controller, engine, list(range(6))), "the store to be reported")
    r = live_controller.http.post("/clear", json={"instance_id": engine.instance, "location": "cpu"})
    assert r.status_code == 200, r.text
    assert r.json()["num_tokens"] == 6
    r = live_controller.http.post("/clear", json={"instance_id": engine.instance})
    assert r.status_code == 200, r.text
    assert r.json()["num_tokens"] == 6  # only disk was left: each chunk once
    assert engine.lookup(list(range(6))) == 0
