"""The size-classed buffer pool behind the cpu tier."""

from __future__ import annotations

import torch
from kvstacks_cpu.pool import PAGE, BufferPool, size_class


def test_size_classes_round_to_pages_above_a_page_and_powers_of_two_below() -> None:
    assert size_class(1) == 64
    assert size_class(64) == 64
    assert size_class(65) == 128
    assert size_class(1000) == 1024
    assert size_class(PAGE) == PAGE
    assert size_class(PAGE + 1) == 2 * PAGE
    assert size_class(32 << 20) == 32 << 20
    assert size_class((32 << 20) + 7) == (32 << 20) + PAGE


def test_a_returned_buffer_is_reused_for_the_same_class() -> None:
    pool = BufferPool()
    first = pool.take(5000)
    assert first.data.dtype == torch.uint8 and first.size == size_class(5000)
    pool.give_back(first)
    again = pool.take(6000)  # same page-rounded class
    assert again is first
    stats = pool.stats()
    assert (stats.allocations, stats.reuses) == (1, 1)
    assert stats.in_use_bytes == first.size and stats.free_bytes == 0


def test_stats_account_reserved_in_use_and_free() -> None:
    pool = BufferPool()
    bufs = [pool.take(PAGE * 4) for _ in range(3)]
    pool.give_back(bufs[0])
    stats = pool.stats()
    assert stats.in_use_bytes == 2 * PAGE * 4
    assert stats.free_bytes == PAGE * 4
    assert stats.reserved_bytes == 3 * PAGE * 4
    assert stats.free_buffers == 1
    assert stats.pinned is False


def test_limit_caps_idle_bytes() -> None:
    pool = BufferPool(limit=2 * PAGE)
    bufs = [pool.take(PAGE) for _ in range(4)]
    for buf in bufs:
        pool.give_back(buf)
    stats = pool.stats()
    assert stats.free_bytes == 2 * PAGE
    assert stats.released == 2
    assert stats.in_use_bytes == 0


def test_a_miss_lets_idle_buffers_of_other_classes_go() -> None:
    # Chunk sizes drift (a partial last chunk): idle memory of an unused class must
    # not pile up next to new allocations.
    pool = BufferPool()
    small = [pool.take(PAGE) for _ in range(4)]
    for buf in small:
        pool.give_back(buf)
    assert pool.stats().free_bytes == 4 * PAGE
    big = pool.take(3 * PAGE)
    stats = pool.stats()
    assert stats.free_bytes == PAGE, "3 pages of idle small buffers should have been released for a 3-page miss"
    assert stats.reserved_bytes == 4 * PAGE
    pool.give_back(big)


def test_trim_and_forget() -> None:
    pool = BufferPool()
    a, b = pool.take(PAGE), pool.take(PAGE)
    pool.give_back(a)
    pool.forget(b)
    assert pool.trim() == PAGE
    stats = pool.stats()
    assert stats.reserved_bytes == 0 and stats.released == 2


def test_typed_view_is_cached_and_follows_shape_changes() -> None:
    pool = BufferPool()
    buf = pool.take(1024)
    view = buf.typed(1024, torch.float16, (2, 2, 4, 32))
    assert buf.typed(1024, torch.float16, torch.Size([2, 2, 4, 32])) is view
    assert view.data_ptr() == buf.data.data_ptr()
    other = buf.typed(512, torch.float32, (128,))
    assert other.shape == (128,) and other.dtype == torch.float32
    assert other.data_ptr() == buf.data.data_ptr()


def test_an_exact_fit_is_born_typed_and_reusable_for_another_shape() -> None:
    pool = BufferPool()
    buf = pool.take(1024, torch.float16, (2, 2, 4, 32))
    view = buf.typed(1024, torch.float16, (2, 2, 4, 32))
    assert view.dtype == torch.float16 and view.shape == (2, 2, 4, 32) and buf.size == 1024
    view.fill_(1.0)
    flat = buf.data
    assert flat.dtype == torch.uint8 and flat.numel() == 1024 and flat.data_ptr() == view.data_ptr()
    pool.give_back(buf)
    again = pool.take(1000)
    assert again is buf
    other = again.typed(1000, torch.uint8, (1000,))
    assert other.data_ptr() == view.data_ptr()
    pool.give_back(again)
    assert pool.stats().in_use_bytes == 0
