"""A circuit breaker, so a dead remote store costs callers microseconds instead of timeouts.

closed: calls go through; ``threshold`` consecutive connection failures open it.
open: calls fail at once with ``error`` (a :class:`StoreUnavailable`) until the backoff elapses.
half-open: one call (the probe) goes through; others still fail fast. Success
closes the breaker and resets the backoff; failure reopens it with the backoff
doubled (up to ``backoff_max``, with jitter so many instances do not probe in step).

Remote tiers (Redis, Mooncake) subclass it to name their store and their exception.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from kvstacks.errors import KVStacksError

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class StoreUnavailable(KVStacksError, ConnectionError):
    """A remote store cannot be reached (or the breaker is open because it could not be recently)."""


class CircuitBreaker:
    #: how messages name the store, and what ``check`` raises
    service: str = "the store"
    error: type[StoreUnavailable] = StoreUnavailable

    def __init__(
        self,
        threshold: int = 3,
        backoff: float = 0.5,
        backoff_max: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        jitter: float = 0.1,
    ) -> None:
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        self.threshold = threshold
        self.backoff_initial = backoff
        self.backoff_max = backoff_max
        self.clock = clock
        self.jitter = jitter
        self.state = CLOSED
        self.failures = 0
        self.backoff = backoff
        self.retry_at = 0.0
        self.probing = False
        self.opened = 0  # how many times it opened, for stats
        self.last_error = ""

    def allow(self) -> bool:
        """Whether a call may go to the server now (may turn open into half-open)."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN and self.clock() >= self.retry_at:
            self.state = HALF_OPEN
            self.probing = False
        if self.state == HALF_OPEN and not self.probing:
            self.probing = True
            return True
        return False

    def check(self) -> None:
        """Raise ``error`` unless a call may go through."""
        if not self.allow():
            wait = max(0.0, self.retry_at - self.clock())
            raise self.error(
                f"{self.service} is unreachable (circuit breaker {self.state}, next probe in {wait:.1f}s"
                f"{'; last error: ' + self.last_error if self.last_error else ''})"
            )

    def success(self) -> None:
        self.state = CLOSED
        self.failures = 0
        self.backoff = self.backoff_initial
        self.probing = False

    def abandon(self) -> None:
        """The call let through was cancelled before it could tell: let another probe."""
        if self.state == HALF_OPEN:
            self.probing = False

    def failure(self, error: str = "") -> None:
        self.last_error = error
        self.failures += 1
        if self.state == HALF_OPEN:
            self._open(self.backoff * 2)
        elif self.state == CLOSED and self.failures >= self.threshold:
            self._open(self.backoff_initial)

    def trip(self, error: str = "") -> None:
        """Open now (the store was unreachable at start: no point in several more failures)."""
        self.last_error = error
        self.failures = max(self.failures, self.threshold)
        self._open(self.backoff if self.state != CLOSED else self.backoff_initial)

    def _open(self, backoff: float) -> None:
        self.backoff = min(backoff, self.backoff_max)
        delay = self.backoff * (1 + random.uniform(-self.jitter, self.jitter))
        self.state = OPEN
        self.probing = False
        self.retry_at = self.clock() + delay
        self.opened += 1
