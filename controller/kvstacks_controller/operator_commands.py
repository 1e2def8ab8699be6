"""The builtin operator commands: LMCache's controller API, plus batch lookup and service routes.

Registered through ``register_commands`` by :mod:`kvstacks_controller.plugin`,
exactly as a third-party command would be.
"""

from __future__ import annotations

from typing import Any

from kvstacks.plugins import describe
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import JSONResponse, Response

from kvstacks_controller.cluster import Cluster
from kvstacks_controller.command import Command, CommandError
from kvstacks_controller.executor import Event
from kvstacks_controller.registry import Worker

TOKENS = {"$ref": "#/components/schemas/Tokens"}
INSTANCE = {"type": "string", "minLength": 1, "maxLength": 256}
LOCATION = {"type": "string", "minLength": 1, "maxLength": 128}
POSITION = {
    "type": "array",
    "items": {"type": "string", "minLength": 1, "maxLength": 256},
    "minItems": 2,
    "maxItems": 2,
    "description": "[instance_id, location]",
}
EVENT_ANSWER = {
    "type": "object",
    "properties": {"event_id": {"type": "string"}, "num_tokens": {"type": "integer"}},
}
LAYOUT = {
    "type": "object",
    "description": "instance_id -> [location, matched prefix tokens]",
    "additionalProperties": {"type": "array"},
}


def _obj(required: list[str], **props: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props, "additionalProperties": False}


def answer(event: Event, **pending_fields: Any) -> Any:
    """The HTTP answer for an executed event: its result, 202 while pending, or its error."""
    if event.status == "finished":
        return {"event_id": event.event_id, **event.result}
    if event.status == "pending":
        return JSONResponse(
            {"event_id": event.event_id, "status": "pending", **pending_fields}, status_code=202
        )
    raise CommandError(event.code if 400 <= event.code < 600 else 502, event.reason, event_id=event.event_id)


def _tokens_from(results: list[dict[str, Any]], key: str = "num_tokens") -> list[int]:
    out = []
    for result in results:
        value = result.get(key, 0)
        out.append(value if isinstance(value, int) and not isinstance(value, bool) else 0)
    return out


class Lookup(Command):
    """Where the longest cached prefix of a prompt is, per instance."""

    name = "lookup"
    mutating = False
    summary = "Longest cached prefix of tokens, per instance: {instance_id: [location, matched_tokens]}"
    request_schema = _obj(["tokens"], tokens=TOKENS, salt={"type": "string", "maxLength": 1024})
    response_schema = {
        "type": "object",
        "required": ["event_id", "layout_info"],
        "properties": {"event_id": {"type": "string"}, "layout_info": LAYOUT},
    }

    async def run(self, ctx: Cluster, body: dict[str, Any]) -> dict[str, Any]:
        layout = ctx.lookup(body["tokens"], body.get("salt", ""))
        event = ctx.executor.finished(self.name, {"instances": len(layout)})
        return {"event_id": event.event_id, "layout_info": layout}


class BatchLookup(Command):
    """Many prompts in one call (instead of one /lookup per request)."""

    name = "batch_lookup"
    mutating = False
    summary = "Lookup of many token lists in one call: {event_id, results: [layout_info, ...]}"
    request_schema = _obj(
        ["tokens_list"],
        tokens_list={"$ref": "#/components/schemas/TokensBatch"},
        salt={"type": "string", "maxLength": 1024},
    )
    response_schema = {
        "type": "object",
        "required": ["event_id", "results"],
        "properties": {"event_id": {"type": "string"}, "results": {"type": "array", "items": LAYOUT}},
    }

    async def run(self, ctx: Cluster, body: dict[str, Any]) -> dict[str, Any]:
        total = sum(len(t) for t in body["tokens_list"])
        if total > ctx.settings.max_tokens:
            raise CommandError(
                413,
                f"tokens_list holds {total} tokens in all, more than the limit of "
                f"{ctx.settings.max_tokens}; split it over several calls",
            )
        salt = body.get("salt", "")
        results = [ctx.lookup(tokens, salt) for tokens in body["tokens_list"]]
        event = ctx.executor.finished(self.name, {"prompts": len(results)})
        return {"event_id": event.event_id, "results": results}


