"""The builtin ``tcp`` transfer channel: chunk frames over one TCP connection per transfer.

Request::

    b"KVTX" u8 version  u32 meta_len  meta (JSON: token, count, caller's fields)
    count x (u64 frame_len, frame)            # kvstacks.frame, checksummed

Answer: ``u32 len`` + JSON (``{"ok": true, ...}`` or ``{"ok": false, "error": ...}``).

A receiver trusts nothing before the token: the header and token must arrive within
``header_timeout``; only then are frames read. A frame's declared length is checked
against the caps, and its bytes land in memory that is committed page by page as they
arrive, so a peer declaring a huge frame and sending nothing costs nothing. A transfer
silent for ``idle_timeout`` is dropped, and at most ``max_connections`` are served at
once (more are refused at once, answered "busy").
"""

from __future__ import annotations

import hmac
import json
import logging
import mmap
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


#: Below this, a read goes into a plain bytearray; above, into anonymous memory committed as it fills.
_LAZY_FROM = 1 << 20


def _read_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytearray | mmap.mmap:
    """``n`` bytes from ``sock``; with ``deadline`` (monotonic), all of them by then.

    A large read goes into an anonymous mapping: its pages are committed only when bytes
    are written there, so a declared length costs memory only as the bytes arrive
    (``bytearray(n)`` would zero, and so commit, all of it at once).
    """
    buf: bytearray | mmap.mmap = bytearray(n) if n < _LAZY_FROM else mmap.mmap(-1, n)
    view = memoryview(buf)
    got = 0
    try:
        while got < n:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{got} of {n} bytes arrived in time")
                sock.settimeout(left)
            k = sock.recv_into(view[got:], n - got)
            if not k:
                raise ConnectionError(f"peer closed the connection after {got} of {n} bytes")
            got += k
    finally:
        view.release()
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
        #: Chunks in one transfer.
        max_chunks: int = 1 << 20
        #: Largest chunk frame accepted (header + payload); larger is refused before it is read.
        max_frame_bytes: Size = Size(1 << 30)
        #: Bytes in one transfer.
        max_transfer_bytes: Size = Size(64 << 30)
        #: Received chunks are handed to the engine in batches of about this many bytes, so an
        #: incoming transfer holds at most one batch (plus one frame) in memory.
        batch_bytes: Size = Size(256 << 20)
        #: Transfers received at once; a connection beyond them is answered "busy" and closed.
        max_connections: int = 8
        #: Seconds a sender has to send its header and token after connecting.
        header_timeout: float = 10.0
        #: Seconds without a byte before a half-received transfer is dropped.
        idle_timeout: float = 60.0

        def __post_init__(self) -> None:
            for name in ("max_chunks", "max_frame_bytes", "max_transfer_bytes", "batch_bytes", "max_connections",
                         "header_timeout", "idle_timeout"):
                if getattr(self, name) <= 0:
                    raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._slots = threading.BoundedSemaphore(self.options.max_connections)
        self._server: socketserver.ThreadingTCPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- receiving

    def listen(self, host: str, port: int, receive: Receiver, token: str | None = None) -> str:
        channel = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                if not channel._slots.acquire(blocking=False):
                    channel._refuse_busy(self.request)
                    return
                try:
                    channel._serve(self.request, receive, token)
                finally:
                    channel._slots.release()

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

    def _refuse_busy(self, sock: socket.socket) -> None:
        reason = f"receiver busy: {self.options.max_connections} transfers already in progress; retry later"
        log.warning("refused an incoming transfer: %s", reason)
        data = json.dumps({"ok": False, "error": reason}).encode()
        try:
            sock.settimeout(2.0)
            sock.sendall(_LEN32.pack(len(data)) + data)
            _drain(sock, limit=1 << 20, seconds=0.5)
        except OSError:
            pass

    def _serve(self, sock: socket.socket, receive: Receiver, token: str | None) -> None:
        opts = self.options
        complete = True  # every frame read (a refusal or a short batch leaves some unread)
        try:
            # Nothing sizeable is read before the sender proved it holds the token.
            deadline = time.monotonic() + opts.header_timeout
            magic, version, meta_len = _HEAD.unpack(_read_exact(sock, _HEAD.size, deadline))
            if magic != MAGIC or version != VERSION:
                raise TransferError("not a kvstacks tcp transfer (bad magic or version)")
            if meta_len > MAX_META:
                raise TransferError(f"transfer metadata of {meta_len} bytes is above the limit of {MAX_META}")
            meta = json.loads(_read_exact(sock, meta_len, deadline))
            if not isinstance(meta, dict):
                raise TransferError("transfer metadata must be a JSON object")
            if token and not hmac.compare_digest(str(meta.pop("token", "")).encode(), token.encode()):
                raise TransferError("transfer refused: missing or wrong KVSTACKS_WORKER_TOKEN")
            meta.pop("token", None)
            sock.settimeout(opts.idle_timeout)
            count = meta.get("count")
            if not isinstance(count, int) or not 0 <= count <= opts.max_chunks:
                raise TransferError(f"transfer count must be 0..{opts.max_chunks}, got {count!r}")
            answer, complete = self._receive_frames(sock, count, receive, meta)
            answer = {"ok": True, **answer}
        except (CorruptChunk, TransferError, ValueError) as exc:
            answer = {"ok": False, "error": str(exc)}
        except (TimeoutError, ConnectionError, OSError) as exc:
            log.warning("incoming transfer broke off: %s", exc)
            return
        except Exception as exc:  # the receiver's engine refused; tell the sender why
            log.warning("incoming transfer failed: %s", exc)
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        data = json.dumps(answer).encode()
        try:
            sock.sendall(_LEN32.pack(len(data)) + data)
            if not answer["ok"] or not complete:
                _drain(sock)
        except OSError:
            pass

    def _receive_frames(
        self, sock: socket.socket, count: int, receive: Receiver, meta: dict[str, Any]
    ) -> tuple[dict[str, Any], bool]:
        """Hand the frames to ``receive`` in batches of about ``batch_bytes``: a transfer holds one
        batch in memory, not all of it. Return the merged answer and whether every frame was read.

        A batch stored only in part (the receiver's tier is full) ends the transfer: the answer's
        ``num_tokens`` must stay a prefix the receiver holds, since the sender removes that much.
        """
        opts = self.options
        answer: dict[str, Any] = {}
        stored: int | None = None
        batch: list[MemoryObj] = []
        batch_bytes = total = 0
        for i in range(count):
            (size,) = _LEN64.unpack(_read_exact(sock, _LEN64.size))
            total += size
            if size > opts.max_frame_bytes or total > opts.max_transfer_bytes:
                raise TransferError(
                    f"transfer above the limits (frame {size} bytes, total {total} bytes; this receiver "
                    f"takes frames up to {int(opts.max_frame_bytes)} and transfers up to "
                    f"{int(opts.max_transfer_bytes)} bytes)"
                )
            batch.append(frame.decode(_read_exact(sock, size)))
            batch_bytes += size
            if batch_bytes < opts.batch_bytes and i < count - 1:
                continue
            answer = receive(batch, meta)
            tokens = answer.get("num_tokens")
            if isinstance(tokens, int):
                stored = (stored or 0) + tokens
                if tokens < sum(obj.num_tokens for obj in batch) and i < count - 1:
                    return {**answer, "num_tokens": stored}, False
            batch, batch_bytes = [], 0
        if not count:
            answer = receive([], meta)
        return ({**answer, "num_tokens": stored} if stored is not None else answer), True

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
