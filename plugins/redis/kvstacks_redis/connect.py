"""Options of the redis tier, and how they become redis-py clients (asyncio for the
tier's commands, synchronous for the worker threads that move values).

Secrets never sit in the YAML: ``username_env``/``password_env`` name environment
variables, read when the client is built. A URL that carries a password is refused,
and nothing here puts a credential in a message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import redis
import redis.retry
import redis.sentinel
from kvstacks.config import Size
from kvstacks.errors import ConfigError
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff, NoBackoff

SCHEMES = ("redis", "rediss", "unix")
#: limits of ``part_bytes``: a first part must hold the frame's length fields, and smaller
#: parts would cost more in commands than they save; Redis refuses strings over 512 MiB
MIN_PART = 64 << 10
MAX_PART = 512 << 20


@dataclass
class RedisOptions:
    #: redis://host:port/db, rediss://host:port/db (TLS) or unix:///path/to/redis.sock?db=0.
    #: In cluster mode: any node of the cluster. In sentinel mode: a sentinel.
    url: str = "redis://127.0.0.1:6379/0"
    mode: Literal["standalone", "cluster", "sentinel"] = "standalone"
    #: more sentinels (host:port) besides the one in ``url``, in sentinel mode
    sentinels: list[str] = field(default_factory=list)
    #: the master's name as the sentinels know it, in sentinel mode
    service: str = "mymaster"
    #: names of environment variables holding the ACL username and the password
    username_env: str | None = None
    password_env: str | None = None
    #: TLS (rediss:// only): CA bundle to trust, client certificate and its key
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_check_hostname: bool = True
    #: every key this tier writes starts with it; several models or stacks can share a server
    prefix: str = "kvstacks:"
    #: seconds a chunk lives in Redis after it is written (none: until evicted or removed)
    ttl: float | None = None
    #: connections per server for commands, and how many calls may be in flight at once;
    #: as many again (standalone, Sentinel), each with a worker thread, move values
    pool_size: int = 8
    connect_timeout: float = 1.0
    #: seconds any single read or write on a socket may take before the call fails
    timeout: float = 10.0
    #: in cluster mode a batch is sent as pipelines of at most this many bytes each
    pipeline_bytes: Size = Size(64 << 20)
    #: a chunk frame longer than this is stored as several values of at most this size
    #: (Redis faults in every page of a value of 8 MiB or more afresh; 4 MiB ones reuse them)
    part_bytes: Size = Size(4 << 20)
    #: idle receive buffers kept for the next reads (after the engine releases a chunk);
    #: keep room for the chunks of one prefix (8 frames of 32 MiB chunks need a little
    #: over 256 MiB: each frame is a header and a checksum longer)
    read_buffers: Size = Size(264 << 20)
    #: consecutive connection failures that open the circuit breaker
    breaker_failures: int = 3
    #: first wait (seconds) before probing a dead server; doubles each failed probe
    breaker_backoff: float = 0.5
    breaker_backoff_max: float = 30.0
    #: how long close() may wait for connections to shut down
    close_timeout: float = 2.0


def validate(o: RedisOptions) -> None:
    """Check what the dataclass types cannot; errors name the option and the fix."""
    parts = urlsplit(o.url)
    if parts.scheme not in SCHEMES:
        raise ConfigError("url", f"{parts.scheme or o.url!r} is not a supported scheme; use redis://, rediss:// or unix://")
    if parts.password is not None or "password" in parse_qs(parts.query):
        raise ConfigError(
            "url", "must not contain a password; put it in an environment variable and name that variable in password_env"
        )
    if o.mode == "cluster" and parts.scheme == "unix":
        raise ConfigError("mode", "Redis Cluster is reached over TCP; use a redis:// or rediss:// url of any node")
    if o.mode == "sentinel" and parts.scheme == "unix":
        raise ConfigError("url", "in sentinel mode the url names a sentinel (redis://host:26379)")
    if parts.scheme != "unix" and not parts.hostname:
        raise ConfigError("url", "names no host; e.g. redis://127.0.0.1:6379/0")
    for name in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(o, name)
        if path is None:
            continue
        if parts.scheme != "rediss":
            raise ConfigError(name, "TLS options need a rediss:// url")
        if not path.is_file():
            raise ConfigError(name, f"{path} is not a readable file")
    if (o.tls_cert is None) != (o.tls_key is None):
        raise ConfigError("tls_cert", "a client certificate needs both tls_cert and tls_key")
    if not o.prefix:
        raise ConfigError("prefix", "must not be empty: clear() removes every key under it")
    if o.ttl is not None and o.ttl <= 0:
        raise ConfigError("ttl", f"must be a positive number of seconds, got {o.ttl}")
    for name in ("pool_size", "breaker_failures"):
        if getattr(o, name) < 1:
            raise ConfigError(name, f"must be at least 1, got {getattr(o, name)}")
    for name in ("connect_timeout", "timeout", "breaker_backoff", "breaker_backoff_max", "close_timeout"):
        if getattr(o, name) <= 0:
            raise ConfigError(name, f"must be a positive number of seconds, got {getattr(o, name)}")
    if o.pipeline_bytes < 1:
        raise ConfigError("pipeline_bytes", "must be positive")
    if not MIN_PART <= o.part_bytes <= MAX_PART:
        raise ConfigError(
            "part_bytes", f"must be between 64KiB and 512MiB (Redis' largest string), got {int(o.part_bytes)} bytes"
        )
    for address in o.sentinels:
        _host_port(address, "sentinels")
    _secret(o.username_env, "username_env")
    _secret(o.password_env, "password_env")


def redacted(url: str) -> str:
    """``url`` fit for a log line: no password and no query string."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    return f"{parts.scheme}://{netloc}{parts.path}"