class Clear(Command):
    """Remove every chunk of one location (or all locations) of an instance."""

    name = "clear"
    summary = "Clear one location of an instance (every location when omitted or 'all')"
    request_schema = _obj(["instance_id"], instance_id=INSTANCE, location=LOCATION)
    response_schema = EVENT_ANSWER

    async def run(self, ctx: Cluster, body: dict[str, Any]) -> Any:
        workers = ctx.instance_workers(body["instance_id"])
        tier = ctx.resolve_location(workers, body.get("location"))

        async def work() -> dict[str, Any]:
            results = await ctx.executor.fan_out(workers, "clear", {"tier": tier})
            for worker in workers:
                # The evict reports follow; drop the chunks now so lookups agree at once.
                for name, hid in worker.holders.items():
                    if tier is None or name == tier:
                        ctx.index.clear_holder(hid)
            return {"num_tokens": max(_tokens_from(results), default=0)}

        return answer(await ctx.executor.execute(self.name, work(), ctx.settings.wait), num_tokens=0)


class _PrefixCommand(Command):
    """A command on a token prefix at one location of every rank of an instance."""

    op = ""

    def args(self, body: dict[str, Any], tier: str | None) -> dict[str, Any]:
        return {"tokens": body["tokens"], "tier": tier}

    async def run(self, ctx: Cluster, body: dict[str, Any]) -> Any:
        workers = ctx.instance_workers(body["instance_id"])
        tier = ctx.resolve_location(workers, body.get("location"))
        args = self.args(body, tier)

        async def work() -> dict[str, Any]:
            results = await ctx.executor.fan_out(workers, self.op, args)
            return {"num_tokens": min(_tokens_from(results), default=0)}

        return answer(await ctx.executor.execute(self.name, work(), ctx.settings.wait), num_tokens=0)


