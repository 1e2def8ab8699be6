"""The engine's logic over test backends (real plugins have their own suites)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from kvstacks import CacheEngine, hookimpl
from kvstacks.errors import ConfigError, InvalidInput
from kvstacks.plugins import pm

STORES = None  # set by the autouse fixture below, from conftest


@pytest.fixture(autouse=True)
def _stores(remote_stores):
    global STORES
    STORES = remote_stores

LAYERS, HIDDEN = 2, 8


def kv_for(n, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, LAYERS, n, HIDDEN, generator=g).to(dtype)


def make(stack, **top):
    cfg = {"model": "m", "chunk_size": 16, "stack": stack, **top}
    return CacheEngine.from_config(cfg)


@pytest.fixture
def engine():
    with make([{"backend": "test-dict"}]) as e:
        yield e


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_round_trip_is_bit_exact(engine, dtype):
    tokens = list(range(40))
    kv = kv_for(40, dtype)
    assert engine.store(tokens, kv) == 40
    out, n = engine.retrieve(tokens)
    assert n == 40 and out.dtype == dtype
    assert torch.equal(out.view(torch.uint8) if dtype != torch.float32 else out, kv.view(torch.uint8) if dtype != torch.float32 else kv)


def test_lookup_finds_longest_prefix(engine):
    tokens = list(range(64))
    engine.store(tokens[:40], kv_for(40))
    assert engine.lookup(tokens[:40]) == 40
    assert engine.lookup(tokens) == 32  # two full chunks; the partial one belongs to the 40-token prompt
    assert engine.lookup([9] + tokens[1:]) == 0
    out, n = engine.retrieve(tokens)
    assert n == 32 and torch.equal(out, kv_for(40)[:, :, :32])


def test_miss_returns_none_zero(engine):
    assert engine.retrieve([1, 2, 3]) == (None, 0)
    assert engine.lookup([]) == 0


def test_store_copies_so_caller_may_reuse_its_buffer(engine):
    kv = kv_for(32)
    expected = kv.clone()
    engine.store(list(range(32)), kv)
    kv.zero_()
    out, _ = engine.retrieve(list(range(32)))
    assert torch.equal(out, expected)


def test_retrieve_into_caller_buffer(engine):
    engine.store(list(range(32)), kv_for(32))
    buf = torch.zeros(2, LAYERS, 64, HIDDEN, dtype=torch.float16)
    out, n = engine.retrieve(list(range(32)), out=buf)
    assert n == 32 and out.data_ptr() == buf.data_ptr()
    assert torch.equal(buf[:, :, :32], kv_for(32))
    with pytest.raises(InvalidInput, match="out must be"):
        engine.retrieve(list(range(32)), out=torch.zeros(2, LAYERS, 8, HIDDEN, dtype=torch.float16))


@pytest.mark.parametrize("kv, message", [
    (torch.zeros(2, 2, 10, 8), "10 tokens"),
    (torch.zeros(3, 2, 12, 8), "shape"),
    (torch.zeros(2, 2, 12, 8, dtype=torch.int32), "dtype"),
    ("not a tensor", "torch.Tensor"),
])
def test_bad_kv_is_refused(engine, kv, message):
    with pytest.raises(InvalidInput, match=message):
        engine.store(list(range(12)), kv)


def test_capacity_evicts_lru_and_counts(tmp_path):
    chunk = 2 * LAYERS * 16 * HIDDEN * 2
    with make([{"backend": "test-dict", "capacity": 3 * chunk}]) as e:
        for i in range(5):
            e.store([i] * 16, kv_for(16, seed=i))
        s = e.stats()["test-dict"]
        assert s["objects"] == 3 and s["evictions"] == 2 and s["bytes"] <= 3 * chunk
        assert e.lookup([0] * 16) == 0 and e.lookup([4] * 16) == 16


def test_pinned_chunks_are_never_evicted_and_a_tier_full_of_pins_refuses():
    chunk = 2 * LAYERS * 16 * HIDDEN * 2
    with make([{"backend": "test-dict", "capacity": 2 * chunk}]) as e:
        e.store([1] * 16, kv_for(16))
        e.store([2] * 16, kv_for(16))
        assert e.pin([1] * 16) == 16 and e.pin([2] * 16) == 16
        assert e.store([3] * 16, kv_for(16)) == 0  # refused, not raised
        assert e.stats()["test-dict"]["rejected"] == 1
        assert e.lookup([1] * 16) == 16
        e.unpin([1] * 16)
        assert e.store([3] * 16, kv_for(16)) == 16
        assert e.lookup([1] * 16) == 0 and e.lookup([2] * 16) == 16


def test_pin_ttl_expires():
    chunk = 2 * LAYERS * 16 * HIDDEN * 2
    with make([{"backend": "test-dict", "capacity": chunk}]) as e:
        e.store([1] * 16, kv_for(16))
        e.pin([1] * 16, ttl=0.05)
        assert e.store([2] * 16, kv_for(16)) == 0
        time.sleep(0.1)
        assert e.store([2] * 16, kv_for(16)) == 16
    with pytest.raises(InvalidInput, match="ttl"):
        make([{"backend": "test-dict"}]).pin([1], ttl=-1)


def test_write_through_offloads_and_retrieve_promotes():
    STORES.pop("wt", None)
    stack = [{"backend": "test-dict"}, {"backend": "test-remote", "store": "wt"}]
    with make(stack) as e:
        tokens = list(range(48))
        e.store(tokens, kv_for(48))
        e.offloader.drain(5)
        assert len(STORES["wt"]) == 3
        assert e.lookup_tiers(tokens) == {"test-dict": 48, "test-remote": 48}
        e.clear(tier="test-dict")
        assert e.lookup_tiers(tokens)["test-dict"] == 0
        out, n = e.retrieve(tokens)
        assert n == 48 and torch.equal(out, kv_for(48))
        assert e.stats()["test-remote"]["hits"] == 3
        assert e.lookup_tiers(tokens)["test-dict"] == 48  # promoted


def test_another_engine_reads_a_shared_tier():
    STORES.pop("shared", None)
    stack = [{"backend": "test-dict"}, {"backend": "test-remote", "store": "shared"}]
    with make(stack) as a:
        a.store(list(range(32)), kv_for(32))
    with make(stack) as b:
        out, n = b.retrieve(list(range(32)))
        assert n == 32 and torch.equal(out, kv_for(32))


def test_write_back_demotes_victims_only():
    STORES.pop("wb", None)
    chunk = 2 * LAYERS * 16 * HIDDEN * 2
    stack = [{"backend": "test-dict", "capacity": 2 * chunk}, {"backend": "test-remote", "store": "wb"}]
    with make(stack, write_mode="back") as e:
        for i in range(3):
            e.store([i] * 16, kv_for(16, seed=i))
        e.offloader.drain(5)
        assert len(STORES["wb"]) == 1  # only the victim went down
        out, n = e.retrieve([0] * 16)
        assert n == 16 and torch.equal(out, kv_for(16, seed=0))


def test_write_back_demotes_what_an_import_into_a_full_top_tier_evicts():
    # Fails before the fix: import_chunks and move dropped the top tier's victims, so with
    # write-back (victims held nowhere else) the data was lost.
    STORES.pop("wb-import", None)
    chunk = 2 * LAYERS * 16 * HIDDEN * 2
    stack = [{"backend": "test-dict", "capacity": 2 * chunk}, {"backend": "test-remote", "store": "wb-import"}]
    with make(stack, write_mode="back", offload={"queue_bytes": "1MiB"}) as e, make([{"backend": "test-dict"}]) as other:
        mine, theirs = list(range(32)), list(range(100, 132))
        e.store(mine, kv_for(32))
        other.store(theirs, kv_for(32, seed=1))
        assert e.import_chunks(other.export_chunks(theirs)) == 32  # evicts both of mine from the top
        assert e.flush(5)
        assert e.lookup_tiers(mine) == {"test-dict": 0, "test-remote": 32}
        out, n = e.retrieve(mine)
        assert n == 32 and torch.equal(out, kv_for(32))


def test_a_dead_lower_tier_never_raises_into_the_caller():
    STORES.pop("dead", None)
    stack = [{"backend": "test-dict"}, {"backend": "test-remote", "store": "dead"}]
    with make(stack, offload={"retries": 1, "backoff_s": 0.001}) as e:
        remote = e.tier("test-remote").backend
        remote.down = True
        e.store(list(range(32)), kv_for(32))
        assert e.offloader.drain(5)
        s = e.stats()["test-remote"]
        assert s["errors"] >= 2 and s["dropped"] == 2 and s["retries"] == 2
        e.clear(tier="test-dict")
        assert e.lookup(list(range(32))) == 0  # the dead tier just misses
        assert e.retrieve(list(range(32))) == (None, 0)
        remote.down = False
        e.store(list(range(32)), kv_for(32))  # top tier refilled; the offload resumes
        assert e.offloader.drain(5) and len(STORES["dead"]) == 2


def test_full_offload_queue_drops_and_counts_instead_of_blocking():
    STORES.pop("slow", None)
    stack = [{"backend": "test-dict"}, {"backend": "test-remote", "store": "slow", "delay": 0.2}]
    chunk = 2 * LAYERS * 16 * HIDDEN * 2
    with make(stack, offload={"queue_bytes": chunk, "workers": 1}) as e:
        started = time.perf_counter()
        for i in range(6):
            e.store([i] * 16, kv_for(16))
        assert time.perf_counter() - started < 0.2 * 3  # did not wait for the slow tier
        assert e.stats()["test-remote"]["dropped"] >= 1


def test_close_waits_for_pending_offloads():
    STORES.pop("close", None)
    stack = [{"backend": "test-dict"}, {"backend": "test-remote", "store": "close", "delay": 0.05}]
    e = make(stack)
    e.store(list(range(64)), kv_for(64))
    e.close()
    assert len(STORES["close"]) == 4
    with pytest.raises(InvalidInput, match="closed"):
        e.store([1], kv_for(1))
    e.close()  # twice is fine


def test_remove_move_export_import():
    STORES.pop("mv", None)
    stack = [{"backend": "test-dict"}, {"backend": "test-remote", "store": "mv"}]
    with make(stack, write_mode="back") as e:
        tokens = list(range(32))
        e.store(tokens, kv_for(32))
        assert e.move(tokens, "test-dict", "test-remote", copy=False) == 32
        assert e.lookup_tiers(tokens) == {"test-dict": 0, "test-remote": 32}
        objs = e.export_chunks(tokens)
        assert [o.num_tokens for o in objs] == [16, 16]
        assert e.remove(tokens) == 32 and e.lookup(tokens) == 0
        assert e.import_chunks(objs) == 32
        out, n = e.retrieve(tokens)
        assert n == 32 and torch.equal(out, kv_for(32))
        with pytest.raises(InvalidInput, match="no tier named"):
            e.move(tokens, "test-dict", "nowhere")


def test_compress_and_decompress_in_place():
    with make([{"backend": "test-dict"}]) as e:
        tokens = list(range(32))
        e.store(tokens, kv_for(32))
        assert e.compress(tokens, "lz4", "test-dict") == 32
        assert all(o.compressor == "lz4" for o in e.export_chunks(tokens))
        out, n = e.retrieve(tokens)
        assert n == 32 and torch.equal(out, kv_for(32))
        assert e.decompress(tokens, "test-dict") == 32
        assert all(o.compressor == "none" for o in e.export_chunks(tokens))
        with pytest.raises(InvalidInput, match="unknown compressor"):
            e.compress(tokens, "nope", "test-dict")


def test_async_twins():
    async def main():
        with make([{"backend": "test-dict"}]) as e:
            await e.astore(list(range(20)), kv_for(20))
            assert await e.alookup(list(range(20))) == 20
            out, n = await e.aretrieve(list(range(20)))
            assert n == 20 and torch.equal(out, kv_for(20))
            assert await e.aclear() == (2, 20)

    asyncio.run(main())


def test_observer_hooks_see_admits_and_evictions():
    seen = {"admitted": [], "evicted": [], "startup": 0, "shutdown": 0}

    class Observer:
        @hookimpl
        def chunks_admitted(self, engine, tier, keys):
            seen["admitted"].append((tier, len(keys)))

        @hookimpl
        def chunks_evicted(self, engine, tier, keys):
            seen["evicted"].append((tier, len(keys)))

        @hookimpl
        def kvstacks_startup(self, engine):
            seen["startup"] += 1

        @hookimpl
        def kvstacks_shutdown(self, engine):
            seen["shutdown"] += 1

    observer = Observer()
    pm.register(observer)
    try:
        with make([{"backend": "test-dict"}]) as e:
            e.store(list(range(40)), kv_for(40))
            e.clear()
    finally:
        pm.unregister(observer)
    assert seen == {"admitted": [("test-dict", 3)], "evicted": [("test-dict", 3)], "startup": 1, "shutdown": 1}


def test_config_errors_name_the_yaml_path_and_the_fix():
    with pytest.raises(ConfigError) as err:
        CacheEngine.from_config({"stack": [{"backend": "test-dict"}, {"backend": "redis-nope"}]})
    assert "stack[1].backend" in str(err.value) and "installed backends" in str(err.value)
    with pytest.raises(ConfigError, match=r"stack\[0\].capacity"):
        CacheEngine.from_config({"stack": [{"backend": "test-dict", "capacity": "lots"}]})
    with pytest.raises(ConfigError, match=r"stack\[0\].eviction.*installed eviction policies"):
        CacheEngine.from_config({"stack": [{"backend": "test-dict", "eviction": "random"}]})
    with pytest.raises(ConfigError, match=r"stack\[0\].compressor"):
        CacheEngine.from_config({"stack": [{"backend": "test-dict", "compressor": "zip"}]})
    with pytest.raises(ConfigError, match=r"stack\[0\].colour: unknown option"):
        CacheEngine.from_config({"stack": [{"backend": "test-dict", "colour": "red"}]})
    with pytest.raises(ConfigError, match="chunk_size"):
        CacheEngine.from_config({"chunk_size": 0, "stack": [{"backend": "test-dict"}]})
    with pytest.raises(ConfigError, match="non-empty list"):
        CacheEngine.from_config({"stack": []})
    with pytest.raises(ConfigError, match="write_mode"):
        CacheEngine.from_config({"write_mode": "sideways", "stack": [{"backend": "test-dict"}]})


def test_yaml_file(tmp_path):
    path = tmp_path / "stack.yaml"
    path.write_text("model: m\nchunk_size: 16\nstack:\n  - backend: test-dict\n    capacity: 1MiB\n")
    with CacheEngine.from_yaml(path) as e:
        assert e.stats()["test-dict"]["capacity"] == 1 << 20
    path.write_text("stack: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        CacheEngine.from_yaml(path)
    with pytest.raises(ConfigError, match="cannot read"):
        CacheEngine.from_yaml(tmp_path / "missing.yaml")


def test_blocking_call_from_the_io_loop_is_refused_clearly():
    with make([{"backend": "test-dict"}]) as e:
        async def inside():
            e.io.run(asyncio.sleep(0))
        with pytest.raises(RuntimeError, match="async twin"):
            e.io.run(inside())


def test_plugin_option_errors_are_prefixed_with_the_tier_path():
    with pytest.raises(ConfigError, match=r"^stack\[0\]\.compressor_options\.level"):
        CacheEngine.from_config({"stack": [{"backend": "test-dict", "compressor": "zstd",
                                            "compressor_options": {"level": 99}}]})
    with pytest.raises(ConfigError, match=r"stack\[0\]\.eviction_options\.nope: unknown option"):
        CacheEngine.from_config({"stack": [{"backend": "test-dict", "eviction": "s3fifo",
                                            "eviction_options": {"nope": 1}}]})
    with make([{"backend": "test-dict", "eviction": "s3fifo", "eviction_options": {"small_ratio": 0.2}}]) as e:
        assert e.tiers[0].policy.options.small_ratio == 0.2


def test_objects_read_from_lower_tiers_are_released_after_promotion():
    STORES.pop("rel", None)
    stack = [{"backend": "test-dict"}, {"backend": "test-remote", "store": "rel"},
             {"backend": "test-remote", "name": "far", "store": "rel-far"}]
    STORES.pop("rel-far", None)
    with make(stack) as e:
        tokens = list(range(48))
        e.store(tokens, kv_for(48))
        e.offloader.drain(5)
        e.clear(tier="test-dict")
        e.clear(tier="test-remote")
        far = e.tier("far").backend
        out, n = e.retrieve(tokens)
        assert n == 48 and torch.equal(out, kv_for(48))
        e.offloader.drain(5)  # promotion into the middle tier holds the lease until written
        assert far.released == 3
        assert e.lookup_tiers(tokens) == {"test-dict": 48, "test-remote": 48, "far": 48}


def test_concurrent_offloads_under_eviction_leave_no_orphans_in_the_store():
    # Two writers: a chunk can be chosen as a victim while its own write is still in flight.
    STORES.pop("orphans", None)
    chunk = 2 * LAYERS * 16 * HIDDEN * 2
    stack = [{"backend": "test-dict"},
             {"backend": "test-remote", "store": "orphans", "delay": 0.02, "jitter": True,
              "capacity": 2 * chunk}]
    with make(stack, offload={"workers": 4}) as e:
        for i in range(8):
            e.store([i] * 64, kv_for(64, seed=i))
        assert e.offloader.drain(10)
        held = e.keys("test-remote")["test-remote"]
        assert len(held) == 2
        assert set(STORES["orphans"]) == set(held)
