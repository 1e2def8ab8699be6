"""The builtin ``tcp`` transfer channel: chunk frames over one TCP connection per transfer.

Request::

    b"KVTX" u8 version  u32 meta_len  meta (JSON: token, count, caller's fields)
    count x (u64 frame_len, frame)            # kvstacks.frame, checksummed

Answer: ``u32 len`` + JSON (``{"ok": true, ...}`` or ``{"ok": false, "error": ...}``).
Every length is checked against caps before anything is allocated.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import socketserver
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

from kvstacks import frame
from kvstacks.config import Size
from kvstacks.errors import CorruptChunk
from kvstacks.hookspecs import hookimpl
from kvstacks.memory import MemoryObj
from kvstacks.transfer import Receiver, TransferChannel, TransferError

log = logging.getLogger("kvstacks.transfer")

MAGIC = b"KVTX"
VERSION = 1
_HEAD = struct.Struct("<4sBI")
_LEN64 = struct.Struct("<Q")
_LEN32 = struct.Struct("<I")
MAX_META = 64 << 10
MAX_ANSWER = 1 << 20


def _read_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if not k:
            raise ConnectionError(f"peer closed the connection after {got} of {n} bytes")
        got += k
    return buf


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise TransferError(f"transfer address must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


def _drain(sock: socket.socket, limit: int = 64 << 20, seconds: float = 2.0) -> None:
    """After a refusal, read and drop what the sender still sends (bounded), so closing does
    not reset the connection before the sender has read the answer."""
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    while limit > 0 and time.monotonic() < deadline:
        chunk = sock.recv(min(limit, 1 << 20))
        if not chunk:
            return
        limit -= len(chunk)


class TcpChannel(TransferChannel):
    """Chunks over plain TCP, for loopback and trusted networks (NIXL for RDMA)."""

    name = "tcp"

    @dataclass
    class Options:
        max_chunks: int = 1 << 20
        max_frame_bytes: Size = Size(1 << 30)
        max_transfer_bytes: Size = Size(64 << 30)
        idle_timeout: float = 60.0

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._server: socketserver.ThreadingTCPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- receiving

    def listen(self, host: str, port: int, receive: Receiver, token: str | None = None) -> str:
        channel = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                channel._serve(self.request, receive, token)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server((host, port), Handler)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="kvstacks-tcp-transfer", daemon=True
        )
        self._thread.start()
        bound_host, bound_port = self._server.server_address[:2]
        return f"{bound_host}:{bound_port}"

    def _serve(self, sock: socket.socket, receive: Receiver, token: str | None) -> None:
        opts = self.options
        sock.settimeout(opts.idle_timeout)
        try:
            magic, version, meta_len = _HEAD.unpack(_read_exact(sock, _HEAD.size))
            if magic != MAGIC or version != VERSION:
                raise TransferError("not a kvstacks tcp transfer (bad magic or version)")
            if meta_len > MAX_META:
                raise TransferError(f"transfer metadata of {meta_len} bytes is above the limit of {MAX_META}")
            meta = json.loads(_read_exact(sock, meta_len))
            if not isinstance(meta, dict):
                raise TransferError("transfer metadata must be a JSON object")
            if token and not hmac.compare_digest(str(meta.pop("token", "")).encode(), token.encode()):
                raise TransferError("transfer refused: missing or wrong KVSTACKS_WORKER_TOKEN")
            meta.pop("token", None)
            count = meta.get("count")
            if not isinstance(count, int) or not 0 <= count <= opts.max_chunks:
                raise TransferError(f"transfer count must be 0..{opts.max_chunks}, got {count!r}")
            objs: list[MemoryObj] = []
            total = 0
            for _ in range(count):
                (size,) = _LEN64.unpack(_read_exact(sock, _LEN64.size))
                total += size
                if size > opts.max_frame_bytes or total > opts.max_transfer_bytes:
                    raise TransferError(
                        f"transfer above the limits (frame {size} bytes, total {total} bytes)"
                    )
                objs.append(frame.decode(_read_exact(sock, size)))
            answer = {"ok": True, **receive(objs, meta)}
        except (CorruptChunk, TransferError, ValueError) as exc:
            answer = {"ok": False, "error": str(exc)}
        except (ConnectionError, socket.timeout, OSError) as exc:
            log.warning("incoming transfer broke off: %s", exc)
            return
        except Exception as exc:  # the receiver's engine refused; tell the sender why
            log.warning("incoming transfer failed: %s", exc)
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        data = json.dumps(answer).encode()
        try:
            sock.sendall(_LEN32.pack(len(data)) + data)
            if not answer["ok"]:
                _drain(sock)
        except OSError:
            pass

    # ---------------------------------------------------------------- sending

    def send(
        self,
        address: str,
        objs: list[MemoryObj],
        meta: dict[str, Any],
        timeout: float = 60.0,
        token: str | None = None,
    ) -> dict[str, Any]:
        host, port = _split_address(address)
        head = dict(meta, count=len(objs))
        if token:
            head["token"] = token
        meta_bytes = json.dumps(head).encode()
        try:
            with socket.create_connection((host, port), timeout=timeout) as sock:
                try:
                    sock.sendall(_HEAD.pack(MAGIC, VERSION, len(meta_bytes)) + meta_bytes)
                    for obj in objs:
                        parts = frame.encode_parts(obj)
                        sock.sendall(_LEN64.pack(sum(len(p) for p in parts)))
                        for part in parts:
                            sock.sendall(part)
                except OSError:
                    pass  # a receiver that refused stops reading; its answer says why
                (size,) = _LEN32.unpack(_read_exact(sock, _LEN32.size))
                if size > MAX_ANSWER:
                    raise TransferError(f"receiver answered {size} bytes; not a kvstacks tcp receiver?")
                answer = json.loads(_read_exact(sock, size))
        except (OSError, ConnectionError) as exc:
            raise TransferError(f"transfer to {address} failed: {exc}") from None
        except ValueError as exc:
            raise TransferError(f"receiver at {address} sent a malformed answer: {exc}") from None
        if not isinstance(answer, dict) or not answer.get("ok"):
            reason = answer.get("error") if isinstance(answer, dict) else answer
            raise TransferError(f"receiver at {address} refused the transfer: {reason}")
        answer.pop("ok")
        return answer

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@hookimpl
def register_transfer_channels(register) -> None:
    register(TcpChannel)
