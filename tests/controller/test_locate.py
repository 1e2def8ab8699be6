"""worker/locate: the peers a P2P retrieve may pull a chunk chain from."""

from __future__ import annotations

from kvstacks.keys import chunk_hashes

from .conftest import admit, register

TOKENS = list(range(40))  # 10 chunks of 4


async def locate(client, hashes, instance="me", worker=0):
    ids = {"instance_id": instance, "worker_id": worker, "session": f"s-{instance}-{worker}"}
    return await client.post("/worker/locate", json={**ids, "hashes": b"".join(hashes).hex()})


async def test_peers_longest_first_same_rank_and_chunk_size_never_itself(client, clock):
    await register(client, "me")
    await admit(client, TOKENS, "me")  # its own copy is never offered back
    await register(client, "short")
    await admit(client, TOKENS, "short", chunks=3)
    await register(client, "long")
    await admit(client, TOKENS, "long", tier="disk")
    await register(client, "other-rank", worker=1)
    await admit(client, TOKENS, "other-rank", worker=1)
    await register(client, "other-size", chunk_size=8)
    await admit(client, TOKENS, "other-size", chunk_size=8)
    r = await locate(client, chunk_hashes(TOKENS, 4))
    assert r.status_code == 200, r.text
    peers = r.json()["peers"]
    assert [(p["instance_id"], p["chunks"]) for p in peers] == [("long", 10), ("short", 3)]
    assert peers[0]["address"] == "127.0.0.1:9" and peers[0]["transfer"] == {"tcp": "127.0.0.1:10"}
    # A suffix of the chain counts from its first chunk.
    r = await locate(client, chunk_hashes(TOKENS, 4)[5:])
    assert [(p["instance_id"], p["chunks"]) for p in r.json()["peers"]] == [("long", 5)]


async def test_unhealthy_peers_are_left_out_and_bad_input_is_a_clear_400(client, clock):
    await register(client, "me")
    await register(client, "peer")
    await admit(client, TOKENS, "peer")
    clock.now += 3600  # no heartbeat from anyone since
    r = await locate(client, chunk_hashes(TOKENS, 4))
    assert r.status_code == 200 and r.json()["peers"] == []
    r = await client.post("/worker/locate", json={"instance_id": "me", "worker_id": 0, "session": "s-me-0",
                                                   "hashes": "abc"})
    assert r.status_code == 400 and "multiple of 32 hex digits" in r.json()["error"]
    r = await locate(client, chunk_hashes(TOKENS, 4), instance="stranger")
    assert r.status_code == 409
