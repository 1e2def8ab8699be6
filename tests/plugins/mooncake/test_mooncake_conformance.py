"""The core's conformance kits against a real mooncake_master: the backend alone, and as a tier."""

from __future__ import annotations

import uuid

import pytest
import pytest_asyncio
from kvstacks.testing import BackendConformance, TierConformance
from kvstacks_mooncake import MooncakeBackend

#: one client for every test here: same settings, so each tier takes the one the last left
SMALL = {"segment_bytes": 256 << 20, "local_buffer_bytes": 16 << 20, "read_buffer_bytes": 128 << 20, "timeout": 10.0}


def make(master: str, **options) -> MooncakeBackend:
    options = {"prefix": f"kit-{uuid.uuid4().hex[:8]}:", **SMALL, **options}
    return MooncakeBackend(MooncakeBackend.Options(master=master, **options))


async def flip_payload_byte(backend: MooncakeBackend, key) -> None:
    """Damage a stored frame the way bit rot would: the magic stays, the checksum fails."""
    name = backend._name(key)
    store = backend.store
    raw = bytearray(store.get(name))
    raw[len(raw) // 2] ^= 0xFF
    assert store.upsert(name, bytes(raw)) == 0


class TestMooncakeBackend(BackendConformance):
    @pytest_asyncio.fixture
    async def backend(self, mooncake_master):
        backend = make(mooncake_master.address)
        await backend.start()
        assert backend.store is not None, "the backend did not connect to the test's master"
        return backend

    corrupt = staticmethod(flip_payload_byte)
    frames = True


class TestMooncakeTier(TierConformance):
    # A closed engine's client (and the segment holding its chunks) is kept for the next tier
    # of the process: a new engine finds them. Chunks outlive the process only in other
    # processes' segments (test_mooncake_shared.py).
    persistent = True

    @pytest.fixture
    def tier(self, mooncake_master):
        return {"backend": "mooncake", "master": mooncake_master.address, "prefix": f"tier-{uuid.uuid4().hex[:8]}:",
                "segment_bytes": "256MiB", "local_buffer_bytes": "16MiB", "read_buffer_bytes": "64MiB"}


async def test_batches_in_parts_round_trip(mooncake_master):
    """pipeline_parts > 1: checksums and verification overlap transfers, and nothing gets mixed up."""
    from kvstacks.testing import assert_same_obj, random_key, random_kv, raw_obj

    backend = make(mooncake_master.address, pipeline_parts=3)
    await backend.start()
    try:
        keys = [random_key() for _ in range(7)]
        objs = [raw_obj(k, random_kv(2, 8 + i, 64, seed=900 + i)) for i, k in enumerate(keys)]
        await backend.batch_put(list(zip(keys, objs)))
        got = await backend.batch_get([keys[3], random_key(), *keys])
        assert got[1] is None
        for obj, back in zip([objs[3], *objs], [got[0], *got[2:]]):
            assert_same_obj(back, obj, "batch in parts")
            backend.release_now(back)
    finally:
        await backend.close()
