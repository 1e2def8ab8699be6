"""Options of the mooncake tier, checked when the YAML is read so errors carry their YAML path."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kvstacks.config import Size
from kvstacks.errors import ConfigError


@dataclass
class MooncakeOptions:
    #: the mooncake_master's RPC address, host:port
    master: str = "127.0.0.1:50051"
    #: where transfer engines find each other: P2PHANDSHAKE (no server), or an
    #: http://host:port/metadata or etcd://host:port URL
    metadata_server: str = "P2PHANDSHAKE"
    protocol: Literal["tcp", "rdma"] = "tcp"
    #: RDMA devices (e.g. mlx5_0,mlx5_1); empty picks them automatically
    device: str = ""
    #: the address this process advertises to the others; also MC_TCP_BIND_ADDRESS
    local_hostname: str = "127.0.0.1"
    #: memory this process lends the store; chunks of any instance may land in it. 0 lends none:
    #: this process is then only a client of the other processes' segments
    segment_bytes: Size = Size(1 << 30)
    #: the client's own staging buffer (the zero-copy paths do not use it)
    local_buffer_bytes: Size = Size(64 << 20)
    #: registered memory this tier reads chunks into; a chunk's bytes stay there until the engine releases it
    read_buffer_bytes: Size = Size(512 << 20)
    #: the engine's buffers (chunks being written) stay registered with the store up to this many bytes
    register_bytes: Size = Size(1 << 30)
    #: copies of each chunk, on distinct segments (a dead owner takes one copy with it)
    replica_num: int = 1
    #: every key this tier writes starts with it; clear() removes every key under it
    prefix: str = "kvstacks:"
    #: remove and clear ignore the read leases Mooncake holds for 10 s after any read. Safe here:
    #: every read is checksummed, so a reader that loses the race sees a miss, never bad bytes
    force_remove: bool = True
    #: seconds to reach the master at start (and at each reconnect attempt)
    connect_timeout: float = 5.0
    #: seconds any single call may take before it fails (the call's thread is left behind)
    timeout: float = 5.0
    #: threads making Mooncake calls (which block) at once
    threads: int = 4
    #: a batch is sent and read in up to this many parts, the checksums of one computed while
    #: another is in transfer. More than 1 pays one master round trip and one thread hand-off per
    #: part: it lost on the loaded 2-core machine it was measured on (docs/tiers-mooncake.md)
    pipeline_parts: int = 1
    #: consecutive failures that open the circuit breaker, first and longest wait before a probe
    breaker_failures: int = 3
    breaker_backoff: float = 0.5
    breaker_backoff_max: float = 30.0
    #: on close, keep the client (and its segment, with the chunks in it) for the next tier of this
    #: process with the same settings; false closes it, which blocks every thread of the process
    #: for about 2 s (Mooncake's close holds the GIL)
    keep_client: bool = True
    #: how long close() may wait for the client to shut down
    close_timeout: float = 5.0

    def __post_init__(self) -> None:
        host, sep, port = self.master.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError("master", f"{self.master!r} is not host:port, e.g. 127.0.0.1:50051")
        md = self.metadata_server
        if md != "P2PHANDSHAKE" and not md.startswith(("http://", "https://", "etcd://", "redis://")):
            raise ConfigError("metadata_server",
                              f"{md!r} is not P2PHANDSHAKE or an http://, etcd:// or redis:// address")
        if not self.local_hostname or ":" in self.local_hostname:
            raise ConfigError("local_hostname", f"{self.local_hostname!r} must be a host name or IPv4 address, no port")
        if not self.prefix:
            raise ConfigError("prefix", "must not be empty: clear() removes every key under it")
        if 0 < self.segment_bytes < 16 << 20:
            raise ConfigError("segment_bytes", f"must be 0 (lend none) or at least 16MiB, got {self.segment_bytes}")
        for name in ("local_buffer_bytes", "read_buffer_bytes", "register_bytes"):
            if getattr(self, name) < 1 << 20:
                raise ConfigError(name, f"must be at least 1MiB, got {getattr(self, name)}")
        for name in ("replica_num", "threads", "pipeline_parts", "breaker_failures"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be at least 1, got {getattr(self, name)}")
        for name in ("connect_timeout", "timeout", "breaker_backoff", "breaker_backoff_max", "close_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be a positive number of seconds, got {getattr(self, name)}")

    @property
    def master_address(self) -> tuple[str, int]:
        host, _, port = self.master.rpartition(":")
        return host, int(port)
