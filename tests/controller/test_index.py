"""The chunk index against a plain dict-of-sets model."""

from __future__ import annotations

import os

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from kvstacks_controller.index import ChunkIndex, hashes_to_array


def digests(n: int) -> list[bytes]:
    return [os.urandom(16) for _ in range(n)]


def test_admit_evict_counts_and_duplicates():
    idx = ChunkIndex(capacity=8)
    a, b = idx.holder("i1", 0, "cpu"), idx.holder("i2", 0, "cpu")
    hs = digests(300)
    assert idx.admit(a, hs[:200] + hs[:10]) == 200  # duplicates in one batch count once
    assert idx.admit(a, hs[:50]) == 0
    assert idx.admit(b, hs[100:]) == 200
    assert (len(idx), idx.count(a), idx.count(b)) == (300, 200, 200)
    assert idx.evict(a, hs[:150]) == 150
    assert (len(idx), idx.count(a)) == (200, 50)  # hs[100:300] still held by b
    assert idx.evict(a, digests(5)) == 0  # unknown chunks are no-ops


def test_prefix_lengths_union_of_tiers_and_gaps():
    idx = ChunkIndex()
    cpu, disk, other = idx.holder("i1", 0, "cpu"), idx.holder("i1", 0, "disk"), idx.holder("i2", 0, "cpu")
    chain = digests(10)
    idx.admit(cpu, chain[:4])
    idx.admit(disk, chain[4:7])
    idx.admit(other, chain[:2] + chain[3:])  # a gap at chunk 2
    counts = idx.prefix_lengths(chain, [[cpu], [disk], [cpu, disk], [other]])
    assert counts.tolist() == [4, 0, 7, 2]


def test_clear_and_release_holder_reuses_the_id():
    idx = ChunkIndex()
    a, b = idx.holder("i1", 0, "cpu"), idx.holder("i1", 1, "cpu")
    hs = digests(100)
    idx.admit(a, hs)
    idx.admit(b, hs[:10])
    assert idx.clear_holder(a) == 100
    assert len(idx) == 10 and idx.count(a) == 0
    idx.release_holder(b)
    assert len(idx) == 0
    assert idx.holder("i9", 0, "disk") == b  # freed ids are reused
    assert idx.prefix_lengths(hs, [[b]]).tolist() == [0]


def test_more_than_64_holders_grows_the_bit_matrix():
    idx = ChunkIndex()
    hs = digests(20)
    holders = [idx.holder(f"i{i}", 0, "cpu") for i in range(130)]
    assert idx.words == 3
    for n, hid in enumerate(holders):
        idx.admit(hid, hs[: n % 21])
    counts = idx.prefix_lengths(hs, [[h] for h in holders]).tolist()
    assert counts == [n % 21 for n in range(130)]


def test_growth_and_rebuild_keep_everything():
    idx = ChunkIndex(capacity=4)
    hid = idx.holder("i", 0, "cpu")
    hs = digests(5000)
    for i in range(0, 5000, 333):
        idx.admit(hid, hs[i : i + 333])
    assert len(idx) == 5000
    idx.evict(hid, hs[:4000])
    fresh = digests(3000)  # dead rows are reclaimed instead of growing forever
    idx.admit(hid, fresh)
    assert len(idx) == 4000
    assert idx.prefix_lengths(hs[4000:], [[hid]]).tolist() == [1000]
    assert idx.prefix_lengths(fresh, [[hid]]).tolist() == [3000]


def test_all_zero_digest_is_a_key_like_any_other():
    idx = ChunkIndex()
    hid = idx.holder("i", 0, "cpu")
    zero = bytes(16)
    assert idx.admit(hid, [zero]) == 1
    assert idx.prefix_lengths([zero], [[hid]]).tolist() == [1]
    assert hashes_to_array([zero]).any()


ops = st.lists(
    st.tuples(
        st.sampled_from(["admit", "evict", "clear"]),
        st.integers(0, 4),
        st.lists(st.integers(0, 60), max_size=40),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_matches_a_dict_of_sets_model(script):
    pool = [i.to_bytes(16, "little") for i in range(61)]
    idx = ChunkIndex(capacity=4)
    hids = [idx.holder(f"i{i}", i % 2, "cpu") for i in range(5)]
    model: dict[bytes, set[int]] = {}
    for op, h, items in script:
        hashes = [pool[i] for i in items]
        if op == "admit":
            expected = len({x for x in hashes if h not in model.get(x, set())})
            assert idx.admit(hids[h], hashes) == expected
            for x in hashes:
                model.setdefault(x, set()).add(h)
        elif op == "evict":
            expected = len({x for x in hashes if h in model.get(x, set())})
            assert idx.evict(hids[h], hashes) == expected
            for x in hashes:
                model.get(x, set()).discard(h)
        else:
            idx.clear_holder(hids[h])
            for holders in model.values():
                holders.discard(h)
        assert len(idx) == sum(1 for v in model.values() if v)
        for k in range(5):
            assert idx.count(hids[k]) == sum(1 for v in model.values() if k in v)
    present = idx.presence(pool)
    for i, x in enumerate(pool):
        assert {k for k in range(5) if present[i, hids[k]]} == model.get(x, set())
    assert isinstance(present, np.ndarray)


def test_a_holders_digest_follows_admits_evicts_and_clears_as_the_agent_computes_it():
    from kvstacks.agent import digest
    from kvstacks.keys import CacheKey

    keys = [CacheKey("m", "kv", 1, 0, h) for h in digests(300)]
    hashes = [k.chunk_hash for k in keys]
    idx = ChunkIndex(capacity=16)  # grows and rebuilds on the way
    holders = [idx.holder("i", w, "cpu") for w in range(70)]  # past one word of the bit matrix
    h = holders[-1]
    assert idx.digest(h) == (0, "0" * 32) == tuple(digest([]).values())
    idx.admit(h, hashes[:200])
    idx.admit(h, hashes[100:])  # the overlap counts once
    idx.admit(holders[0], hashes)  # another holder's chunks change nothing here
    idx.evict(h, hashes[:50])
    idx.evict(h, hashes[:10])  # no longer held: no change
    expected = digest(keys[50:])
    assert idx.digest(h) == (expected["chunks"], expected["xor"]) == (250, expected["xor"])
    assert idx.digest(h) != tuple(digest(keys[51:]).values())
    idx.clear_holder(h)
    assert idx.digest(h) == (0, "0" * 32)
