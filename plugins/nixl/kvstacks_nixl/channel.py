"""The ``nixl`` transfer channel: chunk payloads move memory to memory through NIXL (UCX).

A small TCP connection per transfer carries only control messages; the payload
bytes never cross it::

    sender -> receiver   b"KVNX" u8 version, u32 len + JSON head (token, count, total, ticket, meta)
                         u32 len + JSON chunk list (key, shape, dtype, compressor, nbytes)
                         u32 len + the sender's NIXL agent metadata
    receiver -> sender   u32 len + JSON {ok, agent, regions: [[address, nbytes], ...]}
                         u32 len + the receiver's NIXL agent metadata
    sender               one NIXL WRITE of every payload into those regions, notification = ticket
    receiver -> sender   u32 len + JSON answer, once the notification arrived and ``receive`` ran

The receiver checks the token before it reads anything else, and the counts and
sizes against caps before it allocates. It writes into registered buffers it
keeps between transfers (fresh memory would cost more in page faults than the
copy itself), so the chunks handed to ``receive`` are valid only until it
returns; the engine's import copies them. A sender that dies before its
notification is a failed transfer: the buffer it may still write into is set
aside, never reused. Nothing here is pickled: descriptors travel as JSON.
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
from dataclasses import dataclass
from typing import Any

import torch
from kvstacks.builtin.transfer import _drain, _read_exact, _split_address
from kvstacks.config import Size
from kvstacks.errors import InvalidInput
from kvstacks.keys import CacheKey
from kvstacks.memory import DTYPE_FROM_CODE, DTYPES, MemoryObj
from kvstacks.transfer import Receiver, TransferChannel, TransferError

log = logging.getLogger("kvstacks.nixl")

MAGIC = b"KVNX"
VERSION = 1
_HEAD = struct.Struct("<4sB")
_LEN = struct.Struct("<I")
MAX_HEAD = 64 << 10
MAX_METADATA = 4 << 20
ALIGN = 1 << 12


def _send_msg(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_LEN.pack(len(data)) + data)


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


class NixlChannel(TransferChannel):
    """Chunks over NIXL: one WRITE per transfer into the receiver's registered buffers."""

    name = "nixl"
    preference = 10  # preferred over tcp when both sides have it

    @dataclass
    class Options:
        #: UCX_NET_DEVICES when the environment does not set it: loopback keeps UCX off the network.
        net_devices: str = "lo"
        backends: str = "UCX"
        max_chunks: int = 1 << 16
        max_transfer_bytes: Size = Size(16 << 30)
        #: Registered receive buffers kept for the next transfers.
        pool_bytes: Size = Size(256 << 20)
        idle_timeout: float = 60.0

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._agent: Any = None
        self._agent_lock = threading.Lock()  # every call into the NIXL agent
        self._peers: dict[bytes, str] = {}  # metadata -> agent name, so each peer is added once
        self._notifs: set[tuple[str, bytes]] = set()
        self._free: list[tuple[torch.Tensor, Any]] = []  # registered receive buffers not in use
        self._quarantine: list[tuple[float, tuple[torch.Tensor, Any]]] = []
        self._server: socketserver.ThreadingTCPServer | None = None

    # ---------------------------------------------------------------- NIXL agent

    def agent(self) -> Any:
        with self._agent_lock:
            if self._agent is None:
                os.environ.setdefault("UCX_NET_DEVICES", self.options.net_devices)
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

    def _take(self, nbytes: int) -> tuple[torch.Tensor, Any]:
        with self._agent_lock:
            fits = [i for i, b in enumerate(self._free) if nbytes <= b[0].numel() <= 2 * nbytes + ALIGN]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i][0].numel()))
        buffer = torch.empty(max(ALIGN, -(-nbytes // ALIGN) * ALIGN), dtype=torch.uint8)
        return buffer, self._call("register_memory", buffer)

    def _give_back(self, item: tuple[torch.Tensor, Any]) -> None:
        with self._agent_lock:
            kept = sum(b.numel() for b, _ in self._free)
            if kept + item[0].numel() <= self.options.pool_bytes:
                self._free.append(item)
                return
        self._call("deregister_memory", item[1])

    def _quarantine_buffer(self, item: tuple[torch.Tensor, Any]) -> None:
        """A sender that failed may still write into ``item``: keep it alive, unused, until any
        such write has long timed out (shared-memory transports write to the address itself)."""
        log.warning("setting aside a receive buffer a failed sender may still write to")
        now = time.monotonic()
        with self._agent_lock:
            self._quarantine.append((now, item))
            expired = [i for t, i in self._quarantine if now - t > 2 * self.options.idle_timeout]
            self._quarantine = [(t, i) for t, i in self._quarantine if now - t <= 2 * self.options.idle_timeout]
        for _, reg in expired:
            self._call("deregister_memory", reg)

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
                channel._serve(self.request, receive, token)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server((host, port), Handler)
        threading.Thread(target=self._server.serve_forever, name="kvstacks-nixl", daemon=True).start()
        bound_host, bound_port = self._server.server_address[:2]
        return f"{bound_host}:{bound_port}"

    def _serve(self, sock: socket.socket, receive: Receiver, token: str | None) -> None:
        opts = self.options
        sock.settimeout(opts.idle_timeout)
        buffer = None
        reusable = True
        planned = False
        try:
            magic, version = _HEAD.unpack(_read_exact(sock, _HEAD.size))
            if magic != MAGIC or version != VERSION:
                raise TransferError("not a kvstacks nixl transfer (bad magic or version)")
            head = _json(_recv_msg(sock, MAX_HEAD, "transfer head"), "transfer head")
            if not isinstance(head, dict):
                raise TransferError("transfer head must be a JSON object")
            if token and not hmac.compare_digest(str(head.get("token", "")).encode(), token.encode()):
                raise TransferError("transfer refused: missing or wrong KVSTACKS_WORKER_TOKEN")
            count, total, ticket, meta = head.get("count"), head.get("total"), head.get("ticket"), head.get("meta")
            if not isinstance(count, int) or not 0 <= count <= opts.max_chunks:
                raise TransferError(f"transfer count must be 0..{opts.max_chunks}, got {count!r}")
            if not isinstance(total, int) or not 0 <= total <= opts.max_transfer_bytes:
                raise TransferError(f"transfer size must be 0..{opts.max_transfer_bytes} bytes, got {total!r}")
            if not isinstance(ticket, str) or not isinstance(meta, dict):
                raise TransferError("transfer head needs a ticket and a meta object")
            chunks = _chunk_list(_json(_recv_msg(sock, 4096 + 1024 * count, "chunk list"), "chunk list"), count, total)
            peer = self._add_peer(_recv_msg(sock, MAX_METADATA, "NIXL metadata"))
            buffer = self._take(total)
            regions, offset = [], 0
            base = buffer[0].data_ptr()
            for _, _, _, _, nbytes in chunks:
                regions.append([base + offset, nbytes])
                offset += -(-nbytes // 64) * 64
            _send_msg(sock, json.dumps({"ok": True, "agent": self.agent_name, "regions": regions}).encode())
            _send_msg(sock, self._metadata())
            planned = True
            reusable = False  # from here on the sender may write into the buffer
            self._wait_written(sock, peer, ticket.encode(), opts.idle_timeout)
            reusable = True
            objs, at = [], 0
            for key, shape, dtype, compressor, nbytes in chunks:
                raw = buffer[0][at : at + nbytes]
                data = raw.view(dtype).view(shape) if compressor == "none" else raw
                objs.append(MemoryObj(key, data, shape, dtype, compressor))
                at += -(-nbytes // 64) * 64
            answer = {"ok": True, **receive(objs, meta)}
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
        if answer is not None:
            try:
                _send_msg(sock, json.dumps(answer).encode())
                if not answer["ok"] and not planned:
                    _drain(sock)  # let the sender read why before the connection closes
            except OSError:
                pass

    def _wait_written(self, sock: socket.socket, peer: str, ticket: bytes, timeout: float) -> None:
        """Wait for the sender's notification; its connection closing or a message means it gave up."""
        deadline = time.monotonic() + timeout
        pause = 0.0
        while not self._notified(peer, ticket):
            if time.monotonic() > deadline:
                raise TransferError(f"no completion from the sender within {timeout:g}s")
            readable, _, _ = select.select([sock], [], [], pause)
            if readable:
                reason = sock.recv(4096)
                raise TransferError(f"sender gave up: {reason.decode(errors='replace') or 'connection closed'}")
            pause = min(0.002, pause + 0.0001)

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
        if token:
            head["token"] = token
        registered = []
        try:
            with socket.create_connection((host, port), timeout=timeout) as sock:
                try:
                    sock.sendall(_HEAD.pack(MAGIC, VERSION))
                    _send_msg(sock, json.dumps(head).encode())
                    _send_msg(sock, json.dumps(chunks).encode())
                    _send_msg(sock, self._metadata())
                except OSError:
                    pass  # a receiver that refused stops reading; its answer says why
                plan = _json(_recv_msg(sock, (1 << 20) + 64 * len(objs), "receiver's plan"), "receiver's plan")
                if not isinstance(plan, dict) or not plan.get("ok"):
                    reason = plan.get("error") if isinstance(plan, dict) else plan
                    raise TransferError(f"receiver at {address} refused the transfer: {reason}")
                peer = self._add_peer(_recv_msg(sock, MAX_METADATA, "NIXL metadata"))
                regions = plan.get("regions")
                sizes = [p.numel() for p in payloads]
                if not isinstance(regions, list) or [_region(r)[1] for r in regions] != sizes:
                    raise TransferError(f"receiver at {address} offered regions that do not fit the chunks")
                moving = [(p, r) for p, r in zip(payloads, regions) if p.numel()]
                for payload, _ in moving:
                    registered.append(self._call("register_memory", payload))
                self._write(peer, moving, ticket.encode(), sock, timeout)
                answer = _json(_recv_msg(sock, 1 << 20, "receiver's answer"), "receiver's answer")
        except OSError as exc:
            raise TransferError(f"transfer to {address} failed: {exc}") from None
        finally:
            for reg in registered:
                self._call("deregister_memory", reg)
        if not isinstance(answer, dict) or not answer.get("ok"):
            reason = answer.get("error") if isinstance(answer, dict) else answer
            raise TransferError(f"receiver at {address} refused the transfer: {reason}")
        answer.pop("ok")
        return answer

    def _write(self, peer: str, moving: list, ticket: bytes, sock: socket.socket, timeout: float) -> None:
        agent = self.agent()
        if not moving:  # nothing to write: the notification alone says so
            self._call("send_notif", peer, ticket)
            return
        local = self._call("get_xfer_descs", [p for p, _ in moving])
        remote = self._call("get_xfer_descs", [(*_region(r), 0) for _, r in moving], "DRAM")
        handle = self._call("initialize_xfer", "WRITE", local, remote, peer, ticket)
        try:
            state = self._call("transfer", handle)
            deadline = time.monotonic() + timeout
            pause = 0.0
            while state != "DONE":
                if state == "ERR" or time.monotonic() > deadline:
                    sock.sendall(b"write failed")
                    raise TransferError(f"NIXL write to {peer} failed ({state})")
                time.sleep(pause)
                pause = min(0.001, pause + 0.00005)
                with self._agent_lock:
                    state = agent.check_xfer_state(handle)
        finally:
            self._call("release_xfer_handle", handle)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._agent_lock:
            agent, self._agent = self._agent, None
            regs = [reg for _, reg in self._free] + [reg for _, (_, reg) in self._quarantine]
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