def _host_port(address: str, option: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(option, f"{address!r} is not host:port")
    return host, int(port)


def _secret(env_name: str | None, option: str) -> str | None:
    if env_name is None:
        return None
    value = os.environ.get(env_name)
    if value is None:
        raise ConfigError(option, f"environment variable {env_name!r} is not set; export it before starting")
    return value


def connection_kwargs(o: RedisOptions) -> dict[str, Any]:
    kw: dict[str, Any] = {
        "socket_connect_timeout": o.connect_timeout,
        "socket_timeout": o.timeout,
        # big replies arrive in a few large reads instead of hundreds of 64 KiB ones
        "socket_read_size": 1 << 20,
        "health_check_interval": 0,
        "client_name": "kvstacks",
    }
    if urlsplit(o.url).scheme != "unix":
        kw["socket_keepalive"] = True
    username = _secret(o.username_env, "username_env")
    password = _secret(o.password_env, "password_env")
    if username is not None:
        kw["username"] = username
    if password is not None:
        kw["password"] = password
    if urlsplit(o.url).scheme == "rediss":
        kw["ssl_check_hostname"] = o.tls_check_hostname
        if o.tls_ca is not None:
            kw["ssl_ca_certs"] = str(o.tls_ca)
        if o.tls_cert is not None:
            kw["ssl_certfile"] = str(o.tls_cert)
            kw["ssl_keyfile"] = str(o.tls_key)
    return kw


def build_client(o: RedisOptions) -> Redis | RedisCluster:
    """The client for ``o``. It connects lazily: building it never touches the network."""
    validate(o)
    kw = connection_kwargs(o)
    if o.mode == "cluster":
        # one retry lets a client ride over a failover (it refreshes the slot map);
        # the tier above retries too, so more would only delay failing fast
        return RedisCluster.from_url(
            o.url, max_connections=o.pool_size, retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 1), **kw
        )
    no_retry = Retry(NoBackoff(), 0)
    if o.mode == "sentinel":
        addresses, sentinel_kw, db = _sentinel_setup(o, kw)
        sentinel = Sentinel(addresses, sentinel_kwargs=sentinel_kw, retry=no_retry, db=db, **kw)
        return sentinel.master_for(o.service, max_connections=o.pool_size, retry=no_retry)
    return Redis.from_url(o.url, max_connections=o.pool_size, retry=no_retry, **kw)


def build_sync_client(o: RedisOptions) -> redis.Redis | None:
    """A synchronous client to the same server for the tier's worker threads (``lanes.py``),
    with ``pool_size`` connections of its own; None in cluster mode, where values go
    through redis-py's cluster pipeline. It connects lazily too."""
    validate(o)
    if o.mode == "cluster":
        return None
    kw = connection_kwargs(o)
    no_retry = redis.retry.Retry(NoBackoff(), 0)
    if o.mode == "sentinel":
        addresses, sentinel_kw, db = _sentinel_setup(o, kw)
        sentinel = redis.sentinel.Sentinel(addresses, sentinel_kwargs=sentinel_kw, retry=no_retry, db=db, **kw)
        return sentinel.master_for(o.service, max_connections=o.pool_size, retry=no_retry)
    return redis.Redis.from_url(o.url, max_connections=o.pool_size, retry=no_retry, **kw)


def _sentinel_setup(o: RedisOptions, kw: dict[str, Any]) -> tuple[list[tuple[str, int]], dict[str, Any], int]:
    """The sentinels' addresses, the options to reach them and the db; sets TLS in ``kw``."""
    parts = urlsplit(o.url)
    addresses = [(parts.hostname, parts.port or 26379)] + [_host_port(a, "sentinels") for a in o.sentinels]
    path = parts.path.strip("/")
    db = int(path) if path.isdigit() else 0
    sentinel_kw = {k: v for k, v in kw.items() if k.startswith(("socket_", "ssl"))}
    if parts.scheme == "rediss":
        sentinel_kw["ssl"] = True
        kw["ssl"] = True
    return addresses, sentinel_kw, db
