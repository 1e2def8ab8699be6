"""Redis cluster and sentinel fixtures for the redis tier's tests (the servers: kvstacks.testing.redis_servers)."""

from __future__ import annotations

import pytest
from kvstacks.testing.redis_servers import RedisCluster, RedisWithSentinel

# redis_server and own_redis are in tests/conftest.py: the controller's tests use them too.


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


@pytest.fixture
def own_cluster(tmp_path):
    """A cluster this test alone uses, and may break."""
    cluster = RedisCluster(tmp_path / "cluster").start()
    yield cluster
    cluster.stop()


@pytest.fixture
def sentinel_with_replica(tmp_path):
    """Master, replica and a sentinel that fails over one second after the master stops answering."""
    setup = RedisWithSentinel(tmp_path / "sentinel", replica=True, down_after_ms=1000).start()
    yield setup
    setup.stop()
