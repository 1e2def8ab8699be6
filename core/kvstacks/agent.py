"""The worker agent: connects one engine to a kvstacks controller.

It runs beside the engine in two daemon threads and never blocks it:

- the *reporter* registers with the controller, heartbeats with the engine's
  stats, and ships admitted/evicted chunk hashes in coalesced, bounded batches.
  Whenever the controller does not know it (a controller restart, a failed
  report, a queue overflow) it registers again and re-reports everything the
  engine holds (``engine.keys()``), so the cluster view heals within one
  heartbeat interval plus a resync. Drift nobody noticed (a report lost on the
  way) is caught by a digest per tier every ``resync_interval``: a tier whose
  digest differs from the controller's twice in a row is re-sent in full;
- the *command server*, a small HTTP server on loopback, runs the controller's
  commands (clear, pin, compress, move, ...) against the engine's public API.

Moves between instances go through a transfer channel plugin (``tcp`` built in).
``KVSTACKS_WORKER_TOKEN`` (read by both sides) guards every call either way.
"""

from __future__ import annotations

import collections
import hmac
import json
import logging
import operator
import os
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

import numpy as np

from kvstacks.config import Size, is_loopback
from kvstacks.errors import ConfigError, KVStacksError
from kvstacks.keys import CacheKey
from kvstacks.memory import MemoryObj
from kvstacks.transfer import TransferChannel

if TYPE_CHECKING:
    from kvstacks.engine import Cleared

log = logging.getLogger("kvstacks.agent")

TOKEN_ENV = "KVSTACKS_WORKER_TOKEN"


@dataclass
class AgentOptions:
    """The stack YAML's ``controller:`` section."""

    url: str
    instance_id: str
    #: This worker's id inside the instance; defaults to the engine's rank.
    worker_id: int | None = None
    #: Where the command server and transfer channels listen (loopback unless you need otherwise).
    listen_host: str = "127.0.0.1"
    listen_port: int = 0
    #: The host the controller and peers should dial, when not listen_host.
    advertise_host: str | None = None
    heartbeat_interval: float = 2.0
    request_timeout: float = 5.0
    #: Chunk hashes per admit/evict report.
    batch_size: int = 4096
    #: How long events wait to be coalesced into one report.
    flush_interval: float = 0.05
    #: Queued chunk events beyond this are dropped and replaced by a full resync.
    max_pending: int = 1 << 18
    #: Seconds between checks of the controller's index against the engine (a digest per tier);
    #: a lost report is corrected within this plus ``_CONFIRM`` seconds and one resync.
    resync_interval: float = 30.0
    #: Transfer channels to open (default: every installed one).
    transfer_channels: list[str] | None = None
    #: Options of each transfer channel, by name (e.g. ``{tcp: {max_frame_bytes: 256MiB}}``).
    transfer_options: dict[str, Any] = field(default_factory=dict)
    max_command_bytes: Size = Size(64 << 20)


def parse_options(section: Any) -> AgentOptions:
    from kvstacks.config import build_options

    options = build_options(AgentOptions, section, "controller")
    if not options.url.startswith(("http://", "https://")):
        raise ConfigError("controller.url", f"expected http://host:port, got {options.url!r}")
    if not options.instance_id:
        raise ConfigError("controller.instance_id", "must not be empty")
    for name in ("heartbeat_interval", "request_timeout", "flush_interval", "resync_interval"):
        if getattr(options, name) <= 0:
            raise ConfigError(f"controller.{name}", "must be a positive number of seconds")
    for name in ("batch_size", "max_pending"):
        if getattr(options, name) <= 0:
            raise ConfigError(f"controller.{name}", "must be a positive integer")
    if not 0 <= options.listen_port < 65536:
        raise ConfigError("controller.listen_port", "must be 0 (any free port) or a port number")
    options.transfer_options = _channel_options(options)
    return options


def _channel_options(options: AgentOptions) -> dict[str, Any]:
    """Each channel's options section checked against its ``Options`` (at config time, not at listen)."""
    from kvstacks.config import build_options
    from kvstacks.plugins import registry

    reg = registry()
    installed = reg.names("transfer_channels")
    opened = installed if options.transfer_channels is None else options.transfer_channels
    built = {}
    for name, section in options.transfer_options.items():
        path = f"controller.transfer_options.{name}"
        if name not in opened:
            raise ConfigError(path, f"no such channel is opened here; opened: {', '.join(opened) or 'none'}")
        if ("transfer_channels", name) not in reg:
            continue  # reported with its install hint when the channels open
        built[name] = build_options(reg.get("transfer_channels", name).Options, section, path)
    return built


