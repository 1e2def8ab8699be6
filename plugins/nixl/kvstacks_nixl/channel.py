"""The ``nixl`` transfer channel: chunk payloads move memory to memory through NIXL (UCX).

A TCP connection carries only control messages; the payload bytes never cross it.
A sender keeps it open for the next transfers to the same receiver, so the token
check and the NIXL metadata exchange happen once per connection::

    opening   sender -> receiver   b"KVNX" u8 version, u32 len + JSON {token, agent}
                                   u32 len + the sender's NIXL agent metadata
              receiver -> sender   u32 len + JSON {ok, agent}, u32 len + its NIXL agent metadata
    transfer  sender -> receiver   u32 len + JSON head {count, total, ticket, meta}
                                   u32 len + JSON chunk list (key, shape, dtype, compressor, nbytes)
              receiver -> sender   u32 len + JSON {ok, regions: [[address, nbytes], ...], metadata}
                                   [u32 len + its NIXL agent metadata, when ``metadata``: a buffer
                                   registered since the sender last had it]
              sender               one NIXL WRITE of every payload into those regions,
                                   notification = ticket
              sender -> receiver   u32 len + b"written" once the WRITE is done (anything else: gave up)
              receiver -> sender   u32 len + JSON answer, once the notification arrived and
                                   ``receive`` ran

The receiver checks the token before it reads anything else, and the counts and
sizes against caps before it allocates; a refusal closes the connection. It
writes into registered buffers it keeps between transfers (fresh memory would
cost more in page faults than the copy itself), so the chunks handed to
``receive`` are valid only until it returns; the engine's import copies them. A
sender that dies before its notification is a failed transfer: the buffer it may
still write into is set aside, never reused. Nothing here is pickled:
descriptors travel as JSON.
"""

from __future__ import annotations

import hmac
import importlib.util
import json
import logging
import os
import select
import socket
import socketserver
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from kvstacks.builtin.transfer import _drain, _read_exact, _split_address
from kvstacks.config import Size
from kvstacks.errors import InvalidInput
from kvstacks.keys import CacheKey
from kvstacks.memory import DTYPE_FROM_CODE, DTYPES, MemoryObj
from kvstacks.transfer import Receiver, TransferChannel, TransferError

from kvstacks_nixl.connections import Connection, ConnectionPool

log = logging.getLogger("kvstacks.nixl")

MAGIC = b"KVNX"
VERSION = 2
_HEAD = struct.Struct("<4sB")
_LEN = struct.Struct("<I")
MAX_HEAD = 64 << 10
MAX_METADATA = 4 << 20
ALIGN = 1 << 12
WRITTEN = b"written"
#: Waits for a WRITE or its notification first spin this long (they usually end that soon; a
#: sleep costs a trip through the scheduler, milliseconds on a loaded machine), then sleep with
#: a pause growing by PAUSE_STEP up to MAX_PAUSE, so a long wait does not hold a core.
SPIN = 0.0003
PAUSE_STEP = 0.00005
MAX_PAUSE = 0.0005


def _send_msg(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_msg(data))


def _msg(data: bytes) -> bytes:
    return _LEN.pack(len(data)) + data


def _recv_msg(sock: socket.socket, limit: int, what: str) -> bytes:
    (size,) = _LEN.unpack(_read_exact(sock, _LEN.size))
    if size > limit:
        raise TransferError(f"{what} of {size} bytes is above the limit of {limit}")
    return bytes(_read_exact(sock, size))


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise TransferError(f"{what} is not JSON: {exc}") from None


def wait_until(ready: Callable[[], bool], deadline: float) -> bool:
    """Call ``ready`` until it is true (True) or ``deadline`` (monotonic) passes (False)."""
    spin_until = time.monotonic() + SPIN
    pause = 0.0
    while not ready():
        now = time.monotonic()
        if now > deadline:
            return False
        if now > spin_until:
            time.sleep(pause)
            pause = min(MAX_PAUSE, pause + PAUSE_STEP)
    return True