class Pin(_PrefixCommand):
    """Keep a prefix from eviction (optionally for ttl seconds)."""

    name = op = "pin"
    summary = "Pin a prefix at a location of an instance so it is not evicted (ttl in seconds, optional)"
    request_schema = _obj(
        ["instance_id", "location", "tokens"],
        instance_id=INSTANCE,
        location=LOCATION,
        tokens=TOKENS,
        ttl={"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 10**9, "nullable": True},
    )
    response_schema = EVENT_ANSWER

    def args(self, body: dict[str, Any], tier: str | None) -> dict[str, Any]:
        return {"tokens": body["tokens"], "tier": tier, "ttl": body.get("ttl")}


class Unpin(_PrefixCommand):
    """Let a pinned prefix be evicted again."""

    name = op = "unpin"
    summary = "Unpin a prefix at a location of an instance"
    request_schema = _obj(
        ["instance_id", "location", "tokens"], instance_id=INSTANCE, location=LOCATION, tokens=TOKENS
    )
    response_schema = EVENT_ANSWER


class Compress(_PrefixCommand):
    """Re-encode a stored prefix with a compressor (any registered one, e.g. lz4)."""

    name = op = "compress"
    summary = "Re-encode a prefix at a location with a registered compressor (method: lz4, cachegen, ...)"
    request_schema = _obj(
        ["instance_id", "method", "location", "tokens"],
        instance_id=INSTANCE,
        method={"type": "string", "minLength": 1, "maxLength": 64},
        location=LOCATION,
        tokens=TOKENS,
    )
    response_schema = EVENT_ANSWER

    def args(self, body: dict[str, Any], tier: str | None) -> dict[str, Any]:
        return {"tokens": body["tokens"], "tier": tier, "method": body["method"]}


class Decompress(_PrefixCommand):
    """Store a compressed prefix raw again."""

    name = op = "decompress"
    summary = "Decode a compressed prefix at a location back to raw KV"
    request_schema = _obj(
        ["instance_id", "location", "tokens"],
        instance_id=INSTANCE,
        location=LOCATION,
        tokens=TOKENS,
        method={"type": "string", "maxLength": 64},
    )
    response_schema = EVENT_ANSWER


class Move(Command):
    """Move (or copy) a prefix between locations, on one instance or between two."""

    name = "move"
    summary = (
        "Move a prefix from old_position to new_position ([instance_id, location]); answers at once, "
        "poll /check_finish"
    )
    request_schema = _obj(
        ["old_position", "new_position", "tokens"],
        old_position=POSITION,
        new_position=POSITION,
        tokens=TOKENS,
        copy={"type": "boolean"},
        channel={"type": "string", "minLength": 1, "maxLength": 64},
    )
    response_schema = EVENT_ANSWER

    async def run(self, ctx: Cluster, body: dict[str, Any]) -> Any:
        (src_id, src_loc), (dst_id, dst_loc) = body["old_position"], body["new_position"]
        tokens, copy = body["tokens"], body.get("copy", False)
        src_workers = ctx.instance_workers(src_id)
        dst_workers = ctx.instance_workers(dst_id)
        src_tier = ctx.resolve_location(src_workers, src_loc)
        dst_tier = ctx.resolve_location(dst_workers, dst_loc)
        if src_tier is None or dst_tier is None:
            raise CommandError(400, "move needs one location on each side, not 'all'")
        if src_id == dst_id and src_tier == dst_tier:
            raise CommandError(400, "old_position and new_position are the same place")
        if [w.worker_id for w in src_workers] != [w.worker_id for w in dst_workers]:
            raise CommandError(
                409,
                f"{src_id!r} and {dst_id!r} have different ranks "
                f"({[w.worker_id for w in src_workers]} vs {[w.worker_id for w in dst_workers]}); "
                "a move pairs rank i with rank i",
            )
        planned = min(ctx.holder_tokens(w, src_tier, tokens) for w in src_workers)
        pairs = list(zip(src_workers, dst_workers, strict=True))
        if src_id == dst_id:
            calls = [
                (
                    src,
                    "move_local",
                    {"tokens": tokens, "src_tier": src_tier, "dst_tier": dst_tier, "copy": copy},
                )
                for src, _ in pairs
            ]
        else:
            calls = [
                (
                    src,
                    "send",
                    {
                        "tokens": tokens,
                        "tier": src_tier,
                        "copy": copy,
                        **_destination(src, dst, dst_tier, body.get("channel")),
                    },
                )
                for src, dst in pairs
            ]

        async def work() -> dict[str, Any]:
            import asyncio

            results = await asyncio.gather(
                *(ctx.executor.call(w, op, args, ctx.settings.move_timeout) for w, op, args in calls),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            return {"num_tokens": min(_tokens_from(list(results)), default=0)}

        event = await ctx.executor.execute(self.name, work(), 0)
        if event.status == "failed":
            return answer(event)
        return {"event_id": event.event_id, "num_tokens": planned, "status": event.status}


def _destination(src: Worker, dst: Worker, tier: str, channel: str | None) -> dict[str, Any]:
    common = [name for name in src.transfer if name in dst.transfer]
    if channel is not None:
        if channel not in common:
            raise CommandError(
                400,
                f"transfer channel {channel!r} is not open on both sides; common: "
                f"{', '.join(common) or 'none'}",
            )
        common = [channel]
    if not common:
        raise CommandError(
            409,
            f"workers {src.instance_id}/{src.worker_id} and {dst.instance_id}/{dst.worker_id} "
            "share no transfer channel (install the same channel plugins on both)",
        )
    return {"channel": common[0], "address": dst.transfer[common[0]], "dst_tier": tier}


class Health(Command):
    """The controller and every worker (GET, no token), or one instance (POST)."""

    name = "health"
    methods = ("GET", "POST")
    mutating = False
    auth = {"GET": "public", "POST": "admin"}
    summary = "Health of the controller and every worker (GET), or of one instance (POST {instance_id})"
    request_schema = _obj(["instance_id"], instance_id=INSTANCE)

    async def run(self, ctx: Cluster, body: dict[str, Any]) -> dict[str, Any]:
        if "instance_id" not in body:
            # GET needs no token: say who is alive, not where workers listen.
            workers = [
                ctx.registry.describe(w, brief=True)
                for w in sorted(ctx.registry.workers.values(), key=lambda w: (w.instance_id, w.worker_id))
            ]
            return {
                "controller_status": "healthy",
                "num_workers": len(workers),
                "healthy_workers": sum(w["status"] == "healthy" for w in workers),
                "workers": workers,
            }
        if not isinstance(body["instance_id"], str):
            raise CommandError(400, "instance_id: expected a string")
        workers = ctx.instance_workers(body["instance_id"], healthy_only=False)
        described = [ctx.registry.describe(w) for w in workers]
        codes = {str(w["worker_id"]): 0 if w["status"] == "healthy" else 1 for w in described}
        event = ctx.executor.finished(self.name, {"error_codes": codes})
        status = (
            "healthy" if not any(codes.values()) else ("unhealthy" if all(codes.values()) else "degraded")
        )
        return {
            "event_id": event.event_id,
            "instance_id": body["instance_id"],
            "status": status,
            "error_codes": codes,
            "workers": described,
        }


class CheckFinish(Command):
    """Whether an event is pending, finished or failed (with the reason)."""

    name = "check_finish"
    mutating = False
    summary = "Status of an event: pending, finished or failed (with a reason)"
    request_schema = _obj(["event_id"], event_id={"type": "string", "minLength": 1, "maxLength": 128})
    response_schema = {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"type": "string", "enum": ["pending", "finished", "failed"]},
            "reason": {"type": "string"},
            "result": {"type": "object"},
        },
    }

    async def run(self, ctx: Cluster, body: dict[str, Any]) -> dict[str, Any]:
        event = ctx.executor.get(body["event_id"])
        if event is None:
            raise CommandError(
                404,
                f"unknown event_id {body['event_id']!r}; the controller keeps the last "
                f"{ctx.settings.max_events} events and forgets them on restart",
            )
        return event.describe()


