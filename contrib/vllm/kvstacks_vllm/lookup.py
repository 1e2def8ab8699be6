"""The scheduler's question to the worker: how many leading tokens of this prompt does your stack hold?

vLLM's scheduler half of a connector and its worker half may live in different processes
(always with more than one worker), and the CPU tier lives in the worker's. So the worker
answers lookups over a Unix socket in a private folder (mode 0700: only this user can
connect; nothing leaves the machine), one per rank, named after vLLM's engine id, which
both halves read from the same config.

Wire format, both directions little-endian: request ``u32 n`` then ``n`` int32 token ids;
answer ``u64`` tokens held. Anything unexpected closes the connection; the client treats
every failure as a miss, so a dead or slow worker never fails a request.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

log = logging.getLogger("kvstacks.vllm")

MAX_TOKENS = 1 << 24


def socket_path(engine_id: str, rank: int) -> Path:
    """Where rank ``rank`` of vLLM engine ``engine_id`` answers lookups."""
    folder = Path(tempfile.gettempdir()) / f"kvstacks-vllm-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    if folder.stat().st_uid != os.getuid() or folder.stat().st_mode & 0o077:
        raise PermissionError(f"{folder} must belong to this user with mode 0700; remove it and retry")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in engine_id)[:64]
    return folder / f"{safe}-{rank}.sock"


def _read_exact(conn: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        part = conn.recv(n - len(data))
        if not part:
            raise ConnectionError("peer closed the connection")
        data += part
    return bytes(data)


class LookupServer:
    """Answers lookups with ``lookup(tokens) -> int`` on a daemon thread."""

    def __init__(self, path: Path, lookup: Callable[[np.ndarray], int]) -> None:
        self.path = path
        self._lookup = lookup
        if path.exists():
            path.unlink()  # a socket left by a process that died
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        os.chmod(path, 0o600)
        self._sock.listen(16)
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="kvstacks-vllm-lookup", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    (n,) = struct.unpack("<I", _read_exact(conn, 4))
                    if n > MAX_TOKENS:
                        return
                    tokens = np.frombuffer(_read_exact(conn, 4 * n), dtype="<i4")
                except (ConnectionError, OSError):
                    return
                try:
                    held = int(self._lookup(tokens))
                except Exception as exc:  # a failing tier is a miss, never an error for vLLM
                    log.warning("kvstacks lookup failed, answering 0: %s", exc)
                    held = 0
                try:
                    conn.sendall(struct.pack("<Q", held))
                except OSError:
                    return

    def close(self) -> None:
        self._closed = True
        try:
            self._sock.close()
        finally:
            try:
                self.path.unlink()
            except OSError:
                pass


class LookupClient:
    """The scheduler's end: one connection per rank, reopened after a failure."""

    def __init__(self, paths: list[Path], timeout: float = 5.0, connect_wait: float = 30.0) -> None:
        self.paths = paths
        self.timeout = timeout
        self.connect_wait = connect_wait
        self._conns: dict[Path, socket.socket] = {}
        self._started = time.monotonic()

    def _conn(self, path: Path) -> socket.socket:
        conn = self._conns.get(path)
        if conn is not None:
            return conn
        # Workers start their server before the scheduler exists; the wait covers slow starts.
        deadline = self._started + self.connect_wait
        while True:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.settimeout(self.timeout)
            try:
                conn.connect(str(path))
                break
            except OSError:
                conn.close()
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)
        self._conns[path] = conn
        return conn

    def lookup(self, tokens: np.ndarray) -> int:
        """The fewest tokens any rank holds (every rank must hold its shard); 0 on any failure."""
        data = struct.pack("<I", len(tokens)) + np.ascontiguousarray(tokens, dtype="<i4").tobytes()
        held = len(tokens)
        for path in self.paths:
            try:
                conn = self._conn(path)
                conn.sendall(data)
                (answer,) = struct.unpack("<Q", _read_exact(conn, 8))
            except (OSError, ConnectionError, struct.error) as exc:
                log.warning("kvstacks lookup at %s failed (treated as a miss): %s", path, exc)
                stale = self._conns.pop(path, None)
                if stale is not None:
                    stale.close()
                return 0
            held = min(held, answer)
        return held

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
