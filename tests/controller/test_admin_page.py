"""The admin page rendered in process: what it shows, and that the fleet is behind the admin token.

tests/integration/test_admin_browser.py clicks through it in a real Chromium.
"""

from __future__ import annotations

from .conftest import admit, register

PROMPT = list(range(10, 30))


async def test_without_a_token_the_page_shows_the_fleet(client):
    await register(client, "inst-1")
    await admit(client, PROMPT, "inst-1", tier="cpu")
    beat = {
        "instance_id": "inst-1",
        "worker_id": 0,
        "session": "s-inst-1-0",
        "stats": {"cpu": {"backend": "cpu", "objects": 5, "bytes": 3 << 20, "hits": 3, "misses": 1, "pins": 0}},
    }
    assert (await client.post("/worker/heartbeat", json=beat)).status_code == 200
    await client.post("/lookup", json={"tokens": PROMPT})
    r = await client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert 'data-instance="inst-1"' in page
    assert "3.0 MiB" in page and "75%" in page  # bytes and hit rate from the heartbeat
    assert '<td class="indexed" data-tier="cpu">5</td>' in page  # chunks in the index
    assert "lookup" in page and "finished" in page  # the recent event
    assert 'data-action="clear"' in page


async def test_with_a_token_the_frame_is_public_and_the_fleet_is_not(make_client):
    client = await make_client(admin_token="s3cret")
    await register(client, "inst-secret")
    r = await client.get("/")
    assert r.status_code == 200
    assert "inst-secret" not in r.text and "Enter the admin token" in r.text
    assert "s3cret" not in r.text
    r = await client.get("/admin/panel")
    assert r.status_code == 401
    r = await client.get("/admin/panel", headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200 and "inst-secret" in r.text
    r = await client.get("/", headers={"Authorization": "Bearer s3cret"})
    assert "inst-secret" in r.text
    await client.aclose()


async def test_names_are_escaped(client):
    await register(client, "<script>alert(1)</script>")
    page = (await client.get("/admin/panel")).text
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;" in page
