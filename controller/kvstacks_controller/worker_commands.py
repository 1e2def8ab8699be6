"""The worker protocol: how agents register, heartbeat and report chunks.

These are commands like any other, guarded by KVSTACKS_WORKER_TOKEN. Chunk hashes
travel as one hex string of concatenated 16-byte digests: a batch of thousands
decodes with one ``bytes.fromhex``.
"""

from __future__ import annotations

from typing import Any

from kvstacks_controller.cluster import Cluster
from kvstacks_controller.command import Command, CommandError
from kvstacks_controller.index import HASH_BYTES
from kvstacks_controller.registry import Worker

_NAME = {"type": "string", "minLength": 1, "maxLength": 256}
_IDS = {
    "instance_id": _NAME,
    "worker_id": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
    "session": {"type": "string", "minLength": 1, "maxLength": 128},
}
_IDS_REQUIRED = ["instance_id", "worker_id", "session"]


def _obj(required: list[str], **props: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "required": _IDS_REQUIRED + required,
        "properties": {**_IDS, **props},
        "additionalProperties": False,
    }


def _address(ctx: Cluster, text: str, field: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CommandError(400, f"{field}: expected host:port, got {text!r}")
    try:
        ctx.settings.check_worker_address(host)
    except ValueError as exc:
        raise CommandError(403, f"{field}: {exc}") from None
    return text


def _known(ctx: Cluster, body: dict[str, Any]) -> Worker:
    worker = ctx.registry.get(body["instance_id"], body["worker_id"], body["session"])
    if worker is None:
        # The controller restarted or the worker was replaced: the agent registers
        # again and re-reports what it holds.
        raise CommandError(
            409,
            f"worker {body['instance_id']}/{body['worker_id']} (session {body['session']}) "
            "is not registered; register again",
            reregister=True,
        )
    return worker


class WorkerRegister(Command):
    """A worker agent announces itself; its previous session's chunks are forgotten."""

    name = "worker/register"
    auth = "worker"
    summary = "Worker protocol: register (or re-register) a worker agent"
    request_schema = _obj(
        ["address", "chunk_size", "tiers"],
        address={"type": "string", "minLength": 3, "maxLength": 300},
        chunk_size={"type": "integer", "minimum": 1, "maximum": 1 << 20},
        tiers={
            "type": "array",
            "minItems": 1,
            "maxItems": 64,
            "items": {"type": "string", "minLength": 1, "maxLength": 128},
        },
        model={"type": "string", "maxLength": 256},
        version={"type": "string", "maxLength": 64},
        pid={"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
        transfer={"type": "object", "description": "channel name -> host:port"},
    )

    async def run(self, ctx: Cluster, body: dict[str, Any]) -> dict[str, Any]:
        if len(set(body["tiers"])) != len(body["tiers"]):
            raise CommandError(400, "tiers: each tier name must appear once")
        transfer = body.get("transfer", {})
        if len(transfer) > 16 or not all(isinstance(v, str) and len(k) <= 64 for k, v in transfer.items()):
            raise CommandError(400, "transfer: expected at most 16 entries of channel name -> 'host:port'")
        worker = Worker(
            instance_id=body["instance_id"],
            worker_id=body["worker_id"],
            session=body["session"],
            address=_address(ctx, body["address"], "address"),
            chunk_size=body["chunk_size"],
            tiers=list(body["tiers"]),
            model=body.get("model", ""),
            pid=body.get("pid", 0),
            version=body.get("version", ""),
            transfer={k: _address(ctx, v, f"transfer.{k}") for k, v in transfer.items()},
        )
        ctx.add_worker(worker)
        return {"registered": True, "heartbeat_timeout": ctx.registry.heartbeat_timeout}


class WorkerHeartbeat(Command):
    """A worker is alive; ``stats`` is its engine's per-tier statistics."""

    name = "worker/heartbeat"
    auth = "worker"
    summary = "Worker protocol: heartbeat with per-tier stats"
    request_schema = _obj([], stats={"type": "object"})

    async def run(self, ctx: Cluster, body: dict[str, Any]) -> dict[str, Any]:
        ctx.registry.beat(_known(ctx, body), body.get("stats"))
        return {"ok": True}


def _holder(worker: Worker, tier: str) -> int:
    hid = worker.holders.get(tier)
    if hid is None:
        raise CommandError(
            404,
            f"worker {worker.instance_id}/{worker.worker_id} registered no tier "
            f"{tier!r}; its tiers: {', '.join(worker.tiers)}",
        )
    return hid


_REPORT = {
    "tier": {"type": "string", "minLength": 1, "maxLength": 128},
    "hashes": {"type": "string", "description": "concatenated 16-byte chunk hashes, hex"},
}


class _ChunkReport(Command):
    kind = ""
    request_schema = _obj(["tier", "hashes"], **_REPORT)

    async def run(self, ctx: Cluster, body: dict[str, Any]) -> dict[str, Any]:
        worker = _known(ctx, body)
        hid = _holder(worker, body["tier"])
        if body.get("replace"):
            ctx.index.clear_holder(hid)
            ctx.resyncs += 1
        raw = _hashes(body["hashes"])
        count = len(raw) // HASH_BYTES
        changed = ctx.index.admit(hid, raw) if self.kind == "admit" else ctx.index.evict(hid, raw)
        ctx.chunk_events[self.kind] += count
        return {"chunks": count, "changed": changed}


class WorkerAdmit(_ChunkReport):
    """Chunks became present in a tier of the worker (``replace``: the tier holds these and no others;
    a resync sends it on its first batch)."""

    name = "worker/admit"
    kind = "admit"
    auth = "worker"
    summary = "Worker protocol: chunks admitted to a tier"
    request_schema = _obj(
        ["tier", "hashes"],
        **_REPORT,
        replace={"type": "boolean", "description": "forget what the index had for this tier first"},
    )


class WorkerEvict(_ChunkReport):
    """Chunks left a tier of the worker."""

    name = "worker/evict"
    kind = "evict"
    auth = "worker"
    summary = "Worker protocol: chunks evicted from a tier"


class WorkerDigest(Command):
    """A worker's digest of each tier (chunk count and XOR of chunk hashes), sent every
    ``resync_interval``; the answer names the tiers where the index differs, which the worker
    then re-sends in full (``worker/admit`` with ``replace``)."""

    name = "worker/digest"
    auth = "worker"
    summary = "Worker protocol: compare per-tier digests with the chunk index"
    request_schema = _obj(
        ["tiers"],
        tiers={
            "type": "array",
            "maxItems": 64,
            "items": {
                "type": "object",
                "required": ["tier", "chunks", "xor"],
                "additionalProperties": False,
                "properties": {
                    "tier": {"type": "string", "minLength": 1, "maxLength": 128},
                    "chunks": {"type": "integer", "minimum": 0},
                    "xor": {"type": "string", "minLength": 32, "maxLength": 32},
                },
            },
        },
    )

    async def run(self, ctx: Cluster, body: dict[str, Any]) -> dict[str, Any]:
        worker = _known(ctx, body)
        stale = []
        for digest in body["tiers"]:
            chunks, xor = ctx.index.digest(_holder(worker, digest["tier"]))
            if chunks != digest["chunks"] or xor != digest["xor"].lower():
                stale.append(digest["tier"])
        ctx.digests["stale" if stale else "match"] += 1
        return {"stale": stale}


class WorkerLocate(Command):
    """P2P retrieve: which other instances hold how much of a chunk chain, most first."""

    name = "worker/locate"
    mutating = False
    auth = "worker"
    summary = "Worker protocol: peers (same rank, model, chunk size) holding a chain of chunk hashes"
    request_schema = _obj(
        ["hashes"],
        hashes={"type": "string", "description": "concatenated 16-byte chunk hashes of a prefix chain, hex"},
    )

    async def run(self, ctx: Cluster, body: dict[str, Any]) -> dict[str, Any]:
        me = _known(ctx, body)
        raw = _hashes(body["hashes"])
        peers = [
            w
            for w in ctx.registry.healthy_workers()
            if w.instance_id != me.instance_id
            and w.worker_id == me.worker_id
            and w.model == me.model
            and w.chunk_size == me.chunk_size
        ]
        counts = ctx.index.prefix_lengths(raw, [list(w.holders.values()) for w in peers]).tolist() if raw else []
        found = sorted(
            ((count, w) for count, w in zip(counts, peers) if count),
            key=lambda item: (-item[0], item[1].instance_id),
        )
        return {
            "peers": [
                {"instance_id": w.instance_id, "address": w.address, "transfer": dict(w.transfer), "chunks": count}
                for count, w in found
            ]
        }


def _hashes(text: str) -> bytes:
    if len(text) % (2 * HASH_BYTES):
        raise CommandError(400, f"hashes: expected a multiple of {2 * HASH_BYTES} hex digits, got {len(text)}")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise CommandError(400, "hashes: not a hex string") from None


class WorkerDeregister(Command):
    """A worker is closing: forget it and its chunks."""

    name = "worker/deregister"
    auth = "worker"
    summary = "Worker protocol: deregister a worker agent"
    request_schema = _obj([])

    async def run(self, ctx: Cluster, body: dict[str, Any]) -> dict[str, Any]:
        ctx.remove_worker(_known(ctx, body))
        return {"deregistered": True}


COMMANDS = (
    WorkerRegister,
    WorkerHeartbeat,
    WorkerAdmit,
    WorkerEvict,
    WorkerDigest,
    WorkerLocate,
    WorkerDeregister,
)
