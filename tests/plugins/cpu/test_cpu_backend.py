"""The cpu backend: copies into pooled buffers, leases, conformance."""

from __future__ import annotations

import pytest
import torch
from kvstacks import frame
from kvstacks.config import build_options
from kvstacks.errors import ConfigError
from kvstacks.memory import MemoryObj
from kvstacks.plugins import registry
from kvstacks.testing import BackendConformance, bits, random_key, random_kv, raw_obj
from kvstacks_cpu import CpuBackend


class TestCpuConformance(BackendConformance):
    in_process = True

    @pytest.fixture
    def backend(self) -> CpuBackend:
        return CpuBackend()


@pytest.fixture
def backend() -> CpuBackend:
    return CpuBackend()


def test_registered_under_cpu() -> None:
    assert registry().get("backends", "cpu") is CpuBackend


def test_options_from_yaml_values() -> None:
    options = build_options(CpuBackend.Options, {"pool_limit": "64MiB"}, "stack[0]")
    assert options.pool_limit == 64 << 20 and options.pin_memory is None
    with pytest.raises(ConfigError, match="pool_limit"):
        build_options(CpuBackend.Options, {"pool_limit": "lots"}, "stack[0]")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_pinned_memory_without_cuda_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="pin_memory"):
        CpuBackend(CpuBackend.Options(pin_memory=True))
    assert CpuBackend().pool.stats().pinned is False


def test_put_copies_a_strided_view_of_the_callers_kv(backend: CpuBackend) -> None:
    kv = random_kv(2, 32, 64, seed=1)
    view = kv[:, :, 8:16]  # not contiguous, like a chunk of a longer prompt
    key = random_key()
    backend.put_now(key, MemoryObj(key, view, tuple(view.shape), view.dtype))
    expected = view.clone()
    kv.zero_()  # the caller reuses its buffer
    got = backend.get_now(key)
    assert got is not None and torch.equal(got.data, expected)
    assert got.data.is_contiguous()
    assert got.data.untyped_storage().data_ptr() != kv.untyped_storage().data_ptr()


def test_get_now_returns_the_stored_object_without_copying(backend: CpuBackend) -> None:
    key = random_key()
    backend.put_now(key, raw_obj(key, random_kv(seed=2)))
    first, second = backend.get_now(key), backend.get_now(key)
    assert first is second
    backend.release_now(first)
    backend.release_now(second)


def test_removed_chunk_buffer_is_recycled(backend: CpuBackend) -> None:
    a, b = random_key(), random_key()
    backend.put_now(a, raw_obj(a, random_kv(seed=3)))
    ptr = backend.get_now(a).data.data_ptr()
    backend.release_now(backend.get_now(a))  # a second lease, released
    backend.release_now(backend._slots[a].obj)  # the first one
    assert backend.remove_now(a) is True
    backend.put_now(b, raw_obj(b, random_kv(seed=4)))
    got = backend.get_now(b)
    assert got.data.data_ptr() == ptr, "same-size chunk should reuse the freed buffer"
    stats = backend.pool.stats()
    assert stats.allocations == 1 and stats.reuses == 1


def test_a_leased_buffer_is_not_reused_until_released(backend: CpuBackend) -> None:
    a, b = random_key(), random_key()
    original = random_kv(seed=5)
    backend.put_now(a, raw_obj(a, original))
    leased = backend.get_now(a)
    assert backend.remove_now(a) is True
    assert backend.contains_now(a) is False
    backend.put_now(b, raw_obj(b, random_kv(seed=6)))
    other = backend.get_now(b)
    assert other.data.data_ptr() != leased.data.data_ptr(), "a leased buffer was handed to another chunk"
    assert torch.equal(leased.data, original), "a leased chunk changed under its reader"
    assert backend.leased_after_removal == 1
    free_before = backend.pool.stats().free_buffers
    backend.release_now(leased)
    assert backend.leased_after_removal == 0
    assert backend.pool.stats().free_buffers == free_before + 1, "the released buffer should go back to the pool"


