"""Controller settings: command-line flags and environment, with secure defaults."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

#: Weight of a chunk held in each tier when ranking instances for /route ("*": any other tier).
DEFAULT_TIER_WEIGHTS = {"cpu": 1.0, "disk": 0.8, "*": 0.5}


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 9000
    #: Bearer token for operator endpoints (all but GET /health and GET /metrics).
    admin_token: str | None = None
    #: Bearer token between workers and the controller, both directions.
    worker_token: str | None = None
    #: A worker silent this long is unhealthy and drops out of lookups.
    heartbeat_timeout: float = 10.0
    #: How long one command to one worker may take.
    worker_timeout: float = 10.0
    #: How long a command waits before answering "pending" with its event id.
    wait: float = 10.0
    #: How long a worker may take to ship a prefix to another.
    move_timeout: float = 120.0
    max_body_bytes: int = 16 << 20
    max_tokens: int = 1 << 20
    max_batch: int = 1024
    max_events: int = 10_000
    #: /route: weight of a chunk by the tier holding it, and how much the caller's load counts.
    tier_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TIER_WEIGHTS))
    load_weight: float = 0.5
    #: Where the chunk index and worker registry live: "memory" (this process) or a
    #: redis://host:port/db URL shared by several controller replicas.
    index: str = "memory"
    #: With a shared index: how old a replica's cached view of the workers may be, in seconds.
    registry_ttl: float = 0.05
    #: Serve the admin page at GET / (behind the admin token when one is set).
    admin_page: bool = True

    @classmethod
    def from_env(cls, **overrides: object) -> "Settings":
        settings = cls(
            admin_token=os.environ.get("KVSTACKS_ADMIN_TOKEN") or None,
            worker_token=os.environ.get("KVSTACKS_WORKER_TOKEN") or None,
        )
        for name, value in overrides.items():
            if value is not None:
                setattr(settings, name, value)
        return settings

    def check_index(self) -> None:
        """Refuse to start on an index URL that is malformed or not answering."""
        if self.index == "memory":
            return
        from kvstacks_controller.replicas import RedisStore

        try:
            store = RedisStore(self.index)
        except ImportError:
            raise ValueError("--index redis://... needs redis-py: pip install 'kvstacks-controller[redis]'") from None
        try:
            store.call(store.client.ping)
        except Exception as exc:
            raise ValueError(str(exc)) from None
        finally:
            store.close()

    def check_bind(self) -> None:
        """Refuse to listen beyond loopback without both tokens."""
        if is_loopback(self.host):
            return
        missing = [
            env
            for env, value in (
                ("KVSTACKS_ADMIN_TOKEN", self.admin_token),
                ("KVSTACKS_WORKER_TOKEN", self.worker_token),
            )
            if not value
        ]
        if missing:
            raise ValueError(
                f"refusing to listen on {self.host} (beyond loopback) without {' and '.join(missing)}: "
                "set them to long random strings, or bind --host 127.0.0.1"
            )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
