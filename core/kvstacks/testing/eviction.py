"""Conformance tests for eviction policies (:class:`kvstacks.eviction.EvictionPolicy`)."""

from __future__ import annotations

import random
import sys
from typing import Any, Callable, Hashable

import pytest

from kvstacks.eviction import EvictionPolicy
from kvstacks.keys import CacheKey


def _traced_steps(policy_factory: Callable[[], EvictionPolicy], n: int, ops: int = 300) -> int:
    """Python calls and lines executed by ``ops`` rounds of insert/access/remove/pop on a policy of ``n`` keys."""
    policy = policy_factory()
    rng = random.Random(n)
    for i in range(n):
        policy.insert(i, 1)
        if i % 3 == 0:
            policy.access(rng.randrange(i + 1))
    picks = [(rng.randrange(n + j + 1), rng.randrange(n + j + 1)) for j in range(ops)]
    steps = 0

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        nonlocal steps
        steps += 1
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        for j, (hit, gone) in enumerate(picks):
            policy.insert(n + j, 1)
            policy.access(hit)
            policy.remove(gone)
            policy.pop_victim()
    finally:
        sys.settrace(previous)
    return steps


def _drain(policy: EvictionPolicy, limit: int) -> list[Hashable]:
    popped = []
    for _ in range(limit + 1):
        victim = policy.pop_victim()
        if victim is None:
            return popped
        popped.append(victim)
    raise AssertionError(f"pop_victim kept returning keys after {limit} pops of {limit} keys")