def test_overwrite_while_leased_keeps_the_old_bytes(backend: CpuBackend) -> None:
    key = random_key()
    first = random_kv(seed=7)
    backend.put_now(key, raw_obj(key, first))
    leased = backend.get_now(key)
    backend.put_now(key, raw_obj(key, random_kv(seed=8)))
    assert torch.equal(leased.data, first)
    current = backend.get_now(key)
    assert current is not leased
    backend.release_now(leased)
    backend.release_now(current)


def test_a_lease_never_released_is_let_go_not_recycled(backend: CpuBackend) -> None:
    key = random_key()
    backend.put_now(key, raw_obj(key, random_kv(seed=9)))
    leased = backend.get_now(key)
    data = leased.data
    backend.remove_now(key)
    del leased  # the reader forgot to release; it may still hold the tensor
    assert backend.leased_after_removal == 0
    stats = backend.pool.stats()
    assert stats.in_use_bytes == 0 and stats.free_buffers == 0 and stats.released == 1
    other = random_key()
    backend.put_now(other, raw_obj(other, random_kv(seed=10)))
    assert backend.get_now(other).data.data_ptr() != data.data_ptr()


def test_release_is_idempotent_and_ignores_foreign_objects(backend: CpuBackend) -> None:
    key = random_key()
    backend.put_now(key, raw_obj(key, random_kv(seed=11)))
    obj = backend.get_now(key)
    backend.release_now(obj)
    backend.release_now(obj)  # one too many: must not go negative or recycle
    backend.release_now(raw_obj(key, random_kv(seed=12)))
    assert backend._slots[key].leases == 0
    assert backend.remove_now(key) is True
    assert backend.pool.stats().free_buffers == 1


def test_clear_recycles_unleased_buffers_and_keeps_leased_ones_intact(backend: CpuBackend) -> None:
    keys = [random_key() for _ in range(4)]
    kvs = [random_kv(seed=20 + i) for i in range(4)]
    for key, kv in zip(keys, kvs):
        backend.put_now(key, raw_obj(key, kv))
    leased = backend.get_now(keys[0])
    backend.clear_now()
    assert backend.keys_now() == []
    assert backend.pool.stats().free_buffers == 3
    for i in range(4):
        k = random_key()
        backend.put_now(k, raw_obj(k, random_kv(seed=40 + i)))
    assert torch.equal(leased.data, kvs[0])
    backend.release_now(leased)


async def test_close_empties_the_pool(backend: CpuBackend) -> None:
    key = random_key()
    await backend.put(key, raw_obj(key, random_kv(seed=13)))
    got = await backend.get(key)
    await backend.release(got)
    await backend.close()
    stats = backend.pool.stats()
    assert stats.reserved_bytes == 0 and backend.keys_now() == []


def test_keys_report_payload_bytes(backend: CpuBackend) -> None:
    key = random_key()
    kv = random_kv(2, 10, 48, torch.bfloat16, seed=14)
    backend.put_now(key, raw_obj(key, kv))
    assert backend.keys_now() == [(key, kv.numel() * 2)]


def test_a_kv_that_requires_grad_is_stored_detached(backend: CpuBackend) -> None:
    key = random_key()
    kv = random_kv(seed=15, dtype=torch.float32).requires_grad_()
    backend.put_now(key, raw_obj(key, kv))
    got = backend.get_now(key)
    assert not got.data.requires_grad and torch.equal(got.data, kv.detach())


