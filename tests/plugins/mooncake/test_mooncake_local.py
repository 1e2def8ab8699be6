"""Replicas in this process's own segment are copied and checked block by block (kvstacks_mooncake.local)."""

from __future__ import annotations

import ctypes
import uuid

import pytest
import torch
from kvstacks.testing import assert_same_obj, random_key, random_kv, raw_obj
from kvstacks_mooncake import MooncakeBackend
from kvstacks_mooncake.local import BLOCK


class CountingStore:
    """The client, with its batch_get_into and descriptor calls counted (the paths local reads avoid)."""

    def __init__(self, store) -> None:
        self._store = store
        self.client_gets = 0
        self.descriptor_calls = 0

    def batch_get_into(self, *args):
        self.client_gets += 1
        return self._store.batch_get_into(*args)

    def batch_get_replica_desc(self, *args):
        self.descriptor_calls += 1
        return self._store.batch_get_replica_desc(*args)

    def __getattr__(self, name):
        return getattr(self._store, name)


@pytest.fixture
async def backend(own_master):
    """A started tier on a master of its own, closed after the test."""
    backend = make(own_master().address)
    await backend.start()
    yield backend
    await backend.close()


def make(master: str) -> MooncakeBackend:
    # a master of its own: the session's master also holds segments of other tests' idle clients,
    # where a put may land (not this tier's segment)
    return MooncakeBackend(MooncakeBackend.Options(
        master=master, prefix=f"local-{uuid.uuid4().hex[:8]}:", segment_bytes=64 << 20,
        local_buffer_bytes=16 << 20, read_buffer_bytes=32 << 20, timeout=10.0))


async def test_own_segment_is_found_and_read_without_the_client(backend):
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


async def test_a_chunk_torn_in_the_middle_is_a_miss_through_the_local_path(backend):
    """Bytes changed in the replica itself (as a forced remove and another put would): the
    block-by-block check sees them, the chunk is a miss, counted corrupt and removed."""
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
    # the remembered place failed its check first (not evidence enough), then the read
    # through the replica's descriptor failed too: only that counts as corrupt
    assert backend.stats()["local_stale"] == 1
    assert backend.stats()["corrupt"] == 1
    assert not await backend.contains(key)  # removed


async def test_a_chunk_this_tier_wrote_is_read_from_its_remembered_place(backend):
    """After a put the tier knows where its chunks landed: a get asks the master nothing."""
    assert backend.local is not None
    keys = [random_key() for _ in range(4)]
    objs = [raw_obj(k, random_kv(2, 400 + i, 256, seed=60 + i)) for i, k in enumerate(keys)]
    await backend.batch_put(list(zip(keys, objs)))
    assert backend.stats()["local_places"] == 4
    store = backend.store = CountingStore(backend.store)
    got = await backend.batch_get(keys)
    for obj, back in zip(objs, got):
        assert_same_obj(back, obj, "remembered read")
        backend.release_now(back)
    assert (store.client_gets, store.descriptor_calls) == (0, 0)
    assert backend.stats()["local_hits"] == 4


async def test_a_remembered_place_reused_by_another_object_is_never_served(backend):
    """Removed behind this tier's back (another process) and its memory reused: the stale place
    fails the frame check, the tier asks Mooncake again, the chunk is a plain miss (not corrupt)."""
    assert backend.local is not None
    key, other = random_key(), random_key()
    obj = raw_obj(key, random_kv(2, 500, 256, seed=8))
    await backend.put(key, obj)
    name = backend._name(key)
    place = backend.local.place(name)
    assert place is not None
    assert backend.store.batch_remove([name], True) == [0]  # not through the tier: it still remembers
    await backend.put(other, raw_obj(other, random_kv(2, 500, 256, seed=9)))
    assert backend.local.place(backend._name(other))[0] == place[0], "Mooncake placed the new object elsewhere"
    assert await backend.get(key) is None
    stats = backend.stats()
    assert (stats["local_stale"], stats["corrupt"]) == (1, 0)
    assert backend.local.place(name) is None
    back = await backend.get(other)
    assert back is not None
    backend.release_now(back)


