"""The circuit breaker's state machine, on a fake clock."""

from __future__ import annotations

import pytest
from kvstacks_redis.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, RedisUnavailable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, **kw) -> CircuitBreaker:
    return CircuitBreaker(threshold=3, backoff=1.0, backoff_max=8.0, clock=clock, jitter=0.0, **kw)


def test_opens_after_threshold_consecutive_failures():
    clock = Clock()
    b = breaker(clock)
    for _ in range(2):
        assert b.allow()
        b.failure("refused")
    assert b.state == CLOSED
    b.success()  # a success in between resets the count
    for _ in range(2):
        b.failure("refused")
    assert b.state == CLOSED
    b.failure("connection refused")
    assert b.state == OPEN
    assert not b.allow()
    with pytest.raises(RedisUnavailable, match="circuit breaker open.*connection refused"):
        b.check()


def test_half_open_lets_exactly_one_probe_through():
    clock = Clock()
    b = breaker(clock)
    b.trip("down at start")
    assert b.state == OPEN
    clock.now += 0.99
    assert not b.allow()
    clock.now += 0.02
    assert b.allow()  # the probe
    assert b.state == HALF_OPEN
    assert not b.allow(), "a second caller must not probe while the first is out"
    b.success()
    assert b.state == CLOSED
    assert b.allow() and b.allow()


def test_failed_probes_double_the_backoff_up_to_the_cap():
    clock = Clock()
    b = breaker(clock)
    b.trip()
    waits = []
    for _ in range(6):
        waits.append(b.retry_at - clock.now)
        clock.now = b.retry_at
        assert b.allow()
        b.failure("still down")
        assert b.state == OPEN
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    clock.now = b.retry_at
    assert b.allow()
    b.success()
    b.trip()
    assert b.retry_at - clock.now == 1.0, "success resets the backoff"


def test_abandoned_probe_lets_the_next_caller_probe():
    clock = Clock()
    b = breaker(clock)
    b.trip()
    clock.now += 5
    assert b.allow()
    b.abandon()  # the probing call was cancelled before it learnt anything
    assert b.allow()


def test_jitter_stays_within_its_fraction():
    clock = Clock()
    b = CircuitBreaker(threshold=1, backoff=10.0, clock=clock, jitter=0.1)
    for _ in range(50):
        b.success()
        b.failure()
        assert 9.0 <= b.retry_at - clock.now <= 11.0
