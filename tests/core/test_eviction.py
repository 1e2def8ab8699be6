"""The builtin eviction policies: the conformance kit, then each policy's own ordering."""

from __future__ import annotations

import pytest
from kvstacks.builtin.eviction import FIFO, LFU, LRU, S3FIFO
from kvstacks.plugins import registry
from kvstacks.testing import EvictionPolicyConformance


class TestFIFOConformance(EvictionPolicyConformance):
    @pytest.fixture
    def policy(self):
        return FIFO()


class TestLRUConformance(EvictionPolicyConformance):
    @pytest.fixture
    def policy(self):
        return LRU()


class TestLFUConformance(EvictionPolicyConformance):
    @pytest.fixture
    def policy(self):
        return LFU()


class TestS3FIFOConformance(EvictionPolicyConformance):
    @pytest.fixture
    def policy(self):
        return S3FIFO()


class TestS3FIFOTinySmallQueueConformance(EvictionPolicyConformance):
    large_n = 20_000

    @pytest.fixture
    def policy(self):
        return S3FIFO(S3FIFO.Options(small_ratio=0.01, ghost_ratio=0.0))


def drain(policy) -> list:
    out = []
    while (key := policy.pop_victim()) is not None:
        out.append(key)
    return out


def test_registered_under_their_names():
    reg = registry()
    for cls in (FIFO, LRU, LFU, S3FIFO):
        assert reg.get("eviction_policies", cls.name) is cls
        assert reg.entries["eviction_policies"][cls.name].distribution == "kvstacks"


def test_fifo_ignores_hits_and_readmission():
    policy = FIFO()
    for key in "abcd":
        policy.insert(key, 1)
    policy.access("a")
    policy.insert("b", 5)
    assert drain(policy) == list("abcd")


def test_lru_evicts_least_recently_used():
    policy = LRU()
    for key in "abcd":
        policy.insert(key, 1)
    policy.access("a")
    policy.access("c")
    policy.insert("b", 1)  # re-admission counts as a use
    assert drain(policy) == list("dacb")


def test_lru_removed_then_reinserted_key_is_newest():
    policy = LRU()
    for key in "abc":
        policy.insert(key, 1)
    policy.remove("a")
    policy.insert("a", 1)
    assert drain(policy) == list("bca")


def test_lfu_evicts_least_frequent_oldest_first_on_ties():
    policy = LFU()
    for key in "abcde":
        policy.insert(key, 1)
    for key, hits in {"a": 3, "b": 1, "c": 0, "d": 1, "e": 2}.items():
        for _ in range(hits):
            policy.access(key)
    assert policy.frequency("a") == 4 and policy.frequency("c") == 1 and policy.frequency("zz") == 0
    # c (1); b and d (2) in the order they reached 2; e (3); a (4)
    assert drain(policy) == list("cbdea")


def test_lfu_new_key_goes_before_hit_keys_and_readmission_keeps_count():
    policy = LFU()
    policy.insert("hot", 1)
    policy.access("hot")
    policy.insert("new", 1)
    policy.insert("hot", 1)
    assert policy.frequency("hot") == 2
    assert drain(policy) == ["new", "hot"]


def test_lfu_bucket_list_stays_consistent_under_removals():
    policy = LFU()
    for i in range(10):
        policy.insert(i, 1)
        for _ in range(i):
            policy.access(i)
    for i in (0, 5, 9):
        policy.remove(i)
    policy.access(4)  # 4 now has frequency 6, like 5 had
    assert drain(policy) == [1, 2, 3, 4, 6, 7, 8]


def test_s3fifo_one_hit_wonders_leave_from_the_small_queue():
    policy = S3FIFO()
    # A warm working set, hit while in the small queue, gets promoted to main.
    for i in range(10):
        policy.insert(f"hot{i}", 1)
        policy.access(f"hot{i}")
    # A scan of one-off chunks.
    for i in range(100):
        policy.insert(f"scan{i}", 1)
    # The small queue empties down to its 10% share (1 of 11 keys) before main loses anything.
    victims = [policy.pop_victim() for _ in range(99)]
    assert victims == [f"scan{i}" for i in range(99)], "a scan must not push out the hit working set"
    assert all(policy.queue_of(f"hot{i}") == "main" for i in range(10))
    # The ghost remembers as many keys as main holds (10): the latest scans only.
    assert policy.queue_of("scan98") == "ghost" and policy.queue_of("scan0") is None
    assert policy.pop_victim() == "hot0"  # at its share, the small queue keeps scan99


def test_s3fifo_ghost_hit_goes_to_main():
    policy = S3FIFO()
    for i in range(20):
        policy.insert(i, 1)
    first = policy.pop_victim()
    assert first == 0 and policy.queue_of(0) == "ghost"
    policy.access(0)  # not held: ignored
    policy.insert(0, 1)
    assert policy.queue_of(0) == "main"
    assert 0 in policy and len(policy) == 20


def test_s3fifo_main_queue_gives_hit_keys_another_round_capped_at_three():
    policy = S3FIFO(S3FIFO.Options(small_ratio=0.1, ghost_ratio=1.0))
    for key in "ab":
        policy.insert(key, 1)
        policy.access(key)
    # Both promoted to main with their counts reset.
    policy.insert("x", 1)
    assert policy.pop_victim() == "x"  # x was in small with no hits; a and b went to main on the way
    assert policy.queue_of("a") == "main" and policy.queue_of("b") == "main"
    for _ in range(10):
        policy.access("a")  # capped at 3
    # b (0 hits in main) goes first; a has three rounds, then goes.
    assert policy.pop_victim() == "b"
    assert policy.pop_victim() == "a"
    assert policy.pop_victim() is None


def test_s3fifo_small_queue_bytes_drive_the_choice():
    policy = S3FIFO(S3FIFO.Options(small_ratio=0.1))
    policy.insert("big-main", 1)
    policy.access("big-main")
    policy.insert("filler", 1)
    assert policy.pop_victim() == "filler"  # promotes big-main, evicts filler
    policy.insert("big-main", 1000)  # size update of a held key
    policy.insert("small", 50)  # 50 < 10% of 1050: under target, so main is evicted first
    assert policy.pop_victim() == "big-main"
    assert policy.pop_victim() == "small"


def test_s3fifo_rejects_bad_options():
    with pytest.raises(ValueError, match="small_ratio"):
        S3FIFO(S3FIFO.Options(small_ratio=1.5))
    with pytest.raises(ValueError, match="ghost_ratio"):
        S3FIFO(S3FIFO.Options(ghost_ratio=-1))


@pytest.mark.parametrize("cls", [FIFO, LRU, LFU, S3FIFO])
def test_hit_rate_on_skewed_workload_beats_nothing(cls):
    """A sanity check that each policy keeps something useful on a Zipf-like trace (not a ranking)."""
    import random

    rng = random.Random(7)
    policy = cls()
    capacity, hits, held = 100, 0, set()
    weights = [1 / (i + 1) for i in range(2000)]
    trace = rng.choices(range(2000), weights=weights, k=20000)
    for key in trace:
        if key in held:
            hits += 1
            policy.access(key)
            continue
        if len(held) >= capacity:
            held.discard(policy.pop_victim())
        policy.insert(key, 1)
        held.add(key)
    assert len(policy) == len(held) == capacity
    assert hits / len(trace) > 0.2, f"{cls.name} hit rate {hits / len(trace):.2f}"
