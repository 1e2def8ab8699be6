"""The controller app in process: lookups, health, auth, caps, reasons, third-party commands."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from kvstacks import hookimpl
from kvstacks.plugins import pm
from kvstacks_controller import Command, CommandError
from kvstacks_controller.settings import Settings

from .conftest import admit, register

SEED_TOKENS = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]


async def test_lookup_reports_the_longest_prefix_per_instance(client):
    await register(client, "lmcache_instance_1")
    await register(client, "lmcache_instance_2")
    await admit(client, SEED_TOKENS, "lmcache_instance_1")  # all 3 chunks in cpu
    await admit(client, SEED_TOKENS, "lmcache_instance_2", tier="disk", chunks=2)
    r = await client.post("/lookup", json={"tokens": SEED_TOKENS})
    assert r.status_code == 200
    body = r.json()
    assert body["event_id"].startswith("evt_")
    assert body["layout_info"] == {"lmcache_instance_1": ["cpu", 12], "lmcache_instance_2": ["disk", 8]}
    r = await client.post("/check_finish", json={"event_id": body["event_id"]})
    assert r.json()["status"] == "finished"


async def test_lookup_unions_tiers_and_takes_the_shortest_rank(client):
    tokens = list(range(20))  # 5 chunks of 4
    await register(client, "tp", worker=0)
    await register(client, "tp", worker=1)
    await admit(client, tokens, "tp", 0, "cpu", chunks=2)
    hashes_tail = tokens  # chunks 2..4 live on disk for rank 0
    from kvstacks.keys import chunk_hashes

    tail = b"".join(chunk_hashes(hashes_tail, 4)[2:]).hex()
    r = await client.post(
        "/worker/admit",
        json={"instance_id": "tp", "worker_id": 0, "session": "s-tp-0", "tier": "disk", "hashes": tail},
    )
    assert r.status_code == 200
    await admit(client, tokens, "tp", 1, "cpu", chunks=4)
    r = await client.post("/lookup", json={"tokens": tokens})
    # rank 0 has 5 chunks over cpu+disk, rank 1 has 4: the instance can serve 16 tokens.
    assert r.json()["layout_info"] == {"tp": ["cpu", 16]}


async def test_lookup_with_a_salt_and_batch_form(client):
    await register(client)
    await admit(client, SEED_TOKENS, salt=b"tenant-a")
    plain = await client.post("/lookup", json={"tokens": SEED_TOKENS})
    assert plain.json()["layout_info"] == {}
    salted = await client.post("/lookup", json={"tokens": SEED_TOKENS, "salt": "tenant-a"})
    assert salted.json()["layout_info"] == {"inst-1": ["cpu", 12]}
    r = await client.post(
        "/batch_lookup", json={"tokens_list": [SEED_TOKENS, SEED_TOKENS[:6], [1, 2]], "salt": "tenant-a"}
    )
    assert r.status_code == 200
    assert r.json()["results"] == [{"inst-1": ["cpu", 12]}, {"inst-1": ["cpu", 4]}, {}]


async def test_silent_worker_drops_out_of_lookups_and_comes_back(client, clock):
    await register(client)
    await admit(client, SEED_TOKENS)
    clock.now += 11  # past the default 10 s heartbeat timeout
    assert (await client.post("/lookup", json={"tokens": SEED_TOKENS})).json()["layout_info"] == {}
    health = (await client.get("/health")).json()
    assert health["workers"][0]["status"] == "unhealthy"
    r = await client.post("/pin", json={"instance_id": "inst-1", "location": "cpu", "tokens": SEED_TOKENS})
    assert r.status_code == 409 and "no healthy worker" in r.json()["error"]
    r = await client.post(
        "/worker/heartbeat",
        json={
            "instance_id": "inst-1",
            "worker_id": 0,
            "session": "s-inst-1-0",
            "stats": {"cpu": {"pins": 2}},
        },
    )
    assert r.status_code == 200
    assert (await client.post("/lookup", json={"tokens": SEED_TOKENS})).json()["layout_info"] == {
        "inst-1": ["cpu", 12]
    }
    metrics = (await client.get("/metrics")).text
    assert 'kvstacks_worker_healthy{instance_id="inst-1",worker_id="0"} 1.0' in metrics
    assert "kvstacks_controller_pinned_chunks 2.0" in metrics
    assert "kvstacks_controller_chunks_indexed 3.0" in metrics


async def test_post_health_and_query_worker_info(client):
    await register(client, "a", 0)
    await register(client, "a", 1)
    r = await client.post("/health", json={"instance_id": "a"})
    assert r.status_code == 200 and r.json()["error_codes"] == {"0": 0, "1": 0}
    r = await client.post("/query_worker_info", json={"instance_id": "a", "worker_ids": [1]})
    infos = r.json()["worker_infos"]
    assert [w["worker_id"] for w in infos] == [1] and infos[0]["locations"] == ["cpu", "disk"]
    r = await client.post("/query_worker_info", json={"instance_id": "a", "worker_ids": [7]})
    assert r.status_code == 404 and "no worker 7" in r.json()["error"]


async def test_reregistration_forgets_the_old_session(client):
    await register(client, session="one")
    r = await client.post(
        "/worker/admit",
        json={
            "instance_id": "inst-1",
            "worker_id": 0,
            "session": "one",
            "tier": "cpu",
            "hashes": bytes(16).hex(),
        },
    )
    assert r.json()["changed"] == 1
    await register(client, session="two")
    assert len(client.cluster.index) == 0
    r = await client.post(
        "/worker/heartbeat", json={"instance_id": "inst-1", "worker_id": 0, "session": "one"}
    )
    assert r.status_code == 409 and r.json()["reregister"] is True


async def test_digest_names_stale_tiers_and_admit_with_replace_resets_one(client):
    from kvstacks.agent import digest
    from kvstacks.keys import CacheKey, chunk_hashes

    ids = await register(client)
    ids = {k: ids[k] for k in ("instance_id", "worker_id", "session")}
    await admit(client, SEED_TOKENS)  # 3 chunks in cpu
    held = [CacheKey("m", "kv", 1, 0, h) for h in chunk_hashes(SEED_TOKENS, 4, b"")]

    async def check(cpu):
        r = await client.post(
            "/worker/digest",
            json={**ids, "tiers": [{"tier": "cpu", **digest(cpu)}, {"tier": "disk", **digest([])}]},
        )
        assert r.status_code == 200, r.text
        return r.json()["stale"]

    assert await check(held) == []
    assert await check(held[:2]) == ["cpu"]  # the worker holds one chunk fewer than the index says
    r = await client.post("/worker/admit", json={**ids, "tier": "cpu", "replace": True, "hashes": held[0].chunk_hash.hex()})
    assert r.status_code == 200 and client.cluster.resyncs == 1
    assert await check(held[:1]) == []
    assert client.cluster.digests == {"match": 2, "stale": 1}
    r = await client.post("/worker/digest", json={**ids, "tiers": [{"tier": "gpu", **digest([])}]})
    assert r.status_code == 404 and "its tiers: cpu, disk" in r.json()["error"]
    r = await client.post("/worker/evict", json={**ids, "tier": "cpu", "replace": True, "hashes": ""})
    assert r.status_code == 400 and "replace" in r.json()["error"]


async def test_deregister_removes_the_worker_and_its_chunks(client):
    body = await register(client)
    await admit(client, SEED_TOKENS)
    r = await client.post(
        "/worker/deregister", json={k: body[k] for k in ("instance_id", "worker_id", "session")}
    )
    assert r.status_code == 200
    assert len(client.cluster.index) == 0
    assert (await client.get("/health")).json()["workers"] == []


@pytest.mark.parametrize(
    "path,body,status,reason",
    [
        (
            "/clear",
            {"instance_id": "lmcache_instance_1", "location": "LocalCPUBackend"},
            404,
            "unknown instance_id",
        ),
        ("/check_finish", {"event_id": "evt_nope"}, 404, "unknown event_id"),
        ("/pin", {"instance_id": "x", "location": "cpu"}, 400, "tokens: is required"),
        ("/lookup", {"tokens": [1, "2"]}, 400, "tokens[1]: expected an integer"),
        ("/lookup", {"tokens": [1, -2]}, 400, "tokens[1]: -2 is below the minimum"),
        ("/lookup", {"tokens": [2**40]}, 400, "above the maximum"),
        ("/lookup", {"tokens": [1], "extra": 1}, 400, "extra: unknown field"),
        ("/lookup", [1, 2], 400, "body must be a JSON object"),
        (
            "/move",
            {"old_position": ["a"], "new_position": ["b", "cpu"], "tokens": []},
            400,
            "at least 2 items",
        ),
        ("/query_worker_info", {"instance_id": "ghost"}, 404, "unknown instance_id"),
        ("/health", {"instance_id": "ghost"}, 404, "unknown instance_id"),
        ("/worker/heartbeat", {"instance_id": "a", "worker_id": 0, "session": "s"}, 409, "register again"),
    ],
)
async def test_bad_requests_get_4xx_with_a_reason(client, path, body, status, reason):
    r = await client.post(path, json=body)
    assert r.status_code == status, r.text
    assert reason in r.json()["error"]


async def test_malformed_json_and_caps(make_client):
    client = await make_client(max_body_bytes=2048, max_tokens=100)
    r = await client.post(
        "/lookup", content=b'{"tokens": [1, 2', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = await client.post("/lookup", json={"tokens": list(range(101))})
    assert r.status_code == 400 and "limit of 100" in r.json()["error"]
    r = await client.post("/lookup", json={"tokens": list(range(5000))})
    assert r.status_code == 413 and "limit of 2048 bytes" in r.json()["error"]
    r = await client.get("/lookup")
    assert r.status_code == 405


async def test_unknown_location_and_aliases(client):
    await register(client, tiers=("cpu",))
    await admit(client, SEED_TOKENS)
    r = await client.post(
        "/pin", json={"instance_id": "inst-1", "location": "LocalDiskBackend", "tokens": SEED_TOKENS}
    )
    assert r.status_code == 404 and "its locations: cpu" in r.json()["error"]
    r = await client.post(
        "/worker/admit",
        json={"instance_id": "inst-1", "worker_id": 0, "session": "s-inst-1-0", "tier": "disk", "hashes": ""},
    )
    assert r.status_code == 404 and "registered no tier 'disk'" in r.json()["error"]
    r = await client.post(
        "/worker/admit",
        json={
            "instance_id": "inst-1",
            "worker_id": 0,
            "session": "s-inst-1-0",
            "tier": "cpu",
            "hashes": "zz" * 16,
        },
    )
    assert r.status_code == 400 and "hex" in r.json()["error"]


async def test_unreachable_worker_is_a_502_with_the_event_marked_failed(make_client):
    client = await make_client(worker_timeout=1.0)
    await register(client)  # its address 127.0.0.1:9 (discard) has nothing listening
    r = await client.post("/clear", json={"instance_id": "inst-1", "location": "LocalCPUBackend"})
    assert r.status_code in (502, 504), r.text
    event_id = r.json()["event_id"]
    status = (await client.post("/check_finish", json={"event_id": event_id})).json()
    assert status["status"] == "failed" and "inst-1/0" in status["reason"]


async def test_tokens_guard_admin_and_worker_routes(make_client):
    client = await make_client(admin_token="adm", worker_token="wrk")
    admin = {"Authorization": "Bearer adm"}
    worker = {"Authorization": "Bearer wrk"}
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/metrics")).status_code == 200
    for method, path in [
        ("POST", "/lookup"),
        ("GET", "/plugins"),
        ("GET", "/openapi.json"),
        ("POST", "/health"),
    ]:
        r = await client.request(
            method, path, json={"tokens": [1], "instance_id": "x"} if method == "POST" else None
        )
        assert r.status_code == 401, path
        assert "KVSTACKS_ADMIN_TOKEN" in r.json()["error"]
    assert (await client.post("/lookup", json={"tokens": [1]}, headers=admin)).status_code == 200
    assert (
        await client.post("/lookup", json={"tokens": [1]}, headers={"Authorization": "Bearer wrong"})
    ).status_code == 401
    r = await client.post("/worker/register", json={}, headers=admin)  # the admin token is not a worker token
    assert r.status_code == 401 and "KVSTACKS_WORKER_TOKEN" in r.json()["error"]
    await register(client, headers=worker)


def test_non_loopback_bind_needs_tokens():
    with pytest.raises(ValueError, match="KVSTACKS_ADMIN_TOKEN and KVSTACKS_WORKER_TOKEN"):
        Settings(host="0.0.0.0").check_bind()
    with pytest.raises(ValueError, match="KVSTACKS_WORKER_TOKEN"):
        Settings(host="10.1.2.3", admin_token="a").check_bind()
    Settings(host="0.0.0.0", admin_token="a", worker_token="b").check_bind()
    Settings(host="::1").check_bind()
    Settings(host="localhost").check_bind()


def test_cli_refuses_a_public_bind_without_tokens(monkeypatch):
    from kvstacks.cli import cli
    from kvstacks.plugins import load_plugins

    monkeypatch.delenv("KVSTACKS_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("KVSTACKS_WORKER_TOKEN", raising=False)
    load_plugins().hook.register_cli_commands(cli=cli)
    result = CliRunner().invoke(cli, ["controller", "--host", "0.0.0.0", "--port", "9000"])
    assert result.exit_code == 2
    assert "refusing to listen on 0.0.0.0" in result.output


class EchoCount(Command):
    """A third-party command: counts tokens, refuses empty lists."""

    name = "echo_count"
    summary = "Count tokens"
    request_schema = {
        "type": "object",
        "required": ["tokens"],
        "properties": {"tokens": {"$ref": "#/components/schemas/Tokens"}},
    }

    async def run(self, ctx, body):
        if not body["tokens"]:
            raise CommandError(422, "tokens must not be empty")
        return {"count": len(body["tokens"]), "workers": len(ctx.registry.workers)}


class EchoPlugin:
    @hookimpl
    def register_commands(self, register):
        register(EchoCount)


async def test_a_command_from_a_plugin_gets_a_route(make_client):
    plugin = EchoPlugin()
    pm.register(plugin, name="tests-echo-command")
    try:
        client = await make_client()
        r = await client.post("/echo_count", json={"tokens": [1, 2, 3]})
        assert r.status_code == 200 and r.json() == {"count": 3, "workers": 0}
        r = await client.post("/echo_count", json={"tokens": []})
        assert r.status_code == 422 and r.json()["error"] == "tokens must not be empty"
        assert (await client.post("/echo_count", json={"tokens": ["x"]})).status_code == 400
        spec = (await client.get("/openapi.json")).json()
        assert "/echo_count" in spec["paths"]
        plugins = (await client.get("/plugins")).json()["plugins"]
        assert any("echo_count" in p["registers"].get("commands", []) for p in plugins)
    finally:
        pm.unregister(plugin)


async def test_openapi_lists_every_builtin_route(client):
    spec = (await client.get("/openapi.json")).json()
    for path in [
        "/lookup",
        "/batch_lookup",
        "/clear",
        "/pin",
        "/unpin",
        "/compress",
        "/decompress",
        "/move",
        "/health",
        "/check_finish",
        "/query_worker_info",
        "/metrics",
        "/plugins",
        "/openapi.json",
    ]:
        assert path in spec["paths"], path
    assert spec["paths"]["/health"]["get"]["security"] == []
    assert spec["paths"]["/lookup"]["post"]["security"] == [{"admin": []}]
    json.dumps(spec)
