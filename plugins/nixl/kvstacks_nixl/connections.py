"""Open control connections a sender keeps per receiver, so a transfer skips the connect, the
token check and the NIXL metadata exchange that opening one costs."""

from __future__ import annotations

import select
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Connection:
    """A control connection that passed the receiver's token check."""

    sock: socket.socket
    #: The receiver's NIXL agent name, loaded into this side's agent.
    peer: str
    #: Whether it came from the pool: the receiver may have closed it since.
    reused: bool = False
    idle_since: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class ConnectionPool:
    """Idle connections by (host, port, token); at most ``per_peer`` kept for each."""

    def __init__(self, per_peer: int = 4, max_idle: float = 30.0) -> None:
        self.per_peer = per_peer
        self.max_idle = max_idle
        self._idle: dict[tuple[str, int, str | None], list[Connection]] = {}
        self._lock = threading.Lock()

    def take(self, key: tuple[str, int, str | None]) -> Connection | None:
        """An idle connection the receiver still holds open, or None."""
        while True:
            with self._lock:
                idle = self._idle.get(key)
                if not idle:
                    return None
                conn = idle.pop()
            if time.monotonic() - conn.idle_since > self.max_idle or _closed_by_peer(conn.sock):
                conn.close()
                continue
            conn.reused = True
            return conn

    def give_back(self, key: tuple[str, int, str | None], conn: Connection) -> None:
        conn.idle_since = time.monotonic()
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < self.per_peer:
                idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()


def _closed_by_peer(sock: socket.socket) -> bool:
    """An idle connection has nothing to read unless the receiver closed it (or broke protocol)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)
