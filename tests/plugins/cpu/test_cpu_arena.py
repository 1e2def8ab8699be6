"""Memory reserved up front for the cpu tier and faulted in ahead of the first fill."""

from __future__ import annotations

import resource

import torch
from kvstacks import CacheEngine
from kvstacks.testing import random_kv
from kvstacks_cpu.arena import Arena
from kvstacks_cpu.pool import PAGE, BufferPool

MiB = 1 << 20


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_ranges_handed_back_merge_with_their_neighbours() -> None:
    arena = Arena(8 * PAGE, prefault=False)
    a, b, c = (arena.carve(2 * PAGE) for _ in range(3))
    assert [v.data_ptr() - a.data_ptr() for v in (a, b, c)] == [0, 2 * PAGE, 4 * PAGE]
    assert arena.carve(4 * PAGE) is None, "only 2 pages are left"
    arena.give_back(b)
    arena.give_back(a)
    assert arena.free_bytes == 6 * PAGE
    merged = arena.carve(4 * PAGE)
    assert merged is not None and merged.data_ptr() == a.data_ptr(), "a and b should have merged into one range"
    arena.give_back(c)
    arena.give_back(merged)
    assert arena.free_bytes == 8 * PAGE
    assert arena.carve(8 * PAGE) is not None, "every range returned: the whole arena is one range again"
    arena.close()
    assert arena.carve(PAGE) is None


def test_a_prefaulted_arena_fills_without_page_faults() -> None:
    size = 64 * MiB
    torch.empty(MiB, dtype=torch.uint8).fill_(1)  # torch's threads start outside the counts

    def faults_filling(arena: Arena) -> int:
        view = arena.carve(size)
        before = minor_faults()
        view.fill_(7)
        return minor_faults() - before

    cold = faults_filling(Arena(size, prefault=False))
    arena = Arena(size)
    assert arena.done.wait(30), "pre-faulting 64 MiB should finish in seconds"
    assert arena.populated == size
    warm = faults_filling(arena)
    # Cold: a fault per page, or per 2 MiB where the kernel gives huge pages (32 here).
    assert cold >= size // (2 * MiB)
    assert warm * 4 < cold, f"a pre-faulted arena took {warm} page faults to fill, a fresh one {cold}"
    arena.close()


def test_the_pool_carves_from_its_arena_first_then_takes_heap_memory() -> None:
    pool = BufferPool()
    pool.reserve(4 * PAGE, prefault=False)
    inside = [pool.take(2 * PAGE, torch.float16, (PAGE,)) for _ in range(2)]
    assert all(buf.arena is not None for buf in inside)
    assert inside[0].typed(2 * PAGE, torch.float16, (PAGE,)).dtype == torch.float16
    outside = pool.take(2 * PAGE)
    assert outside.arena is None, "a full arena falls back to torch memory"
    stats = pool.stats()
    assert stats.arena_bytes == 4 * PAGE
    assert stats.reserved_bytes == 6 * PAGE and stats.in_use_bytes == 6 * PAGE
    for buf in inside:
        pool.give_back(buf)
    # Another size class: idle arena buffers go back to the arena and are carved again.
    big = pool.take(4 * PAGE)
    assert big.arena is not None, "the arena's idle buffers should have been merged for the 4-page request"
    big.data.fill_(1)
    pool.give_back(outside)
    pool.close()
    assert pool.stats().arena_bytes == 0


def test_the_engine_reserves_a_cpu_tier_capacity_and_releases_it_on_close() -> None:
    stack = [{"backend": "cpu", "capacity": "16MiB"}]
    with CacheEngine.from_config({"model": "m", "chunk_size": 16, "stack": stack}) as engine:
        pool = engine.tiers[0].backend.pool
        assert pool.stats().arena_bytes == 16 * MiB
        tokens = list(range(40))
        kv = random_kv(2, len(tokens), 64, torch.float16, seed=1)
        engine.store(tokens, kv)
        got, n = engine.retrieve(tokens)
        assert n == len(tokens) and torch.equal(got, kv)
    assert pool.stats().arena_bytes == 0 and pool.stats().reserved_bytes == 0

    stack = [{"backend": "cpu", "capacity": "16MiB", "prefault": False}]
    with CacheEngine.from_config({"model": "m", "chunk_size": 16, "stack": stack}) as engine:
        assert engine.tiers[0].backend.pool.stats().arena_bytes == 0
    with CacheEngine.from_config({"model": "m", "chunk_size": 16, "stack": [{"backend": "cpu"}]}) as engine:
        assert engine.tiers[0].backend.pool.stats().arena_bytes == 0, "no capacity, nothing to reserve"
