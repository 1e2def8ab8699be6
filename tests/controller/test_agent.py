"""The worker agent's config validation and event queue (its network side runs in tests/integration)."""

from __future__ import annotations

import pytest
from kvstacks.agent import Agent, AgentOptions, parse_options
from kvstacks.errors import ConfigError
from kvstacks.keys import CacheKey


@pytest.mark.parametrize(
    "section,path,message",
    [
        ({"instance_id": "a"}, "controller.url", "is required"),
        ({"url": "http://h:1"}, "controller.instance_id", "is required"),
        ({"url": "h:1", "instance_id": "a"}, "controller.url", "expected http://host:port"),
        (
            {"url": "http://h:1", "instance_id": "a", "heartbeat_interval": "fast"},
            "controller.heartbeat_interval",
            "expected a number",
        ),
        (
            {"url": "http://h:1", "instance_id": "a", "heartbeat_interval": 0},
            "controller.heartbeat_interval",
            "positive",
        ),
        ({"url": "http://h:1", "instance_id": "a", "colour": "red"}, "controller.colour", "unknown option"),
        ({"url": "http://h:1", "instance_id": "a", "listen_port": 70000}, "controller.listen_port", "port"),
    ],
)
def test_config_errors_name_the_yaml_path(section, path, message):
    with pytest.raises(ConfigError) as info:
        parse_options(section)
    assert info.value.path == path and message in info.value.message


def test_defaults():
    options = parse_options({"url": "http://127.0.0.1:9000", "instance_id": "i"})
    assert options.listen_host == "127.0.0.1" and options.worker_id is None


class _Config:
    rank = 3
    chunk_size = 4


class _Engine:
    config = _Config()


def _keys(n: int) -> list[CacheKey]:
    return [CacheKey("m", "kv", 1, 0, i.to_bytes(16, "little")) for i in range(n)]


def test_reports_queue_without_blocking_and_overflow_forces_a_resync():
    agent = Agent(
        _Engine(), AgentOptions(url="http://127.0.0.1:1", instance_id="i", max_pending=10), token="t"
    )
    assert agent.worker_id == 3
    agent.registered = True
    agent.report("admit", "cpu", _keys(4))
    agent.report("evict", "cpu", _keys(2))
    assert [kind for kind, _, _ in agent._take()] == ["admit", "evict"]
    assert agent.registered
    agent.report("admit", "cpu", _keys(6))
    agent.report("admit", "cpu", _keys(6))  # beyond max_pending: dropped, resync instead
    agent.report("admit", "cpu", _keys(1))
    assert agent._take() == []
    assert not agent.registered  # the reporter registers again and re-reports engine.keys()


def _stack(controller: dict) -> dict:
    return {"chunk_size": 4, "stack": [{"backend": "cpu", "capacity": "1MiB"}], "controller": controller}


def test_a_bad_controller_section_fails_the_engine_with_its_path():
    from kvstacks import CacheEngine
    from kvstacks.testing import require

    require("kvstacks_cpu", "pip install -e plugins/cpu")
    with pytest.raises(ConfigError, match=r"controller\.url: expected http://host:port"):
        CacheEngine.from_config(_stack({"url": "nope", "instance_id": "i"}))


@pytest.mark.timeout(60)  # a hang here is the failure
def test_an_unreachable_controller_never_blocks_the_engine():
    import torch
    from kvstacks import CacheEngine
    from kvstacks.testing import free_port, require

    require("kvstacks_cpu", "pip install -e plugins/cpu")
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    engine = CacheEngine.from_config(_stack({"url": url, "instance_id": "i", "heartbeat_interval": 0.1}))
    try:
        tokens = list(range(40))
        engine.store(tokens, torch.zeros(2, 1, 40, 4, dtype=torch.float16))
        assert engine.lookup(tokens) == 40
        assert not engine.agent.registered
    finally:
        engine.close()


def test_a_controller_without_digest_checks_is_tolerated():
    from kvstacks.agent import ControllerRefused

    class Engine(_Engine):
        def keys(self, tier=None):
            return {"cpu": _keys(3)}

    agent = Agent(Engine(), AgentOptions(url="http://127.0.0.1:1", instance_id="i"), token="t")
    agent.registered = True

    def older_controller(path, body, timeout=None):
        raise ControllerRefused(404, {})  # Starlette's plain 404: no such route

    agent._post = older_controller
    agent._check_index()  # no exception: the reporter keeps going, registered
    assert agent.registered and agent._next_check == float("inf") and agent.digest_checks == 0


def test_listening_beyond_loopback_without_a_worker_token_is_refused(monkeypatch):
    # Fails before the fix: the agent's command server and transfer receiver opened on any
    # address with no token, so anyone who reached them could send chunks and commands.
    from kvstacks import CacheEngine
    from kvstacks.testing import require

    require("kvstacks_cpu", "pip install -e plugins/cpu")
    monkeypatch.delenv("KVSTACKS_WORKER_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"controller\.listen_host: .*KVSTACKS_WORKER_TOKEN"):
        CacheEngine.from_config(_stack({"url": "http://127.0.0.1:1", "instance_id": "i", "listen_host": "0.0.0.0"}))


def test_a_burst_of_interleaved_events_costs_two_reports_per_tier_with_each_chunks_last_state():
    agent = Agent(_Engine(), AgentOptions(url="http://127.0.0.1:1", instance_id="i"), token="t")
    sent = []
    agent._post = lambda path, body, timeout=None: sent.append((path, body["tier"], body["hashes"]))
    k = _keys(6)
    agent._flush([
        ("admit", "cpu", k[:4]),
        ("evict", "cpu", k[:2]),
        ("admit", "disk", k[:2]),
        ("admit", "cpu", k[1:2]),  # evicted then admitted again: admitted
        ("evict", "cpu", k[4:6]),  # never admitted in this burst: still reported (the index may have it)
    ])
    hexes = lambda keys: b"".join(key.chunk_hash for key in keys).hex()  # noqa: E731
    assert sorted(sent) == sorted([
        ("/worker/evict", "cpu", hexes([k[0], k[4], k[5]])),
        ("/worker/admit", "cpu", hexes([k[1], k[2], k[3]])),
        ("/worker/admit", "disk", hexes(k[:2])),
    ])
