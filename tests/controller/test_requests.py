"""Request checks common to every route: JSON errors, JSON-only mutations, worker addresses, disconnects."""

from __future__ import annotations

import json
import logging

import pytest
from kvstacks_controller.schema import parse_body
from kvstacks_controller.settings import Settings

from .conftest import register


async def test_unknown_routes_and_wrong_methods_answer_json(client):
    r = await client.get("/no/such/route")
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/json"
    assert "no route /no/such/route; GET /openapi.json lists every route" in r.json()["error"]
    r = await client.get("/lookup")
    assert r.status_code == 405
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"] == "GET is not allowed on /lookup; allowed: POST"
    assert r.headers["allow"] == "POST"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
async def test_mutating_routes_accept_only_json(client, content_type):
    headers = {"content-type": content_type} if content_type else {}
    body = json.dumps({"instance_id": "inst-1"}).encode()
    r = await client.post("/clear", content=body, headers=headers)
    assert r.status_code == 415, r.text
    assert "accepts only 'Content-Type: application/json'" in r.json()["error"]
    # A read-only route stays usable by any client.
    r = await client.post("/lookup", content=b'{"tokens": [1, 2]}', headers=headers)
    assert r.status_code == 200, r.text


async def test_json_with_a_charset_is_json(client):
    r = await client.post("/clear", content=b'{"instance_id": "ghost"}',
                          headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 404 and "unknown instance_id" in r.json()["error"]


@pytest.mark.parametrize("address, allowed", [
    ("169.254.169.254:80", False), ("10.0.0.5:8000", False), ("metadata.internal:80", False),
    ("127.0.0.1:9", True), ("localhost:9", True), ("[::1]:9", True),
])
async def test_worker_addresses_are_loopback_unless_allowed(make_client, address, allowed):
    client = await make_client()
    body = {"instance_id": "i", "worker_id": 0, "session": "s", "address": address, "chunk_size": 4, "tiers": ["cpu"]}
    r = await client.post("/worker/register", json=body)
    assert r.status_code == (200 if allowed else 403), r.text
    if not allowed:
        assert "--worker-networks" in r.json()["error"]
    transfer = {**body, "address": "127.0.0.1:9", "transfer": {"tcp": address}}
    r = await client.post("/worker/register", json=transfer)
    assert r.status_code == (200 if allowed else 403), r.text


async def test_an_allow_list_admits_other_networks(make_client):
    client = await make_client(worker_networks=("10.0.0.0/8",))
    body = {"instance_id": "i", "worker_id": 0, "session": "s", "address": "10.1.2.3:8000", "chunk_size": 4,
            "tiers": ["cpu"]}
    assert (await client.post("/worker/register", json=body)).status_code == 200
    body["address"] = "169.254.169.254:80"
    assert (await client.post("/worker/register", json=body)).status_code == 403
    Settings(worker_networks=("any",)).check_worker_address("metadata.internal")


def test_worker_networks_flag_is_checked():
    from click.testing import CliRunner
    from kvstacks_controller.server import controller_command

    result = CliRunner().invoke(controller_command, ["--worker-networks", "10.0.0.0/33"])
    assert result.exit_code == 2 and "'10.0.0.0/33' is not a network" in result.output


async def test_a_client_gone_mid_upload_is_not_a_server_error(client, caplog):
    app = client._transport.app
    messages = [{"type": "http.request", "body": b'{"tokens": [1,', "more_body": True}, {"type": "http.disconnect"}]
    sent = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/lookup", "raw_path": b"/lookup", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
             "server": ("controller", 80), "app": app}
    with caplog.at_level(logging.INFO, logger="kvstacks.controller"):
        await app(scope, receive, send)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    metrics = (await client.get("/metrics")).text
    assert 'endpoint="lookup"' in metrics
    assert 'code="500"' not in metrics
    assert 'kvstacks_controller_requests_total{code="499",endpoint="lookup"} 1.0' in metrics


async def test_pin_ttl_zero_is_refused_by_the_schema(client):
    await register(client)
    r = await client.post("/pin", json={"instance_id": "inst-1", "location": "cpu", "tokens": [1, 2, 3, 4], "ttl": 0})
    assert r.status_code == 400
    assert r.json()["error"] == "ttl: 0 must be greater than 0"


def test_fast_token_path_refuses_what_json_refuses():
    tokens = ", ".join(["1234"] * 2000)
    with pytest.raises(ValueError):
        parse_body(f'{{"tokens": [007, {tokens}]}}'.encode(), json.loads)
    with pytest.raises(ValueError):
        parse_body(f'{{"tokens": [{tokens}, 00]}}'.encode(), json.loads)
    with pytest.raises(ValueError):
        parse_body(f'{{"tokens": [{tokens}, 10, 0100, 7]}}'.encode(), json.loads)
    body = parse_body(f'{{"tokens": [0, 10, {tokens}, 100, 2147483647]}}'.encode(), json.loads)
    assert body["tokens"][:3] == [0, 10, 1234] and body["tokens"][-2:] == [100, 2147483647]
    assert body["tokens"].parsed is not None  # the fast path took it


def test_lmcache_monitor_ports_flag_says_what_to_do():
    from click.testing import CliRunner
    from kvstacks_controller.server import controller_command

    for flag in ("--monitor-ports", "--monitor-port"):
        result = CliRunner().invoke(controller_command, [flag, '{"pull": 8300, "reply": 8400}'])
        assert result.exit_code == 2
        assert "kvstacks workers speak HTTP to the API port (--port)" in result.output