class EvictionPolicyConformance:
    """Subclass as ``TestMyPolicy`` and define a ``policy`` fixture returning a fresh policy.

    Checks the contract every policy shares (not the order it picks victims in:
    test that separately).
    """

    #: keys in the large run that a policy with an O(n) step could not finish in reasonable time
    large_n: int = 100_000
    #: operations in the randomised model check
    random_ops: int = 20_000
    #: policy sizes compared by the operation-cost test
    cost_sizes: tuple[int, int] = (2_000, 20_000)

    @pytest.fixture
    def policy(self) -> EvictionPolicy:
        pytest.fail(
            f"{type(self).__name__} must define a `policy` fixture that returns a fresh EvictionPolicy "
            "(see docs/plugin-authors.md, 'Conformance kit')",
            pytrace=False,
        )

    @pytest.fixture
    def kit_policy(self, policy: Any) -> EvictionPolicy:
        if not isinstance(policy, EvictionPolicy):
            pytest.fail(f"the `policy` fixture returned {type(policy).__name__}, not a kvstacks EvictionPolicy",
                        pytrace=False)
        return policy

    def test_declares_a_name(self, kit_policy: EvictionPolicy) -> None:
        assert isinstance(kit_policy.name, str) and kit_policy.name

    def test_empty_policy(self, kit_policy: EvictionPolicy) -> None:
        assert len(kit_policy) == 0
        assert kit_policy.pop_victim() is None
        assert "absent" not in kit_policy
        kit_policy.remove("absent")  # ignored
        kit_policy.access("absent")  # ignored: the tier accesses pinned keys the policy does not hold
        assert len(kit_policy) == 0 and "absent" not in kit_policy
        assert kit_policy.pop_victim() is None

    def test_insert_len_contains(self, kit_policy: EvictionPolicy) -> None:
        for i in range(50):
            kit_policy.insert(i, 100 + i)
            assert len(kit_policy) == i + 1
        assert all(i in kit_policy for i in range(50))
        assert 50 not in kit_policy

    def test_popped_key_is_forgotten(self, kit_policy: EvictionPolicy) -> None:
        for i in range(10):
            kit_policy.insert(i, 1)
        victim = kit_policy.pop_victim()
        assert victim in range(10), f"pop_victim returned {victim!r}, which was never inserted"
        assert victim not in kit_policy
        assert len(kit_policy) == 9

    def test_every_key_popped_exactly_once(self, kit_policy: EvictionPolicy) -> None:
        keys = [f"k{i}" for i in range(300)]
        for i, key in enumerate(keys):
            kit_policy.insert(key, 10)
            if i % 3 == 0:
                kit_policy.access(keys[i // 2])
        for key in keys[::7]:
            kit_policy.access(key)
        popped = _drain(kit_policy, len(keys))
        assert sorted(popped) == sorted(keys), "every inserted key must be popped exactly once"
        assert len(kit_policy) == 0
        assert kit_policy.pop_victim() is None

    def test_removed_keys_are_never_popped(self, kit_policy: EvictionPolicy) -> None:
        for i in range(100):
            kit_policy.insert(i, 1)
        for i in range(50):
            kit_policy.access(i)
        removed = set(range(0, 100, 3))
        for key in removed:
            kit_policy.remove(key)
            kit_policy.remove(key)  # twice is fine
        assert len(kit_policy) == 100 - len(removed)
        assert not any(k in kit_policy for k in removed)
        popped = _drain(kit_policy, 100)
        assert sorted(popped) == sorted(set(range(100)) - removed)

    def test_reinserting_a_held_key_does_not_duplicate_it(self, kit_policy: EvictionPolicy) -> None:
        for i in range(5):
            kit_policy.insert(i, 1)
        kit_policy.insert(2, 2)
        assert len(kit_policy) == 5
        assert sorted(_drain(kit_policy, 5)) == [0, 1, 2, 3, 4]

    def test_key_can_come_back_after_eviction(self, kit_policy: EvictionPolicy) -> None:
        for i in range(20):
            kit_policy.insert(i, 1)
        gone = _drain(kit_policy, 20)
        for key in gone[:10]:
            kit_policy.insert(key, 1)
            kit_policy.access(key)
        assert len(kit_policy) == 10
        assert sorted(_drain(kit_policy, 10)) == sorted(gone[:10])

    def test_cache_keys_work_as_keys(self, kit_policy: EvictionPolicy) -> None:
        keys = [CacheKey("m", "kv", 1, 0, bytes([i]) * 16) for i in range(8)]
        for key in keys:
            kit_policy.insert(key, 4096)
        kit_policy.access(keys[0])
        kit_policy.remove(keys[1])
        assert sorted(_drain(kit_policy, 8), key=lambda k: k.chunk_hash) == [k for k in keys if k != keys[1]]

    def test_random_operations_match_a_model(self, kit_policy: EvictionPolicy) -> None:
        """Against a plain set: whatever the order, the policy must hold exactly the live keys."""
        rng = random.Random(1234)
        live: set[int] = set()
        next_key = 0
        for step in range(self.random_ops):
            op = rng.random()
            if op < 0.4 or not live:
                kit_policy.insert(next_key, rng.randrange(1, 1 << 20))
                live.add(next_key)
                next_key += 1
            elif op < 0.7:
                kit_policy.access(rng.randrange(next_key))  # sometimes a key that left
            elif op < 0.85:
                key = rng.randrange(next_key)
                kit_policy.remove(key)
                live.discard(key)
            else:
                victim = kit_policy.pop_victim()
                assert victim in live, f"step {step}: pop_victim returned {victim!r}, not a live key"
                live.discard(victim)
            if step % 97 == 0:
                assert len(kit_policy) == len(live), f"step {step}: len {len(kit_policy)} != {len(live)} live keys"
                probe = rng.randrange(next_key)
                assert (probe in kit_policy) == (probe in live), f"step {step}: `{probe} in policy` is wrong"
        assert sorted(_drain(kit_policy, len(live))) == sorted(live)

    def test_large_run_finishes(self, kit_policy: EvictionPolicy) -> None:
        """``large_n`` keys through every operation: an O(n) step makes this quadratic and it times out.

        Deliberately not timed (timing on shared machines is noise); pytest-timeout is the bound.
        """
        n = self.large_n
        for i in range(n):
            kit_policy.insert(i, 4096)
        for i in range(0, n, 2):
            kit_policy.access(i)
        for i in range(0, n, 5):
            kit_policy.remove(i)
        for i in range(n, n + n // 2):
            kit_policy.insert(i, 4096)
            kit_policy.access(i - n // 3)
            kit_policy.pop_victim()
        expected = n - len(range(0, n, 5))
        assert len(kit_policy) == expected
        assert len(_drain(kit_policy, expected)) == expected

    def test_cost_per_operation_does_not_grow(self, kit_policy: EvictionPolicy) -> None:
        """The same 300 rounds of operations on a 10x larger policy must not execute many more Python steps.

        Deterministic (it counts traced calls and lines, never time), so it catches
        a Python loop over the keys in any operation. It cannot see an O(n) C-level
        call such as ``list.pop(0)``; ``test_large_run_finishes`` is the net for those.
        """
        cls, options = type(kit_policy), kit_policy.options

        def factory() -> EvictionPolicy:  # fresh policies with the fixture's options
            return cls(options)

        small, large = self.cost_sizes
        cost_small = _traced_steps(factory, small)
        cost_large = _traced_steps(factory, large)
        assert cost_large <= 2 * cost_small + 1000, (
            f"{kit_policy.name}: 300 rounds of operations took {cost_small} Python steps with {small} keys "
            f"but {cost_large} with {large}: some operation is not O(1)"
        )