def ucx_environment(net_devices: str = "lo", modules: str = "^efa") -> None:
    """Set ``UCX_NET_DEVICES`` and ``UCX_MODULES`` unless the environment sets them already.

    UCX reads them once, when it loads with the process's first NIXL agent: call this before
    that agent is made. ``^efa`` keeps UCX's EFA module out. That module links the system's
    ``libefa``, which the nixl-cu12 wheel does not bundle; where rdma-core is installed it
    brings the system's ``libibverbs`` and ``libnl-route-3`` beside the wheel's own copies. The
    system copy's calls bind to the wheel's copy, so at exit its destructors unregister
    traffic-control ops the wheel's copy never registered (same names, registered first) and the
    process dies with SIGSEGV (exit code 139) after all its work, whatever was closed.
    """
    os.environ.setdefault("UCX_NET_DEVICES", net_devices)
    os.environ.setdefault("UCX_MODULES", modules)


class _StaleConnection(Exception):
    """A pooled connection the receiver closed before this transfer reached it."""


class NixlChannel(TransferChannel):
    """Chunks over NIXL: one WRITE per transfer into the receiver's registered buffers."""

    name = "nixl"
    preference = 10  # preferred over tcp when both sides have it

    @dataclass
    class Options:
        #: UCX_NET_DEVICES when the environment does not set it: loopback keeps UCX off the network.
        net_devices: str = "lo"
        backends: str = "UCX"
        #: UCX_MODULES when the environment does not set it: UCX's EFA module would load a second
        #: libnl that crashes the process at exit (see ``ucx_environment``).
        ucx_modules: str = "^efa"
        max_chunks: int = 1 << 16
        max_transfer_bytes: Size = Size(16 << 30)
        #: Registered receive buffers kept for the next transfers.
        pool_bytes: Size = Size(256 << 20)
        #: Seconds a transfer may wait for the other side; a receiver closes a control connection
        #: idle this long.
        idle_timeout: float = 60.0
        #: Idle control connections a sender keeps open per receiver, and for how many seconds.
        keep_connections: int = 4
        keep_seconds: float = 30.0

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._agent: Any = None
        self._agent_lock = threading.Lock()  # every call into the NIXL agent
        self._peers: dict[bytes, str] = {}  # metadata -> agent name, so each peer is added once
        self._notifs: set[tuple[str, bytes]] = set()
        # Registered receive buffers not in use, each with the count of registrations when it was
        # made: a sender whose copy of this agent's metadata is older needs it again.
        self._free: list[tuple[torch.Tensor, Any, int]] = []
        self._registrations = 0
        self._quarantine: list[tuple[float, tuple[torch.Tensor, Any, int]]] = []
        self._server: socketserver.ThreadingTCPServer | None = None
        self._serving: set[socket.socket] = set()  # open incoming connections, closed by close()
        self._connections = ConnectionPool(self.options.keep_connections, self.options.keep_seconds)

    # ---------------------------------------------------------------- NIXL agent

    def agent(self) -> Any:
        with self._agent_lock:
            if self._agent is None:
                ucx_environment(self.options.net_devices, self.options.ucx_modules)
                try:
                    from nixl._api import nixl_agent, nixl_agent_config
                except ImportError as exc:
                    raise TransferError(
                        f"NIXL is not importable ({exc}); pip install nixl-cu12==1.5.1 && "
                        "pip install --no-deps nixl==1.5.1"
                    ) from None
                # NIXL logs to stdout, which may be a program's protocol: route it through logging.
                quiet = logging.getLogger("nixl")
                quiet.handlers.clear()
                quiet.propagate = True
                quiet.setLevel(logging.WARNING)
                backends = [b.strip() for b in self.options.backends.split(",") if b.strip()]
                config = nixl_agent_config(backends=backends)
                self._agent = nixl_agent(f"kvstacks-{uuid.uuid4().hex}", config)
                self.agent_name = self._agent.name
            return self._agent

    def _call(self, method: str, *args: Any) -> Any:
        agent = self.agent()
        with self._agent_lock:
            return getattr(agent, method)(*args)

    def _add_peer(self, metadata: bytes) -> str:
        name = self._peers.get(metadata)
        if name is None:
            try:
                name = self._call("add_remote_agent", metadata)
            except Exception as exc:
                raise TransferError(f"peer sent unusable NIXL metadata: {exc}") from None
            name = name.decode() if isinstance(name, bytes) else name
            self._peers[metadata] = name
        return name

    def _metadata(self) -> bytes:
        return self._call("get_agent_metadata")

    def _notified(self, peer: str, ticket: bytes) -> bool:
        """Whether ``peer`` sent ``ticket``; keeps other transfers' notifications for their waiters."""
        agent = self.agent()
        with self._agent_lock:
            for name, messages in agent.get_new_notifs().items():
                for message in messages:
                    self._notifs.add((name, message))
            if (peer, ticket) in self._notifs:
                self._notifs.discard((peer, ticket))
                return True
        return False

    # ---------------------------------------------------------------- receive buffers

    def _take(self, nbytes: int) -> tuple[torch.Tensor, Any, int]:
        with self._agent_lock:
            fits = [i for i, b in enumerate(self._free) if nbytes <= b[0].numel() <= 2 * nbytes + ALIGN]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i][0].numel()))
        buffer = torch.empty(max(ALIGN, -(-nbytes // ALIGN) * ALIGN), dtype=torch.uint8)
        reg = self._call("register_memory", buffer)
        with self._agent_lock:
            self._registrations += 1
            return buffer, reg, self._registrations

    def _give_back(self, item: tuple[torch.Tensor, Any, int]) -> None:
        with self._agent_lock:
            kept = sum(b.numel() for b, _, _ in self._free)
            if kept + item[0].numel() <= self.options.pool_bytes:
                self._free.append(item)
                return
        self._call("deregister_memory", item[1])

    def _quarantine_buffer(self, item: tuple[torch.Tensor, Any, int]) -> None:
        """A sender that failed may still write into ``item``: keep it alive, unused, until any
        such write has long timed out (shared-memory transports write to the address itself)."""
        log.warning("setting aside a receive buffer a failed sender may still write to")
        now = time.monotonic()
        with self._agent_lock:
            self._quarantine.append((now, item))
            expired = [i for t, i in self._quarantine if now - t > 2 * self.options.idle_timeout]
            self._quarantine = [(t, i) for t, i in self._quarantine if now - t <= 2 * self.options.idle_timeout]
        for _, reg, _ in expired:
            self._call("deregister_memory", reg)

    def _current_metadata(self) -> tuple[bytes, int]:
        """This agent's metadata and the count of registrations it includes at least."""
        with self._agent_lock:
            seen = self._registrations
        return self._metadata(), seen

    # ---------------------------------------------------------------- receiving

    def listen(self, host: str, port: int, receive: Receiver, token: str | None = None) -> str:
        # Fail at start when NIXL is missing; the agent itself (UCX start-up, ~0.5 s) waits for
        # the first transfer, so workers that never transfer do not pay for it.
        if importlib.util.find_spec("nixl") is None:
            raise TransferError(
                "NIXL is not installed; pip install nixl-cu12==1.5.1 && pip install --no-deps nixl==1.5.1"
            )
        channel = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with channel._agent_lock:
                    channel._serving.add(self.request)
                try:
                    channel._serve(self.request, receive, token)
                finally:
                    with channel._agent_lock:
                        channel._serving.discard(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server((host, port), Handler)
        threading.Thread(target=self._server.serve_forever, name="kvstacks-nixl", daemon=True).start()
        bound_host, bound_port = self._server.server_address[:2]
        return f"{bound_host}:{bound_port}"

    def _serve(self, sock: socket.socket, receive: Receiver, token: str | None) -> None:
        """One control connection: the opening, then transfers until the sender closes it, it
        stays idle for ``idle_timeout`` or a transfer leaves it out of step."""
        sock.settimeout(self.options.idle_timeout)
        try:
            peer, known = self._greet(sock, token)
        except (TransferError, ValueError) as exc:
            self._refuse(sock, str(exc))
            return
        except (TimeoutError, ConnectionError, OSError) as exc:
            log.warning("incoming nixl connection broke off while opening: %s", exc)
            return
        while self._next_transfer(sock):
            known, in_step = self._serve_transfer(sock, receive, peer, known)
            if not in_step:
                return

    def _greet(self, sock: socket.socket, token: str | None) -> tuple[str, int]:
        """Check the opening; return the sender's agent name and the registrations it knows of."""
        magic, version = _HEAD.unpack(_read_exact(sock, _HEAD.size))
        if magic != MAGIC or version != VERSION:
            raise TransferError(f"not a kvstacks nixl transfer (bad magic or version; this receiver speaks {VERSION})")
        hello = _json(_recv_msg(sock, MAX_HEAD, "opening"), "opening")
        if not isinstance(hello, dict):
            raise TransferError("opening must be a JSON object")
        if token and not hmac.compare_digest(str(hello.get("token", "")).encode(), token.encode()):
            raise TransferError("transfer refused: missing or wrong KVSTACKS_WORKER_TOKEN")
        peer = self._add_peer(_recv_msg(sock, MAX_METADATA, "NIXL metadata"))
        metadata, known = self._current_metadata()
        sock.sendall(_msg(json.dumps({"ok": True, "agent": self.agent_name}).encode()) + _msg(metadata))
        return peer, known

    def _refuse(self, sock: socket.socket, reason: str) -> None:
        """Answer a refusal and close: let the sender read why before the connection goes."""
        try:
            _send_msg(sock, json.dumps({"ok": False, "error": reason}).encode())
            _drain(sock)
        except OSError:
            pass

    def _next_transfer(self, sock: socket.socket) -> bool:
        """Wait for the sender's next transfer on an open connection; False once it is gone."""
        try:
            readable, _, _ = select.select([sock], [], [], self.options.idle_timeout)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK) != b""
        except (OSError, ValueError):
            return False

    def _serve_transfer(
        self, sock: socket.socket, receive: Receiver, peer: str, known: int
    ) -> tuple[int, bool]:
        """One transfer; returns the registrations the sender now knows of and whether the
        connection is still in step for the next one."""
        opts = self.options
        buffer = None
        reusable = True
        planned = False
        written = False
        try:
            head = _json(_recv_msg(sock, MAX_HEAD, "transfer head"), "transfer head")
            if not isinstance(head, dict):
                raise TransferError("transfer head must be a JSON object")
            count, total, ticket, meta = head.get("count"), head.get("total"), head.get("ticket"), head.get("meta")
            if not isinstance(count, int) or not 0 <= count <= opts.max_chunks:
                raise TransferError(f"transfer count must be 0..{opts.max_chunks}, got {count!r}")
            if not isinstance(total, int) or not 0 <= total <= opts.max_transfer_bytes:
                raise TransferError(f"transfer size must be 0..{opts.max_transfer_bytes} bytes, got {total!r}")
            if not isinstance(ticket, str) or not isinstance(meta, dict):
                raise TransferError("transfer head needs a ticket and a meta object")
            chunks = _chunk_list(_json(_recv_msg(sock, 4096 + 1024 * count, "chunk list"), "chunk list"), count, total)
            buffer = self._take(total)
            regions, offset = [], 0
            base = buffer[0].data_ptr()
            for _, _, _, _, nbytes in chunks:
                regions.append([base + offset, nbytes])
                offset += -(-nbytes // 64) * 64
            plan = {"ok": True, "regions": regions, "metadata": buffer[2] > known}
            message = _msg(json.dumps(plan).encode())
            if plan["metadata"]:
                metadata, known = self._current_metadata()
                message += _msg(metadata)
            planned = True
            reusable = False  # from here on the sender may write into the buffer
            sock.sendall(message)
            heard = self._wait_written(sock, peer, ticket.encode(), opts.idle_timeout)
            written = True
            reusable = True
            objs, at = [], 0
            for key, shape, dtype, compressor, nbytes in chunks:
                raw = buffer[0][at : at + nbytes]
                data = raw.view(dtype).view(shape) if compressor == "none" else raw
                objs.append(MemoryObj(key, data, shape, dtype, compressor))
                at += -(-nbytes // 64) * 64
            answer = {"ok": True, **receive(objs, meta)}
            if not heard:  # the notification came first; the sender's word follows it
                self._sender_word(sock)
        except (TransferError, InvalidInput, ValueError) as exc:
            answer = {"ok": False, "error": str(exc)}
        except (TimeoutError, ConnectionError, OSError) as exc:
            log.warning("incoming nixl transfer broke off: %s", exc)
            answer = None
        except Exception as exc:  # the receiver's engine refused; tell the sender why
            log.warning("incoming nixl transfer failed: %s", exc)
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            if buffer is not None:
                if reusable:
                    self._give_back(buffer)
                else:
                    self._quarantine_buffer(buffer)
        if answer is None:
            return known, False
        if not planned:
            self._refuse(sock, answer["error"])  # the sender may still be sending: close after it
            return known, False
        try:
            _send_msg(sock, json.dumps(answer).encode())
        except OSError:
            return known, False
        return known, written

    def _wait_written(self, sock: socket.socket, peer: str, ticket: bytes, timeout: float) -> bool:
        """Wait for the notification that the sender's WRITE landed, polling NIXL (which also
        drives its progress) between waits on the connection, where the sender's word that its
        WRITE is done wakes this at once. Returns whether that word was read; any other word,
        or the connection closing, means the sender gave up."""
        deadline = time.monotonic() + timeout
        pause = 0.0
        while not self._notified(peer, ticket):
            if time.monotonic() > deadline:
                raise TransferError(f"no completion from the sender within {timeout:g}s")
            readable, _, _ = select.select([sock], [], [], pause)
            if readable:
                self._sender_word(sock)
                if not wait_until(lambda: self._notified(peer, ticket), deadline):
                    raise TransferError(f"the sender wrote, but no notification came within {timeout:g}s")
                return True
            pause = min(MAX_PAUSE * 4, pause + PAUSE_STEP)
        return False

    def _sender_word(self, sock: socket.socket) -> None:
        try:
            word = _recv_msg(sock, 4096, "sender's word")
        except ConnectionError:
            word = b""
        if word != WRITTEN:
            raise TransferError(f"sender gave up: {word.decode(errors='replace') or 'connection closed'}")

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
        payloads = [obj.data.contiguous().view(torch.uint8).reshape(-1) for obj in objs]
        chunks = [
            [obj.key.to_string(), list(obj.shape), DTYPES[obj.dtype], obj.compressor, p.numel()]
            for obj, p in zip(objs, payloads)
        ]
        total = sum(-(-p.numel() // 64) * 64 for p in payloads)
        ticket = uuid.uuid4().hex
        head = {"count": len(objs), "total": total, "ticket": ticket, "meta": meta}
        request = _msg(json.dumps(head).encode()) + _msg(json.dumps(chunks).encode())
        key = (host, port, token)
        try:
            for _ in range(2):  # a pooled connection the receiver closed meanwhile: once more, fresh
                conn = self._connections.take(key) or self._open(host, port, token, timeout)
                try:
                    answer = self._transfer(conn, address, request, payloads, ticket.encode(), timeout)
                except _StaleConnection:
                    conn.close()
                    continue
                except BaseException:
                    conn.close()
                    raise
                self._connections.give_back(key, conn)
                break
            else:
                raise TransferError(f"receiver at {address} closed the connection before the transfer")
        except OSError as exc:
            raise TransferError(f"transfer to {address} failed: {exc}") from None
        if not isinstance(answer, dict) or not answer.get("ok"):
            reason = answer.get("error") if isinstance(answer, dict) else answer
            raise TransferError(f"receiver at {address} refused the transfer: {reason}")
        answer.pop("ok")
        return answer

    def _open(self, host: str, port: int, token: str | None, timeout: float) -> Connection:
        """A new control connection: the token and both agents' metadata, once."""
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            hello = {"token": token} if token else {}
            try:
                sock.sendall(
                    _HEAD.pack(MAGIC, VERSION) + _msg(json.dumps(hello).encode()) + _msg(self._metadata())
                )
            except OSError:
                pass  # a receiver that refused stops reading; its answer says why
            answer = _json(_recv_msg(sock, 1 << 20, "receiver's opening"), "receiver's opening")
            if not isinstance(answer, dict) or not answer.get("ok"):
                reason = answer.get("error") if isinstance(answer, dict) else answer
                raise TransferError(f"receiver at {host}:{port} refused the transfer: {reason}")
            peer = self._add_peer(_recv_msg(sock, MAX_METADATA, "NIXL metadata"))
        except BaseException:
            sock.close()
            raise
        return Connection(sock, peer)

    def _transfer(
        self, conn: Connection, address: str, request: bytes, payloads: list[torch.Tensor], ticket: bytes,
        timeout: float,
    ) -> Any:
        sock = conn.sock
        sock.settimeout(timeout)
        registered = []
        try:
            try:
                sock.sendall(request)
            except OSError as exc:
                if conn.reused and not isinstance(exc, TimeoutError):
                    raise _StaleConnection from None
                # a receiver that refused stops reading; its answer says why
            # Register while the receiver plans: the two overlap.
            for payload in payloads:
                if payload.numel():
                    registered.append(self._call("register_memory", payload))
            try:
                plan = _json(_recv_msg(sock, (1 << 20) + 64 * len(payloads), "receiver's plan"), "receiver's plan")
            except ConnectionError:
                if conn.reused:
                    raise _StaleConnection from None
                raise
            if not isinstance(plan, dict) or not plan.get("ok"):
                reason = plan.get("error") if isinstance(plan, dict) else plan
                raise TransferError(f"receiver at {address} refused the transfer: {reason}")
            if plan.get("metadata"):
                conn.peer = self._add_peer(_recv_msg(sock, MAX_METADATA, "NIXL metadata"))
            regions = plan.get("regions")
            sizes = [p.numel() for p in payloads]
            if not isinstance(regions, list) or [_region(r)[1] for r in regions] != sizes:
                raise TransferError(f"receiver at {address} offered regions that do not fit the chunks")
            moving = [(p, r) for p, r in zip(payloads, regions) if p.numel()]
            self._write(conn.peer, moving, ticket, sock, timeout)
        finally:
            for reg in registered:
                self._call("deregister_memory", reg)
        return _json(_recv_msg(sock, 1 << 20, "receiver's answer"), "receiver's answer")

    def _write(self, peer: str, moving: list, ticket: bytes, sock: socket.socket, timeout: float) -> None:
        """One WRITE of every payload, notification ``ticket``; tells the receiver when it is done."""
        if not moving:  # nothing to write: the notification alone says so
            self._call("send_notif", peer, ticket)
            _send_msg(sock, WRITTEN)
            return
        agent = self.agent()
        local = self._call("get_xfer_descs", [p for p, _ in moving])
        remote = self._call("get_xfer_descs", [(*_region(r), 0) for _, r in moving], "DRAM")
        handle = self._call("initialize_xfer", "WRITE", local, remote, peer, ticket)
        state = ["PROC"]
        try:
            state[0] = self._call("transfer", handle)

            def ended() -> bool:
                if state[0] == "DONE" or state[0] == "ERR":
                    return True
                with self._agent_lock:
                    state[0] = agent.check_xfer_state(handle)
                return state[0] in ("DONE", "ERR")

            if not wait_until(ended, time.monotonic() + timeout) or state[0] != "DONE":
                try:
                    _send_msg(sock, b"write failed")
                except OSError:
                    pass
                raise TransferError(f"NIXL write to {peer} failed ({state[0]})")
            _send_msg(sock, WRITTEN)
        finally:
            self._call("release_xfer_handle", handle)

    def close(self) -> None:
        self._connections.close()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._agent_lock:
            serving, self._serving = self._serving, set()
        for sock in serving:  # wakes their threads, which end; their senders see the close
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self._agent_lock:
            agent, self._agent = self._agent, None
            regs = [reg for _, reg, _ in self._free] + [reg for _, (_, reg, _) in self._quarantine]
            self._free, self._quarantine = [], []
        if agent is not None:
            # Deregister before the agent goes: NIXL tears down its backends when it is collected.
            for reg in regs:
                try:
                    agent.deregister_memory(reg)
                except Exception as exc:
                    log.debug("deregistering a receive buffer at close: %s", exc)


def _chunk_list(items: Any, count: int, total: int) -> list[tuple[CacheKey, tuple[int, ...], torch.dtype, str, int]]:
    """Validate the sender's chunk list; each payload must fit its shape and all must fit ``total``."""
    if not isinstance(items, list) or len(items) != count:
        raise TransferError(f"chunk list must hold {count} entries")
    out, used = [], 0
    for item in items:
        try:
            key_text, shape, code, compressor, nbytes = item
            key = CacheKey.from_string(key_text)
            dtype = DTYPE_FROM_CODE[code]
            shape = tuple(int(d) for d in shape)
        except (TypeError, ValueError, KeyError, InvalidInput) as exc:
            raise TransferError(f"malformed chunk entry {str(item)[:200]}: {exc}") from None
        if not isinstance(nbytes, int) or nbytes < 0 or not isinstance(compressor, str) or len(shape) > 8:
            raise TransferError(f"malformed chunk entry {str(item)[:200]}")
        if compressor == "none":
            expected = torch.empty((), dtype=dtype).element_size()
            for d in shape:
                expected *= d
            if expected != nbytes:
                raise TransferError(f"chunk {key_text}: {nbytes} bytes do not match shape {shape}")
        used += -(-nbytes // 64) * 64
        out.append((key, shape, dtype, compressor, nbytes))
    if used != total:
        raise TransferError(f"chunk sizes add up to {used} bytes, the head says {total}")
    return out


def _region(item: Any) -> tuple[int, int]:
    try:
        address, nbytes = item
        return int(address), int(nbytes)
    except (TypeError, ValueError):
        raise TransferError(f"receiver offered a malformed region {str(item)[:100]}") from None
