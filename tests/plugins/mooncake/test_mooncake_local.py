"""Replicas in this process's own segment are copied and checked block by block (kvstacks_mooncake.local)."""

from __future__ import annotations

import ctypes
import uuid

from kvstacks.testing import assert_same_obj, random_key, random_kv, raw_obj
from kvstacks_mooncake import MooncakeBackend
from kvstacks_mooncake.local import BLOCK


class CountingStore:
    """The client, with its batch_get_into calls counted (the path local reads avoid)."""

    def __init__(self, store) -> None:
        self._store = store
        self.client_gets = 0

    def batch_get_into(self, *args):
        self.client_gets += 1
        return self._store.batch_get_into(*args)

    def __getattr__(self, name):
        return getattr(self._store, name)


def make(master: str) -> MooncakeBackend:
    return MooncakeBackend(MooncakeBackend.Options(
        master=master, prefix=f"local-{uuid.uuid4().hex[:8]}:", segment_bytes=64 << 20,
        local_buffer_bytes=16 << 20, read_buffer_bytes=32 << 20, timeout=10.0))


async def test_own_segment_is_found_and_read_without_the_client(mooncake_master):
    backend = make(mooncake_master.address)
    await backend.start()
    try:
        assert backend.local is not None, "the probe did not find this process's segment"
        store = backend.store = CountingStore(backend.store)
        # larger than a block and not a multiple of one: the last block is short
        keys = [random_key() for _ in range(3)]
        objs = [raw_obj(k, random_kv(2, 300 + i, 256, seed=40 + i)) for i, k in enumerate(keys)]
        assert objs[0].nbytes > BLOCK
        await backend.batch_put(list(zip(keys, objs)))
        got = await backend.batch_get([*keys, random_key()])
        assert got[3] is None
        for obj, back in zip(objs, got):
            assert_same_obj(back, obj, "local read")
            backend.release_now(back)
        assert store.client_gets == 1  # only for the missing key
    finally:
        await backend.close()


async def test_a_chunk_torn_in_the_middle_is_a_miss_through_the_local_path(mooncake_master):
    """Bytes changed in the replica itself (as a forced remove and another put would): the
    block-by-block check sees them, the chunk is a miss, counted corrupt and removed."""
    backend = make(mooncake_master.address)
    await backend.start()
    try:
        assert backend.local is not None
        key = random_key()
        obj = raw_obj(key, random_kv(2, 600, 256, seed=7))
        await backend.put(key, obj)
        name = backend._name(key)
        (replica,) = backend.store.get_replica_desc(name)
        desc = replica.get_memory_descriptor().buffer_descriptor
        assert backend.local.address([replica]) is not None
        # a tear inside one block in the middle of the frame, not on a block boundary
        ctypes.memset(desc.buffer_address + desc.size // 2 + 123, 0x5A, 4096)
        backend.store = CountingStore(backend.store)
        assert await backend.get(key) is None
        assert backend.store.client_gets == 0  # the local path read it
        assert backend.stats()["corrupt"] == 1
        assert not await backend.contains(key)  # removed
    finally:
        await backend.close()
