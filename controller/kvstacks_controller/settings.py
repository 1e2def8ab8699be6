"""Controller settings: command-line flags and environment, with secure defaults."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from kvstacks.config import is_loopback

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
    #: Networks a worker may register an address in (CIDRs, or "any"). The controller
    #: connects to that address, so an open list lets anyone aim it at internal
    #: services (a cloud metadata endpoint, say); loopback only by default.
    worker_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")

    def check_worker_address(self, host: str) -> None:
        """Raise ``ValueError`` saying why ``host`` is not a worker address this controller calls."""
        if "any" in self.worker_networks:
            return
        try:
            ip = ipaddress.ip_address("127.0.0.1" if host == "localhost" else host.strip("[]"))
        except ValueError:
            raise ValueError(
                f"{host!r} is not an IP address; register an IP in the allowed networks "
                f"({', '.join(self.worker_networks)}), or start the controller with --worker-networks any"
            ) from None
        if not any(ip in ipaddress.ip_network(net, strict=False) for net in self.worker_networks):
            raise ValueError(
                f"{ip} is outside the networks workers may register from ({', '.join(self.worker_networks)}); "
                "start the controller with --worker-networks listing the workers' networks (CIDRs)"
            )

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
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
