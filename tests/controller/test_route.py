"""POST /route: instances ranked by the prefix each holds, weighted by tier, minus the caller's load."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from .conftest import admit, register

PROMPT = list(range(100, 148))  # 12 chunks of 4


async def route(client, **body):
    r = await client.post("/route", json={"tokens": PROMPT, **body})
    assert r.status_code == 200, r.text
    return r.json()


def by_id(answer):
    return {e["instance_id"]: e for e in answer["instances"]}


async def test_longer_prefix_on_disk_beats_a_shorter_one_in_memory(client):
    await register(client, "a")
    await register(client, "b")
    await admit(client, PROMPT, "a", tier="cpu", chunks=8)
    await admit(client, PROMPT, "b", tier="disk")
    answer = await route(client)
    assert answer["num_tokens"] == 48
    assert [e["instance_id"] for e in answer["instances"]] == ["b", "a"]
    a, b = by_id(answer)["a"], by_id(answer)["b"]
    assert (a["matched_tokens"], a["tiers"]) == (32, {"cpu": 32, "disk": 0})
    assert (b["matched_tokens"], b["tiers"]) == (48, {"cpu": 0, "disk": 48})
    assert a["score"] == pytest.approx(32 / 48) and b["score"] == pytest.approx(0.8)
    # Disk worth less: memory wins.
    answer = await route(client, tier_weights={"disk": 0.5})
    assert [e["instance_id"] for e in answer["instances"]] == ["a", "b"]


async def test_a_prefix_split_over_tiers_counts_each_chunk_at_its_best_tier(client):
    await register(client, "a")
    await admit(client, PROMPT, "a", tier="cpu", chunks=6)
    await admit(client, PROMPT, "a", tier="disk")
    (a,) = (await route(client))["instances"]
    assert a["matched_tokens"] == 48
    assert a["tiers"] == {"cpu": 24, "disk": 48}
    assert a["prefix_score"] == pytest.approx((24 * 1.0 + 24 * 0.8) / 48)


async def test_load_of_candidates_moves_a_request_off_a_busy_instance(client):
    await register(client, "a")
    await register(client, "b")
    await admit(client, PROMPT, "a", tier="cpu")
    await admit(client, PROMPT, "b", tier="cpu", chunks=10)
    idle = await route(client, candidates=["a", "b"])
    assert [e["instance_id"] for e in idle["instances"]] == ["a", "b"]
    busy = await route(client, candidates=[{"instance_id": "a", "load": 0.9}, {"instance_id": "b", "load": 0.1}])
    assert [e["instance_id"] for e in busy["instances"]] == ["b", "a"]
    assert by_id(busy)["a"]["score"] == pytest.approx(1.0 - 0.5 * 0.9)
    # load_weight 0: the prefix alone decides.
    prefix_only = await route(
        client, candidates=[{"instance_id": "a", "load": 0.9}, {"instance_id": "b", "load": 0.1}], load_weight=0
    )
    assert [e["instance_id"] for e in prefix_only["instances"]] == ["a", "b"]


async def test_candidates_limit_the_answer_and_unknown_ones_rank_with_no_prefix(client):
    await register(client, "a")
    await register(client, "b")
    await admit(client, PROMPT, "a", tier="cpu")
    answer = await route(client, candidates=["b", "new-one"])
    entries = by_id(answer)
    assert set(entries) == {"b", "new-one"}
    assert entries["new-one"]["registered"] is False and entries["new-one"]["matched_tokens"] == 0
    assert "registered" not in entries["b"]


async def test_every_rank_must_hold_a_chunk(client):
    await register(client, "tp", worker=0)
    await register(client, "tp", worker=1)
    await admit(client, PROMPT, "tp", worker=0, tier="cpu")
    await admit(client, PROMPT, "tp", worker=1, tier="cpu", chunks=3)
    (tp,) = (await route(client))["instances"]
    assert tp["matched_tokens"] == 12 and tp["tiers"]["cpu"] == 12


async def test_an_unhealthy_instance_ranks_with_no_prefix(client, clock):
    await register(client, "a")
    await register(client, "b")
    await admit(client, PROMPT, "a", tier="cpu")
    await admit(client, PROMPT, "b", tier="cpu", chunks=2)
    clock.now += 60
    beat = {"instance_id": "b", "worker_id": 0, "session": "s-b-0"}
    assert (await client.post("/worker/heartbeat", json=beat)).status_code == 200
    answer = await route(client)
    assert [e["instance_id"] for e in answer["instances"]] == ["b", "a"]
    assert by_id(answer)["a"]["healthy"] is False and by_id(answer)["a"]["matched_tokens"] == 0


async def test_salted_prefixes_need_the_salt(client):
    await register(client, "a")
    await admit(client, PROMPT, "a", tier="cpu", salt=b"tenant-1")
    assert (await route(client))["instances"][0]["matched_tokens"] == 0
    assert (await route(client, salt="tenant-1"))["instances"][0]["matched_tokens"] == 48


async def test_tokens_as_base64_int32_give_the_same_answer(client):
    await register(client, "a")
    await admit(client, PROMPT, "a", tier="cpu", chunks=5)
    packed = base64.b64encode(np.asarray(PROMPT, dtype="<i4").tobytes()).decode()
    r = await client.post("/route", json={"tokens_b64": packed})
    assert r.status_code == 200, r.text
    assert r.json() == await route(client)
    assert r.json()["instances"][0]["matched_tokens"] == 20


@pytest.mark.parametrize(
    "body, reason",
    [
        ({"tokens_b64": "AAAA", "tokens": [1]}, "not both or neither"),
        ({}, "not both or neither"),
        ({"tokens_b64": "not base64!"}, "not base64"),
        ({"tokens_b64": base64.b64encode(b"12345").decode()}, "not a whole number of int32"),
        ({"tokens_b64": base64.b64encode(np.asarray([1, -5], "<i4").tobytes()).decode()}, "token 1 is negative"),
    ],
)
async def test_bad_token_encodings_get_a_400(client, body, reason):
    r = await client.post("/route", json=body)
    assert r.status_code == 400 and reason in r.json()["error"], r.text


@pytest.mark.parametrize(
    "body, field",
    [
        ({"candidates": [3]}, "candidates[0]"),
        ({"candidates": [{"instance_id": "a", "load": "high"}]}, "candidates[0].load"),
        ({"candidates": [{"instance_id": "a", "weight": 1}]}, "candidates[0].weight"),
        ({"candidates": [{"instance_id": "a", "load": -1}]}, "candidates[0].load"),
        ({"tier_weights": {"cpu": -1}}, "tier_weights.cpu"),
        ({"load_weight": "x"}, "load_weight"),
        ({"candidate": ["a"]}, "candidate"),
    ],
)
async def test_bad_bodies_get_a_400_naming_the_field(client, body, field):
    r = await client.post("/route", json={"tokens": PROMPT, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith(field), r.json()


async def test_route_is_in_the_openapi_document(client):
    spec = (await client.get("/openapi.json")).json()
    assert "/route" in spec["paths"] and "tokens_b64" in str(spec["paths"]["/route"])


async def test_route_needs_the_admin_token(make_client):
    client = await make_client(admin_token="secret")
    r = await client.post("/route", json={"tokens": PROMPT})
    assert r.status_code == 401
    r = await client.post("/route", json={"tokens": PROMPT}, headers={"Authorization": "Bearer secret"})
    assert r.status_code == 200 and r.json()["instances"] == []
    await client.aclose()
