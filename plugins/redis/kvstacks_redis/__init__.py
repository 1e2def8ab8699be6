"""kvstacks-redis: the ``redis`` tier backend (standalone, Sentinel or Cluster)."""

from kvstacks import hookimpl

from kvstacks_redis.backend import RedisBackend
from kvstacks_redis.breaker import CircuitBreaker, RedisUnavailable

__all__ = ["CircuitBreaker", "RedisBackend", "RedisUnavailable"]


@hookimpl
def register_backends(register) -> None:
    register(RedisBackend)