class QueryWorkerInfo(Command):
    """What each worker of an instance registered with, and its last reported stats."""

    name = "query_worker_info"
    mutating = False
    summary = "Registration and last stats of the workers of an instance"
    request_schema = _obj(
        ["instance_id"],
        instance_id=INSTANCE,
        worker_ids={
            "type": "array",
            "maxItems": 4096,
            "items": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
        },
    )

    async def run(self, ctx: Cluster, body: dict[str, Any]) -> dict[str, Any]:
        workers = ctx.instance_workers(body["instance_id"], healthy_only=False)
        wanted = body.get("worker_ids")
        if wanted:
            known = {w.worker_id for w in workers}
            missing = sorted(set(wanted) - known)
            if missing:
                raise CommandError(
                    404,
                    f"instance {body['instance_id']!r} has no worker {missing[0]}; "
                    f"its workers: {sorted(known)}",
                )
            workers = [w for w in workers if w.worker_id in set(wanted)]
        infos = [ctx.registry.describe(w) for w in workers]
        event = ctx.executor.finished(self.name, {"workers": len(infos)})
        return {"event_id": event.event_id, "worker_infos": infos}


class Metrics(Command):
    """Prometheus text exposition."""

    name = "metrics"
    methods = ("GET",)
    mutating = False
    auth = "public"
    summary = "Prometheus metrics"

    async def run(self, ctx: Cluster, body: dict[str, Any]) -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)


class Plugins(Command):
    """Loaded plugins, their distributions and what they register."""

    name = "plugins"
    methods = ("GET",)
    mutating = False
    summary = "Loaded kvstacks plugins (as `kvstacks plugins` prints them)"

    async def run(self, ctx: Cluster, body: dict[str, Any]) -> dict[str, Any]:
        return {"plugins": describe()}


class OpenAPI(Command):
    """This API, as an OpenAPI 3.0 document."""

    name = "openapi.json"
    methods = ("GET",)
    mutating = False
    summary = "The OpenAPI document of every registered command"

    async def run(self, ctx: Cluster, body: dict[str, Any]) -> dict[str, Any]:
        return ctx.openapi


COMMANDS = (
    Lookup,
    BatchLookup,
    Clear,
    Pin,
    Unpin,
    Compress,
    Decompress,
    Move,
    Health,
    CheckFinish,
    QueryWorkerInfo,
    Metrics,
    Plugins,
    OpenAPI,
)
