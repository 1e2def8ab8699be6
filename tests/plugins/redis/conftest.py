from __future__ import annotations

import pytest

from redis_servers import RedisCluster, RedisServer, RedisWithSentinel


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One standalone server for the tests that do not stop it (they use unique keys)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path):
    """A server this test alone uses, and may kill, pause or restart."""
    servers: list[RedisServer] = []

    def make(*extra: str) -> RedisServer:
        server = RedisServer(tmp_path / f"r{len(servers)}", *extra)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    cluster = RedisCluster(tmp_path_factory.mktemp("cluster")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory):
    setup = RedisWithSentinel(tmp_path_factory.mktemp("sentinel")).start()
    yield setup
    setup.stop()