class ControllerRefused(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(f"HTTP {status}: {body.get('error', body)}")
        self.status = status
        self.body = body


class Agent:
    def __init__(self, engine: Any, options: AgentOptions, token: str | None = None) -> None:
        self.engine = engine
        self.options = options
        self.token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        self.url = options.url.rstrip("/")
        self.worker_id = options.worker_id if options.worker_id is not None else engine.config.rank
        self.session = uuid.uuid4().hex
        self.address = ""
        self.channels: dict[str, TransferChannel] = {}
        self.channel_addresses: dict[str, str] = {}
        self.registered = False
        self.registrations = 0
        self.digest_checks = 0
        self.resyncs = 0
        self._next_check = 0.0
        self._suspect: set[str] = set()  # tiers whose digest differed at the last check
        self._events: collections.deque[tuple[str, str, list[CacheKey]]] = collections.deque()
        self._pending = 0
        self._overflowed = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        self._pulls: dict[str, tuple[list[CacheKey], list[MemoryObj]]] = {}

    # ---------------------------------------------------------------- life cycle

    def start(self) -> None:
        host = self.options.listen_host
        if not self.token and not is_loopback(host):
            raise ConfigError(
                "controller.listen_host",
                f"listening on {host} (beyond loopback) needs {TOKEN_ENV}: without it anyone who reaches "
                "this port may send chunks and commands; set it to a long random string (the same for the "
                "controller and every worker), or listen on 127.0.0.1",
            )
        self._server = ThreadingHTTPServer((host, self.options.listen_port), _handler_for(self))
        self._server.daemon_threads = True
        self.address = f"{self.options.advertise_host or host}:{self._server.server_address[1]}"
        self._open_channels()
        for tier in self.engine.tiers:
            attach = getattr(tier.backend, "attach", None)
            if attach is not None:
                attach(self)  # the peer tier pulls through this agent
        for target, name in (
            (self._server.serve_forever, "kvstacks-agent-commands"),
            (self._report_loop, "kvstacks-agent-reporter"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _open_channels(self) -> None:
        from kvstacks.plugins import registry

        reg = registry()
        wanted = self.options.transfer_channels
        names = reg.names("transfer_channels") if wanted is None else wanted
        for name in names:
            if ("transfer_channels", name) not in reg:
                raise ConfigError(
                    "controller.transfer_channels",
                    f"{name!r} is not installed; installed: "
                    f"{', '.join(reg.names('transfer_channels')) or 'none'}",
                )
        if wanted is None:
            names = sorted(names, key=lambda n: -reg.get("transfer_channels", n).preference)
        for name in names:
            channel = reg.create("transfer_channels", name, self.options.transfer_options.get(name))
            try:
                address = channel.listen(self.options.listen_host, 0, self._receive, self.token)
            except Exception as exc:
                log.warning("transfer channel %s did not open: %s", name, exc)
                continue
            host, _, port = address.rpartition(":")
            self.channels[name] = channel
            self.channel_addresses[name] = f"{self.options.advertise_host or host}:{port}"

    def close(self, timeout: float = 2.0) -> None:
        """Flush what is queued (briefly), deregister, stop listening."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        for thread in self._threads[1:]:
            thread.join(timeout)
        if self.registered:
            try:
                self._post(
                    "/worker/deregister", self._ids(), timeout=min(timeout, self.options.request_timeout)
                )
            except Exception as exc:
                log.info(
                    "deregister from %s failed (the controller will time this worker out): %s", self.url, exc
                )
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for channel in self.channels.values():
            try:
                channel.close()
            except Exception as exc:
                log.warning("closing transfer channel %s: %s", channel.name, exc)

    # ---------------------------------------------------------------- engine events

    def report(self, kind: str, tier: str, keys: list[CacheKey]) -> None:
        """Queue a batch of admitted/evicted keys; O(1), never waits on the network."""
        if not keys or self._stop.is_set():
            return
        with self._lock:
            if self._overflowed:
                return
            if self._pending + len(keys) > self.options.max_pending:
                # The controller will get a full resync instead of a gap.
                self._events.clear()
                self._pending = 0
                self._overflowed = True
            else:
                self._events.append((kind, tier, keys))
                self._pending += len(keys)
        self._wake.set()

    def _take(self) -> list[tuple[str, str, list[CacheKey]]]:
        with self._lock:
            return self._take_locked()

    def _take_locked(self) -> list[tuple[str, str, list[CacheKey]]]:
        events = list(self._events)
        self._events.clear()
        self._pending = 0
        if self._overflowed:
            self._overflowed = False
            self.registered = False
        return events

    # ---------------------------------------------------------------- reporter thread

    def _ids(self) -> dict[str, Any]:
        return {"instance_id": self.options.instance_id, "worker_id": self.worker_id, "session": self.session}

    def _report_loop(self) -> None:
        next_beat = 0.0
        backoff = min(0.2, self.options.heartbeat_interval)
        while not self._stop.is_set():
            try:
                if not self.registered:
                    self._register()
                    next_beat = time.monotonic() + self.options.heartbeat_interval
                    backoff = min(0.2, self.options.heartbeat_interval)
                if time.monotonic() >= next_beat:
                    self._post("/worker/heartbeat", {**self._ids(), "stats": self._stats()})
                    next_beat = time.monotonic() + self.options.heartbeat_interval
                self._flush(self._take())
                if self.registered and time.monotonic() >= self._next_check:
                    self._check_index()
            except ControllerRefused as exc:
                if exc.status == 409:
                    log.info("controller forgot this worker (restarted?); registering again")
                else:
                    log.warning("controller refused a report: %s", exc)
                self.registered = False
            except Exception as exc:
                if self.registered:
                    log.warning("controller at %s unreachable (%s); will register again", self.url, exc)
                self.registered = False
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.options.heartbeat_interval)
                continue
            wait = max(0.0, min(next_beat, self._next_check) - time.monotonic())
            wait = min(wait, self.options.heartbeat_interval)
            if self._wake.wait(wait):
                self._wake.clear()
                self._stop.wait(self.options.flush_interval)  # let a burst coalesce
        # Closing: one last flush of what the engine reported before shutdown.
        if self.registered:
            try:
                self._flush(self._take())
            except Exception as exc:
                log.info("final report failed: %s", exc)

    def _register(self) -> None:
        engine = self.engine
        self._take()  # the resync below covers whatever was queued
        self._post(
            "/worker/register",
            {
                **self._ids(),
                "address": self.address,
                "chunk_size": engine.config.chunk_size,
                "tiers": [t.name for t in engine.tiers],
                "model": engine.config.model,
                "pid": os.getpid(),
                "version": _version(),
                "transfer": dict(self.channel_addresses),
            },
        )
        self.registered = True
        self.registrations += 1
        self._suspect.clear()
        self._next_check = time.monotonic() + self.options.resync_interval
        for tier, keys in engine.keys().items():
            self._send_hashes("admit", tier, keys)

    def _check_index(self) -> None:
        """Compare a digest of each tier with the controller's index; re-send a tier that differs twice in a row."""
        with self._lock:
            # Events queued before the snapshot go out first, so both sides digest the same moment.
            # (engine.keys() takes each tier's lock under ours: the engine never reports holding one.)
            events = self._take_locked()
            digests = [{"tier": tier, **digest(keys)} for tier, keys in self.engine.keys().items()]
        if not self.registered:
            return  # the queue overflowed: registering again resyncs everything
        self._flush(events)
        try:
            answer = self._post("/worker/digest", {**self._ids(), "tiers": digests})
        except ControllerRefused as exc:
            if exc.status != 404 or exc.body:
                raise
            log.warning("the controller at %s does not check digests (an older version?); its index "
                        "heals only when this worker registers again", self.url)
            self._next_check = float("inf")  # until the next registration
            return
        self.digest_checks += 1
        stale = {tier for tier in answer.get("stale", ()) if isinstance(tier, str)}
        drifted = stale & self._suspect
        for tier in sorted(drifted):
            self._resync(tier)
        # A change the engine made but had not reported yet at the snapshot makes one check
        # differ; a second look a moment later tells real drift from that.
        self._suspect = stale - drifted
        later = min(_CONFIRM, self.options.resync_interval) if self._suspect else self.options.resync_interval
        self._next_check = time.monotonic() + later

    def _resync(self, tier: str) -> None:
        """Replace what the controller's index has for ``tier`` with what the engine holds."""
        with self._lock:
            events = self._take_locked()
            keys = self.engine.keys(tier)[tier]
        self._flush(events)
        log.info("controller's index differed for tier %s; re-sending its %d chunks", tier, len(keys))
        self._send_hashes("admit", tier, keys, replace=True)
        self.resyncs += 1

    def _flush(self, events: list[tuple[str, str, list[CacheKey]]]) -> None:
        # Only a chunk's last event counts (admitted then evicted is evicted), so a burst of
        # interleaved stores and evictions costs at most two reports per tier, not one per run.
        last: dict[str, dict[CacheKey, str]] = {}
        for kind, tier, keys in events:
            last.setdefault(tier, {}).update(dict.fromkeys(keys, kind))
        for tier, final in last.items():
            for kind in ("evict", "admit"):
                keys = [key for key, k in final.items() if k == kind]
                if keys:
                    self._send_hashes(kind, tier, keys)

    def _send_hashes(self, kind: str, tier: str, keys: list[CacheKey], replace: bool = False) -> None:
        """Report ``keys`` in batches; with ``replace``, the first batch (sent even when empty)
        tells the controller to forget what it had for ``tier``."""
        size = self.options.batch_size
        for start in range(0, max(len(keys), int(replace)), size):
            batch = keys[start : start + size]
            body = {**self._ids(), "tier": tier, "hashes": b"".join(k.chunk_hash for k in batch).hex()}
            if replace and not start:
                body["replace"] = True
            self._post(f"/worker/{kind}", body)

    def _stats(self) -> dict[str, Any]:
        try:
            return json.loads(json.dumps(self.engine.stats(), default=str))
        except Exception as exc:
            return {"error": {"message": str(exc)}}

    def _post(self, path: str, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.url + path, data=data, headers=headers, method="POST")
        try:
            with _opener.open(request, timeout=timeout or self.options.request_timeout) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            try:
                answer = json.loads(exc.read() or b"{}")
            except ValueError:
                answer = {}
            raise ControllerRefused(exc.code, answer if isinstance(answer, dict) else {}) from None

    # ---------------------------------------------------------------- commands

    def run_command(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        handler = self._ops().get(op)
        if handler is None:
            raise KVStacksError(f"unknown command {op!r}; this worker runs: {', '.join(sorted(self._ops()))}")
        return handler(args)

    def _ops(self) -> dict[str, Callable[[dict[str, Any]], dict[str, Any]]]:
        e = self.engine
        return {
            "lookup_tiers": lambda a: {"tiers": e.lookup_tiers(a["tokens"])},
            "clear": lambda a: self._cleared(e.clear(a.get("tier"))),
            "pin": lambda a: {"num_tokens": e.pin(a["tokens"], a.get("ttl"), a.get("tier"))},
            "unpin": lambda a: {"num_tokens": e.unpin(a["tokens"], a.get("tier"))},
            "remove": lambda a: {"num_tokens": e.remove(a["tokens"], a.get("tier"))},
            "compress": lambda a: {"num_tokens": e.compress(a["tokens"], a["method"], self._tier(a))},
            "decompress": lambda a: {"num_tokens": e.decompress(a["tokens"], self._tier(a))},
            "move_local": lambda a: {
                "num_tokens": e.move(a["tokens"], a["src_tier"], a["dst_tier"], bool(a.get("copy", False)))
            },
            "send": self._send,
            "stats": lambda a: {"stats": self._stats()},
        }

    def _tier(self, args: dict[str, Any]) -> str:
        tier = args.get("tier")
        if not tier:
            raise KVStacksError("this command needs one location (tier), not all of them")
        return tier

    def _cleared(self, cleared: Cleared) -> dict[str, Any]:
        return {"num_chunks": cleared.chunks, "num_tokens": cleared.tokens}

    def _send(self, args: dict[str, Any]) -> dict[str, Any]:
        """Ship the prefix held in ``tier`` to a peer; remove it here only once the peer confirmed."""
        channel = self.channels.get(args["channel"])
        if channel is None:
            raise KVStacksError(
                f"transfer channel {args['channel']!r} is not open here; open: "
                f"{', '.join(self.channels) or 'none'}"
            )
        ticket = args.get("pull")
        if ticket is not None:
            # A peer's P2P retrieve: a copy of what this engine itself holds, by chunk hashes.
            objs = self.engine.export_keys(self._keys(args["hashes"]), args.get("tier"))
            meta: dict[str, Any] = {"pull": str(ticket)}
        else:
            objs = self.engine.export_chunks(args["tokens"], self._tier(args))
            meta = {"tier": args["dst_tier"]}
        if not objs:
            return {"num_tokens": 0, "sent_chunks": 0}
        answer = channel.send(
            args["address"],
            objs,
            meta,
            timeout=float(args.get("timeout") or max(self.options.request_timeout, 60.0)),
            token=self.token,
        )
        confirmed = answer.get("num_tokens", 0)
        if not isinstance(confirmed, int) or confirmed < 0:
            raise KVStacksError(f"peer answered an unusable token count {confirmed!r}; source kept")
        removed = 0
        if ticket is None and not args.get("copy", False) and confirmed:
            removed = self.engine.remove(list(args["tokens"])[:confirmed], args["tier"])
        return {"num_tokens": confirmed, "sent_chunks": len(objs), "removed_tokens": removed}

    def _receive(self, objs: list[MemoryObj], meta: dict[str, Any]) -> dict[str, Any]:
        cfg = self.engine.config
        for obj in objs:
            key = obj.key
            if (key.model, key.kv_format, key.world_size, key.rank) != (
                cfg.model,
                cfg.kv_format,
                cfg.world_size,
                cfg.rank,
            ):
                raise KVStacksError(
                    f"chunk for {key.model}/{key.kv_format} rank {key.rank} of {key.world_size} "
                    f"cannot go to {cfg.model}/{cfg.kv_format} rank {cfg.rank} of {cfg.world_size}"
                )
        if "pull" in meta:
            return self._pulled(str(meta["pull"]), objs)
        tier = meta.get("tier")
        if tier is not None and not isinstance(tier, str):
            raise KVStacksError("transfer meta 'tier' must be a tier name")
        return {"num_tokens": self.engine.import_chunks(objs, tier)}

    def _keys(self, text: Any) -> list[CacheKey]:
        cfg = self.engine.config
        if not isinstance(text, str) or len(text) % 32:
            raise KVStacksError("hashes: expected concatenated 16-byte chunk hashes, hex")
        raw = bytes.fromhex(text)
        return [
            CacheKey(cfg.model, cfg.kv_format, cfg.world_size, cfg.rank, raw[i : i + 16])
            for i in range(0, len(raw), 16)
        ]

    # ---------------------------------------------------------------- P2P retrieve

    def locate(self, keys: list[CacheKey]) -> list[dict[str, Any]]:
        """Other instances holding a prefix of ``keys``, longest first (the controller's answer)."""
        if not self.registered or not keys:
            return []
        answer = self._post("/worker/locate", {**self._ids(), "hashes": b"".join(k.chunk_hash for k in keys).hex()})
        peers = answer.get("peers")
        return [p for p in peers if isinstance(p, dict)] if isinstance(peers, list) else []

    def pull(
        self, keys: list[CacheKey], peers: list[dict[str, Any]], channel: str | None, timeout: float
    ) -> list[MemoryObj]:
        """The longest prefix of ``keys`` one of ``peers`` sends; a peer that fails or lies yields nothing."""
        for peer in peers[:2]:
            try:
                objs = self._pull_from(peer, keys, channel, timeout)
            except Exception as exc:
                log.warning("P2P pull from %s failed, treating as a miss: %s", peer.get("instance_id"), exc)
                continue
            if objs:
                return objs
        return []

    def _pull_from(
        self, peer: dict[str, Any], keys: list[CacheKey], channel: str | None, timeout: float
    ) -> list[MemoryObj]:
        theirs = peer.get("transfer") if isinstance(peer.get("transfer"), dict) else {}
        names = [channel] if channel else list(self.channel_addresses)
        common = [n for n in names if n in self.channel_addresses and n in theirs]
        if not common:
            raise KVStacksError(f"no transfer channel in common (here: {', '.join(names)}; peer: {', '.join(theirs)})")
        count = peer.get("chunks")
        wanted = keys[: count if isinstance(count, int) and count > 0 else len(keys)]
        ticket = uuid.uuid4().hex
        self._pulls[ticket] = (wanted, [])
        try:
            self._command(
                str(peer.get("address")),
                "send",
                {
                    "pull": ticket,
                    "hashes": b"".join(k.chunk_hash for k in wanted).hex(),
                    "channel": common[0],
                    "address": self.channel_addresses[common[0]],
                    "timeout": timeout,
                },
                timeout,
            )
        finally:
            _, got = self._pulls.pop(ticket)
        return got

    def _pulled(self, ticket: str, objs: list[MemoryObj]) -> dict[str, Any]:
        """Chunks a peer sent for one of our pulls: keep the run that matches what was asked."""
        waiting = self._pulls.get(ticket)
        if waiting is None:
            raise KVStacksError("no pull is waiting for this transfer")
        wanted, got = waiting
        for key, obj in zip(wanted, objs):
            if obj.key != key or len(obj.shape) != 4 or obj.shape[0] != 2:
                break
            # The channel may reuse its buffer once this returns.
            got.append(MemoryObj(obj.key, obj.data.clone(), obj.shape, obj.dtype, obj.compressor))
        return {"num_tokens": sum(o.num_tokens for o in got)}

    def _command(self, address: str, op: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Run a command on another worker's agent."""
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(
            f"http://{address}/command", json.dumps({"op": op, "args": args}).encode(), headers, method="POST"
        )
        try:
            with _opener.open(request, timeout=timeout) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raise KVStacksError(f"worker at {address} refused {op}: HTTP {exc.code} {exc.read()[:300]!r}") from None


#: Seconds before a tier whose digest differed is checked again (and re-sent if it still differs).
_CONFIRM = 1.0
_CHUNK_HASH = operator.attrgetter("chunk_hash")  # ~1.7x a generator expression over 100,000 keys


def digest(keys: list[CacheKey]) -> dict[str, Any]:
    """``{"chunks", "xor"}`` of a tier: how many chunks, and the XOR of their 16-byte hashes as two
    little-endian 64-bit halves in hex (what the controller's index keeps per holder)."""
    xor = np.zeros(2, dtype="<u8")
    if keys:
        halves = np.frombuffer(b"".join(map(_CHUNK_HASH, keys)), dtype="<u8").reshape(-1, 2)
        xor = np.bitwise_xor.reduce(halves, axis=0)
    return {"chunks": len(keys), "xor": xor.astype("<u8").tobytes().hex()}


def _version() -> str:
    try:
        import importlib.metadata

        return importlib.metadata.version("kvstacks")
    except Exception:
        return ""


# The controller is reached directly, never through an environment proxy.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _handler_for(agent: Agent) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "kvstacks-agent"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("command server: " + format, *args)

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._answer(200, {"status": "ok", **agent._ids(), "registered": agent.registered})
            else:
                self._answer(404, {"error": "not found; POST /command"})

        def do_POST(self) -> None:
            if agent.token:
                header = self.headers.get("Authorization", "")
                scheme, _, token = header.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode(), agent.token.encode()
                ):
                    self._answer(401, {"error": f"missing or wrong bearer token ({TOKEN_ENV})"})
                    return
            if self.path != "/command":
                self._answer(404, {"error": "not found; POST /command"})
                return
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            if not 0 <= length <= agent.options.max_command_bytes:
                self._answer(
                    413, {"error": f"command body must be 0..{agent.options.max_command_bytes} bytes"}
                )
                self.close_connection = True
                return
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                if (
                    not isinstance(body, dict)
                    or not isinstance(body.get("op"), str)
                    or not isinstance(body.get("args", {}), dict)
                ):
                    raise ValueError("expected {op: str, args: object}")
                result = agent.run_command(body["op"], body.get("args", {}))
            except (KVStacksError, ValueError, KeyError, TypeError) as exc:
                reason = f"missing argument {exc}" if isinstance(exc, KeyError) else str(exc)
                self._answer(400, {"error": reason})
                return
            except Exception as exc:
                log.exception("command failed")
                self._answer(500, {"error": f"{type(exc).__name__}: {exc}"})
                return
            self._answer(200, result)

    return Handler
