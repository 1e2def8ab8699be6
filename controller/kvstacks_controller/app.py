"""The Starlette app: one route per registered command, with auth, caps and 4xx reasons."""

from __future__ import annotations

import contextlib
import hmac
import importlib.metadata
import json
import logging
import time
from typing import Any

from kvstacks.errors import KVStacksError
from kvstacks.plugins import registry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kvstacks_controller import admin_page, openapi
from kvstacks_controller.cluster import Cluster
from kvstacks_controller.command import CommandError, auth_for
from kvstacks_controller.executor import WorkerCallError
from kvstacks_controller.metrics import ControllerMetrics
from kvstacks_controller.schema import Validator, parse_body
from kvstacks_controller.settings import Settings

log = logging.getLogger("kvstacks.controller")

try:  # a 32K-token body parses ~5x faster; plain json works the same, slower
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    _loads = json.loads


def _version() -> str:
    try:
        return importlib.metadata.version("kvstacks-controller")
    except importlib.metadata.PackageNotFoundError:
        return "0"


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise _TooLarge
        except ValueError:
            raise CommandError(400, "Content-Length is not a number") from None
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _token_ok(request: Request, expected: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode())


#: Recorded in metrics for a client that went away mid-request (nginx's convention);
#: not a server error, so it must not count as a 5xx.
CLIENT_CLOSED = 499


def _require_json(request: Request) -> None:
    """Refuse a mutating request whose body is not declared JSON.

    A web page can POST ``text/plain`` or a form to any address without a CORS
    preflight; insisting on ``application/json`` makes the browser ask first, so
    a page the operator visits cannot drive a controller that runs without tokens.
    """
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise CommandError(
            415,
            f"{request.method} /{request.url.path.lstrip('/')} changes state and accepts only "
            f"'Content-Type: application/json', got {media or 'no Content-Type'!r}",
        )


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown routes, wrong methods and the like answer JSON like every command does."""
    assert isinstance(exc, HTTPException)
    reasons = {
        404: f"no route {request.url.path}; GET /openapi.json lists every route",
        405: f"{request.method} is not allowed on {request.url.path}; allowed: "
        f"{next((v for k, v in (exc.headers or {}).items() if k.lower() == 'allow'), '?')}",
    }
    return JSONResponse({"error": reasons.get(exc.status_code, exc.detail)}, status_code=exc.status_code,
                        headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": "internal error; see the controller log"}, status_code=500)


def _endpoint(
    name: str, cls: type, command: Any, cluster: Cluster, metrics: ControllerMetrics, validator: Validator
):
    settings = cluster.settings

    async def handle(request: Request) -> Response:
        started = time.perf_counter()
        try:
            response = await _handle(request)
        except CommandError as exc:
            response = JSONResponse(exc.body(), status_code=exc.status)
        except WorkerCallError as exc:
            response = JSONResponse({"error": str(exc)}, status_code=exc.status)
        except _TooLarge:
            response = JSONResponse(
                {
                    "error": f"body larger than the limit of {settings.max_body_bytes} bytes; "
                    "split the request (see /batch_lookup for many prompts)"
                },
                status_code=413,
            )
        except KVStacksError as exc:
            response = JSONResponse({"error": str(exc)}, status_code=400)
        except ClientDisconnect:
            log.info("client went away during %s %s", request.method, request.url.path)
            response = Response(status_code=CLIENT_CLOSED)
        except Exception:
            log.exception("command %s failed", name)
            response = JSONResponse(
                {"error": f"internal error in command {name!r}; see the controller log"}, status_code=500
            )
        metrics.observe(name, response.status_code, time.perf_counter() - started)
        return response

    async def _handle(request: Request) -> Response:
        level = auth_for(cls, request.method)
        expected = {"admin": settings.admin_token, "worker": settings.worker_token}.get(level)
        if expected and not _token_ok(request, expected):
            env = "KVSTACKS_ADMIN_TOKEN" if level == "admin" else "KVSTACKS_WORKER_TOKEN"
            return JSONResponse(
                {"error": f"missing or wrong bearer token: send 'Authorization: Bearer <{env}>'"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        body: Any = {}
        if getattr(cls, "mutating", True) and request.method not in ("GET", "HEAD"):
            _require_json(request)
        if request.method == "POST":
            raw = await _read_body(request, settings.max_body_bytes)
            if raw.strip():
                try:
                    body = parse_body(raw, _loads)
                except (ValueError, RecursionError) as exc:
                    raise CommandError(400, f"body is not valid JSON: {exc}") from None
            if not isinstance(body, dict):
                raise CommandError(400, f"body must be a JSON object, got {type(body).__name__}")
            schema = getattr(cls, "request_schema", None)
            if schema is not None:
                body = validator.validate(body, schema)
        result = await command.run(cluster, body)
        if isinstance(result, Response):
            return result
        return JSONResponse(result)

    return handle


def create_app(settings: Settings | None = None, cluster: Cluster | None = None) -> Starlette:
    """Build the app from the commands every loaded plugin registers."""
    cluster = cluster or Cluster(settings or Settings())
    settings = cluster.settings
    entries = registry().entries["commands"]
    commands = {name: entry.cls for name, entry in entries.items()}
    cluster.commands = commands
    cluster.openapi = openapi.build(commands, settings, _version())
    validator = Validator(cluster.openapi["components"]["schemas"])
    metrics = ControllerMetrics(cluster)
    cluster.metrics = metrics
    routes = []
    for name, cls in sorted(commands.items()):
        for method in getattr(cls, "methods", ("POST",)):
            auth_for(cls, method)  # a bad auth declaration fails at start, not per request
        routes.append(
            Route(
                f"/{name}",
                _endpoint(name, cls, cls(), cluster, metrics, validator),
                methods=list(getattr(cls, "methods", ("POST",))),
            )
        )

    if settings.admin_page:
        routes.extend(admin_page.routes(cluster, lambda request: _token_ok(request, settings.admin_token or "")))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        await cluster.executor.close()

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _server_error})
    app.state.cluster = cluster
    return app
