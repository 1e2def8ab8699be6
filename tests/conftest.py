"""Fixtures shared across test packages: the real SmolLM2 model and a real redis-server, once per session."""

from __future__ import annotations

import pytest
from kvstacks.testing import in_ci, require
from kvstacks.testing.redis_servers import RedisServer


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, loaded once (about 20 s)."""
    require("gguf", "pip install gguf")
    require("accelerate", "pip install accelerate")
    from kvstacks_transformers.smollm2 import ModelUnavailable, load_smollm2

    try:
        return load_smollm2(progress=False)
    except ModelUnavailable as exc:
        if in_ci():
            pytest.fail(f"{exc} (CI=true: every dependency must be installed in CI)", pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """One standalone server for the tests that do not stop it (they use unique keys)."""
    workdir = tmp_path_factory.mktemp("redis")
    server = RedisServer(workdir, "--unixsocket", str(workdir / "redis.sock"), "--unixsocketperm", "700").start()
    server.socket = workdir / "redis.sock"
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path):
    """A server this test alone uses, and may kill, pause or restart."""
    servers: list[RedisServer] = []

    def make(*extra: str, port: int | None = None) -> RedisServer:
        server = RedisServer(tmp_path / f"r{len(servers)}", *extra, port=port)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()