async def test_a_chunk_removed_through_the_tier_is_forgotten(backend):
    key = random_key()
    await backend.put(key, raw_obj(key, random_kv(2, 64, 256, seed=3)))
    assert backend.local.place(backend._name(key)) is not None
    assert await backend.remove(key)
    assert backend.local.place(backend._name(key)) is None
    assert await backend.get(key) is None
    assert backend.stats()["local_stale"] == 0


async def test_an_overwrite_reads_the_new_bytes(backend):
    key = random_key()
    await backend.put(key, raw_obj(key, random_kv(2, 64, 256, seed=4)))
    new = raw_obj(key, random_kv(2, 64, 256, seed=5))
    await backend.put(key, new)
    back = await backend.get(key)
    assert_same_obj(back, new, "overwritten")
    backend.release_now(back)


async def test_chunks_sliced_out_of_the_engine_s_kv_are_sent_from_where_they_lie(backend):
    """The engine hands a tier each chunk as a slice of its KV (not contiguous): the tier sends
    the slice's [k/v, layer] runs from the caller's memory, registered in place, not a copy."""
    kv = random_kv(4, 4 * 64, 512, seed=11)  # runs of 64 KiB
    keys = [random_key() for _ in range(4)]
    objs = [raw_obj(k, view) for k, view in zip(keys, kv.split(64, dim=2))]
    assert not objs[1].data.is_contiguous()
    await backend.batch_put(list(zip(keys, objs)))
    storage = kv.untyped_storage()
    assert storage.data_ptr() in backend.registrations._regions, "the caller's KV was not registered where it lies"
    assert backend.registrations.registered == 1, "something other than the caller's KV was registered (a copy)"
    got = await backend.batch_get(keys)
    for obj, back in zip(objs, got):
        assert_same_obj(back, obj, "sliced chunk")
        backend.release_now(back)


async def test_remembered_chunks_are_read_straight_into_the_caller_s_out(backend):
    """retrieve(out=) hands each chunk's place in out: a chunk this tier put in its own segment is
    copied and checked there (its data is the place), asking neither the master nor a read slot."""
    keys = [random_key() for _ in range(3)]
    kv = random_kv(4, 3 * 64, 512, seed=21)  # runs of 64 KiB
    objs = [raw_obj(k, part.clone()) for k, part in zip(keys, kv.split(64, dim=2))]
    await backend.batch_put(list(zip(keys, objs)))
    store = backend.store = CountingStore(backend.store)
    out = torch.zeros_like(kv)
    places = list(out.split(64, dim=2))
    hits, placed = backend.local_hits, backend.placed
    got = await backend.batch_get_into(keys, places)
    for obj, back, place in zip(objs, got, places):
        assert back is not None and back.data is place, "not read into the caller's place"
        assert_same_obj(back, obj, "read into place")
    assert torch.equal(out, kv)
    assert backend.local_hits == hits + 3 and backend.placed == placed + 3
    assert store.client_gets == 0 and store.descriptor_calls == 0


async def test_a_place_of_another_layout_or_a_torn_replica_is_read_the_general_way(backend):
    key, torn = random_key(), random_key()
    obj = raw_obj(key, random_kv(2, 128, 256, seed=5))
    bad = raw_obj(torn, random_kv(2, 128, 256, seed=6))
    await backend.batch_put([(key, obj), (torn, bad)])
    (replica,) = backend.store.get_replica_desc(backend._name(torn))
    desc = replica.get_memory_descriptor().buffer_descriptor
    ctypes.memset(desc.buffer_address + desc.size // 2, 0x5A, 4096)
    stale = backend.local_stale
    # a place for 64 tokens where 128 were stored: not the chunk's layout, read into a slot as by batch_get
    (other, broken) = await backend.batch_get_into([key, torn], [torch.zeros(2, 2, 64, 256, dtype=torch.float16),
                                                                 torch.zeros(2, 2, 128, 256, dtype=torch.float16)])
    assert other is not None and other.shape == obj.shape
    assert_same_obj(other, obj, "general read")
    backend.release_now(other)
    assert broken is None, "a torn replica was served"
    assert backend.local_stale == stale + 1  # only the torn one: a layout mismatch is not a stale place
