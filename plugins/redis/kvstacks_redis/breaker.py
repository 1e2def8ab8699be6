"""The circuit breaker (kvstacks.breaker) as the redis tier uses it."""

from __future__ import annotations

from kvstacks.breaker import CLOSED, HALF_OPEN, OPEN, StoreUnavailable
from kvstacks.breaker import CircuitBreaker as StoreBreaker

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "CircuitBreaker", "RedisUnavailable"]


class RedisUnavailable(StoreUnavailable):
    """Redis cannot be reached (or the breaker is open because it could not be recently)."""


class CircuitBreaker(StoreBreaker):
    service = "Redis"
    error = RedisUnavailable