async def test_with_idle_buffers_capped_a_leased_chunk_keeps_its_bytes_through_churn() -> None:
    # The cap (the tier's capacity) sends buffers past it back to the arena, where any size
    # class may carve them again: none of that may reach a buffer someone still reads.
    chunk = random_kv(seed=30).numel() * 2
    backend = CpuBackend()
    backend.capacity = 4 * chunk
    await backend.start()
    assert backend.pool.ceiling == 4 * chunk and backend.pool.stats().arena_bytes >= 4 * chunk
    kept_key = random_key()
    kept = random_kv(seed=31)
    backend.put_now(kept_key, raw_obj(kept_key, kept))
    leased = backend.get_now(kept_key)
    start = leased.data.data_ptr()
    end = start + chunk
    backend.remove_now(kept_key)  # evicted while read
    live: list = []
    for i in range(200):
        tokens = (8, 16, 24, 5)[i % 4]  # several size classes, so ranges are merged and re-carved
        key = random_key()
        backend.put_now(key, raw_obj(key, random_kv(tokens=tokens, seed=100 + i)))
        got = backend.get_now(key)
        p = got.data.data_ptr()
        assert p + got.nbytes <= start or p >= end, "a buffer still leased was handed to another chunk"
        backend.release_now(got)
        live.append(key)
        if len(live) > 3:
            backend.remove_now(live.pop(0))
        assert backend.pool.stats().free_bytes <= 4 * chunk, "idle buffers outgrew the tier's capacity"
    assert bits(leased.data) == bits(kept), "a leased chunk changed under its reader"
    backend.release_now(leased)
    assert backend.pool.stats().free_bytes <= 4 * chunk
    await backend.close()


async def test_pool_limit_overrides_the_capacity_as_the_idle_cap() -> None:
    backend = CpuBackend(CpuBackend.Options(pool_limit=1 << 20))
    backend.capacity = 8 << 20
    await backend.start()
    pool = backend.pool
    buffers = [pool.take(1 << 19) for _ in range(6)]
    for buffer in buffers:
        pool.give_back(buffer)
    assert pool.stats().free_bytes == 1 << 20
    await backend.close()


# -- frame checks computed while copying (carry_checks) ------------------------------


def sliced_kv(seed: int) -> torch.Tensor:
    return random_kv(2, 1024, 256, seed=seed)[:, :, 256:768]  # runs of 256 KiB, as a chunk of a longer KV


def test_with_carry_checks_a_stored_chunk_carries_its_frame_check() -> None:
    backend = CpuBackend()
    backend.carry_checks = True
    key = random_key()
    kv = sliced_kv(1)
    backend.put_now(key, raw_obj(key, kv))
    stored = backend.get_now(key)
    assert stored.check is not None
    assert frame.encode(stored) == frame.encode(raw_obj(key, kv)), "the carried check is not the frame's"
    assert bits(stored.data) == bits(kv)
    backend.release_now(stored)


def test_without_carry_checks_nothing_is_hashed(backend: CpuBackend) -> None:
    key = random_key()
    backend.put_now(key, raw_obj(key, sliced_kv(2)))
    assert backend.get_now(key).check is None


def test_a_recycled_buffer_leaves_no_check_behind() -> None:
    """An object whose buffer goes back to the pool loses its check, whichever way it goes:
    a stale reference must not send a check that no longer matches the buffer's bytes."""
    backend = CpuBackend()
    backend.carry_checks = True
    key, other = random_key(), random_key()
    backend.put_now(key, raw_obj(key, sliced_kv(3)))
    leased = backend.get_now(key)
    backend.remove_now(key)
    assert leased.check is not None, "leased: its bytes cannot change, its check stays"
    backend.release_now(leased)
    assert leased.check is None, "released after removal: the buffer is recycled"
    backend.put_now(other, raw_obj(other, sliced_kv(4)))  # takes that buffer
    assert backend.pool_stats().reuses == 1
    # overwritten and removed without leases: recycled at once
    backend.put_now(key, raw_obj(key, sliced_kv(5)))
    first = backend.get_now(key)
    backend.release_now(first)
    backend.put_now(key, raw_obj(key, sliced_kv(6)))
    assert first.check is None
    second = backend.get_now(key)
    backend.release_now(second)
    backend.clear_now()
    assert second.check is None
