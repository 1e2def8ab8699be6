"""Controller replicas sharing the index and registry in a real redis-server (``--index redis://...``)."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import numpy as np
import pytest
from kvstacks.keys import chunk_hashes
from kvstacks.testing import require
from kvstacks_controller.app import create_app
from kvstacks_controller.cluster import Cluster
from kvstacks_controller.index import ChunkIndex
from kvstacks_controller.settings import Settings

from .conftest import admit, register

PROMPT = list(range(500, 548))  # 12 chunks of 4


@pytest.fixture
def index_url(redis_server):
    require("redis", "pip install 'kvstacks-controller[redis]'")
    return f"{redis_server.url}?prefix=t-{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def replica(index_url):
    clients = []

    def make(**settings) -> httpx.AsyncClient:
        # registry_ttl 0: every request reads the worker set from Redis (see the test of the default below)
        cluster = Cluster(Settings(index=index_url, **{"registry_ttl": 0, **settings}))
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(cluster=cluster)), base_url="http://c")
        client.cluster = cluster
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.cluster.index.store.close()


async def layout(client, tokens=PROMPT):
    r = await client.post("/lookup", json={"tokens": tokens})
    assert r.status_code == 200, r.text
    return r.json()["layout_info"]


async def ranking(client, tokens=PROMPT):
    r = await client.post("/route", json={"tokens": tokens})
    assert r.status_code == 200, r.text
    return [(e["instance_id"], e["matched_tokens"], e["tiers"]) for e in r.json()["instances"]]


async def test_workers_report_to_any_replica_and_every_replica_answers_the_same(replica):
    a, b = replica(), replica()
    await register(a, "inst-1")
    await register(b, "inst-2")
    await admit(a, PROMPT, "inst-1", tier="cpu")
    await admit(b, PROMPT, "inst-2", tier="disk", chunks=5)
    # inst-1 registered at a but reports to b: b knows its session from Redis.
    await admit(b, PROMPT, "inst-1", tier="disk", chunks=2)
    expected = {"inst-1": ["cpu", 48], "inst-2": ["disk", 20]}
    assert await layout(a) == await layout(b) == expected
    assert await ranking(a) == await ranking(b)
    assert (await ranking(a))[0] == ("inst-1", 48, {"cpu": 48, "disk": 8})
    # An eviction through one replica is seen by the other's next lookup.
    await admit(a, PROMPT, "inst-2", tier="disk", kind="evict")
    assert await layout(b) == {"inst-1": ["cpu", 48]}
    health_a = (await a.get("/health")).json()
    health_b = (await b.get("/health")).json()
    assert health_a["healthy_workers"] == health_b["healthy_workers"] == 2


async def test_a_replica_sees_a_worker_registered_elsewhere_within_registry_ttl(replica):
    cached = replica(registry_ttl=0.2)
    assert await layout(cached) == {}  # its view of the workers is taken now
    other = replica()
    await register(other, "inst-1")
    await admit(other, PROMPT, "inst-1", tier="cpu")
    assert await layout(other) == {"inst-1": ["cpu", 48]}
    await asyncio.sleep(0.25)
    assert await layout(cached) == {"inst-1": ["cpu", 48]}


async def test_a_new_replica_starts_with_everything(replica):
    first = replica()
    await register(first, "inst-1")
    await admit(first, PROMPT, "inst-1", tier="cpu", chunks=7)
    before = await layout(first)
    restarted = replica()  # a replica killed and started again shares nothing with the old process
    assert await layout(restarted) == before == {"inst-1": ["cpu", 28]}
    beat = {"instance_id": "inst-1", "worker_id": 0, "session": "s-inst-1-0", "stats": {"cpu": {"objects": 7}}}
    r = await restarted.post("/worker/heartbeat", json=beat)
    assert r.status_code == 200, r.text  # the worker's session is known: no re-registration


async def test_re_registration_through_another_replica_drops_the_old_session(replica):
    a, b = replica(), replica()
    await register(a, "inst-1")
    await admit(a, PROMPT, "inst-1", tier="cpu")
    await register(b, "inst-1", session="s-new")
    assert await layout(a) == {}  # the new session starts from nothing
    stale = {"instance_id": "inst-1", "worker_id": 0, "session": "s-inst-1-0"}
    r = await a.post("/worker/heartbeat", json=stale)
    assert r.status_code == 409 and r.json()["reregister"] is True


async def test_deregistration_through_one_replica_is_seen_by_the_other(replica):
    a, b = replica(), replica()
    await register(a, "inst-1")
    await admit(a, PROMPT, "inst-1", tier="cpu")
    assert await layout(b) == {"inst-1": ["cpu", 48]}
    body = {"instance_id": "inst-1", "worker_id": 0, "session": "s-inst-1-0"}
    assert (await b.post("/worker/deregister", json=body)).status_code == 200
    assert await layout(a) == {}
    assert (await a.get("/health")).json()["num_workers"] == 0


def test_the_redis_index_answers_as_the_in_memory_one(index_url):
    """The same random reports into both indexes give the same counts and presence."""
    from kvstacks_controller.replicas import RedisChunkIndex, RedisStore

    store = RedisStore(index_url)
    shared, local = RedisChunkIndex(store), ChunkIndex()
    rng = np.random.default_rng(7)
    pool = [rng.bytes(16) for _ in range(300)]
    holders = [(f"i{i}", w, t) for i in range(5) for w in range(2) for t in ("cpu", "disk")]
    ids = {h: (shared.holder(*h), local.holder(*h)) for h in holders}
    assert [s for s, _ in ids.values()] == [m for _, m in ids.values()]  # ids allocated the same way
    for step in range(200):
        h = holders[rng.integers(len(holders))]
        batch = [pool[i] for i in rng.integers(0, len(pool), rng.integers(1, 40))]
        if step % 3:
            assert shared.admit(ids[h][0], batch) == local.admit(ids[h][1], batch)
        else:
            assert shared.evict(ids[h][0], batch) == local.evict(ids[h][1], batch)
        if step % 50 == 49:
            victim = holders[rng.integers(len(holders))]
            assert shared.clear_holder(ids[victim][0]) == local.clear_holder(ids[victim][1])
    assert len(shared) == len(local)
    for s, m in ids.values():
        assert shared.count(s) == local.count(m)
        assert shared.digest(s) == local.digest(m)
    assert np.array_equal(shared.presence(pool), local.presence(pool))
    groups = [[ids[h][0] for h in holders[:4]], [ids[holders[5]][0]]]
    chain = chunk_hashes(PROMPT, 4)
    assert np.array_equal(shared.prefix_lengths(chain, groups), local.prefix_lengths(chain, groups))
    freed = ids[holders[0]][0]
    shared.release_holder(freed)
    assert shared.holder("new", 0, "cpu") == freed  # a freed id is reused
    assert shared.holder_of(freed).instance_id == "new"
    store.close()


async def test_a_dead_redis_gets_a_503_that_says_what_to_do(own_redis):
    require("redis", "pip install 'kvstacks-controller[redis]'")
    server = own_redis()
    cluster = Cluster(Settings(index=server.url))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(cluster=cluster)), base_url="http://c")
    await register(client, "inst-1")
    server.stop()
    r = await client.post("/lookup", json={"tokens": PROMPT})
    assert r.status_code == 503, r.text
    assert "unreachable" in r.json()["error"] and "redis-server" in r.json()["error"]
    r = await client.post(
        "/worker/admit",
        json={"instance_id": "inst-1", "worker_id": 0, "session": "s-inst-1-0", "tier": "cpu", "hashes": "00" * 16},
    )
    assert r.status_code == 503
    await client.aclose()
    cluster.index.store.close()


def test_a_bad_index_url_is_refused_at_start():
    with pytest.raises(ValueError, match="expected 'memory' or redis://"):
        Settings(index="http://nope").check_index()
