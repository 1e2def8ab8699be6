"""An in-process controller app and helpers that speak the worker protocol to it."""

from __future__ import annotations

import httpx
import pytest
from kvstacks.keys import chunk_hashes
from kvstacks.testing import wait_for
from kvstacks_controller.app import create_app
from kvstacks_controller.cluster import Cluster
from kvstacks_controller.registry import WorkerRegistry
from kvstacks_controller.settings import Settings


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_client(clock):
    clients = []

    async def make(**settings) -> httpx.AsyncClient:
        s = Settings(**settings)
        cluster = Cluster(s, WorkerRegistry(s.heartbeat_timeout, clock=clock))
        app = create_app(cluster=cluster)
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://controller")
        client.cluster = cluster
        clients.append(client)
        return client

    yield make


@pytest.fixture
async def client(make_client) -> httpx.AsyncClient:
    c = await make_client()
    yield c
    await c.aclose()


async def register(
    client, instance="inst-1", worker=0, tiers=("cpu", "disk"), chunk_size=4, session=None, headers=None
):
    body = {
        "instance_id": instance,
        "worker_id": worker,
        "session": session or f"s-{instance}-{worker}",
        "address": "127.0.0.1:9",
        "chunk_size": chunk_size,
        "tiers": list(tiers),
        "transfer": {"tcp": "127.0.0.1:10"},
    }
    r = await client.post("/worker/register", json=body, headers=headers or {})
    assert r.status_code == 200, r.text
    return body


async def admit(
    client, tokens, instance="inst-1", worker=0, tier="cpu", chunk_size=4, kind="admit", salt=b"", chunks=None
):
    hashes = chunk_hashes(tokens, chunk_size, salt)
    if chunks is not None:
        hashes = hashes[:chunks]
    r = await client.post(
        f"/worker/{kind}",
        json={
            "instance_id": instance,
            "worker_id": worker,
            "session": f"s-{instance}-{worker}",
            "tier": tier,
            "hashes": b"".join(hashes).hex(),
        },
    )
    assert r.status_code == 200, r.text
    return r.json()


class LiveController:
    """The real app served by uvicorn on a free loopback port, in a thread of this process."""

    def __init__(self, **settings) -> None:
        import threading

        import uvicorn
        from kvstacks.testing import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cluster = Cluster(Settings(port=self.port, **settings))
        config = uvicorn.Config(
            create_app(cluster=self.cluster), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="live-controller", daemon=True)
        self.thread.start()
        self.http = httpx.Client(base_url=self.url, timeout=10, trust_env=False)
        self.wait(lambda: self.server.started, "the controller to start", timeout=30)

    def lookup(self, tokens: list[int]) -> dict:
        r = self.http.post("/lookup", json={"tokens": tokens})
        assert r.status_code == 200, r.text
        return r.json()["layout_info"]

    @staticmethod
    def wait(predicate, what: str, timeout: float = 10.0):
        return wait_for(predicate, what, timeout, interval=0.02)

    def close(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def live_controller():
    """One controller for a module's tests; each test registers its own instance ids."""
    controller = LiveController()
    yield controller
    controller.close()
