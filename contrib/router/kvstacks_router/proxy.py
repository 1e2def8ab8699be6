"""The proxy: tokenize, ask the controller's ``/route``, forward to the best instance.

Routing by prefix is an optimization, never a dependency: when the controller
is slow or down, the request goes to the least loaded backend; when a backend
fails, to the next one in the ranking.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import struct
from dataclasses import dataclass, field
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

log = logging.getLogger("kvstacks.router")

#: Headers of the backend's answer not passed on (hop-by-hop, or recomputed by the server).
_DROP = {"content-length", "transfer-encoding", "connection", "keep-alive", "server", "date"}


@dataclass
class Backend:
    instance_id: str
    url: str
    in_flight: int = 0


@dataclass
class RouterConfig:
    controller_url: str
    backends: list[Backend]
    admin_token: str | None = None
    #: Requests in flight at which a backend counts as saturated (load 1.0).
    max_in_flight: int = 8
    #: How long to wait for the controller before routing by load alone.
    route_timeout: float = 0.05
    request_timeout: float = 600.0
    stats: dict[str, int] = field(default_factory=lambda: {"routed": 0, "fallback": 0})


def _packed(tokens: list[int]) -> str:
    return base64.b64encode(struct.pack(f"<{len(tokens)}i", *tokens)).decode()


class Router:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.by_id = {b.instance_id: b for b in config.backends}
        self.client = httpx.AsyncClient(timeout=config.request_timeout, trust_env=False)

    def load(self, backend: Backend) -> float:
        return min(1.0, backend.in_flight / self.config.max_in_flight)

    def by_load(self) -> list[Backend]:
        return sorted(self.config.backends, key=lambda b: (b.in_flight, b.instance_id))

    async def tokens(self, body: dict[str, Any]) -> list[int] | None:
        """The prompt's token ids, as a backend computes them (vLLM's /tokenize), or None."""
        ask = {k: body[k] for k in ("prompt", "messages", "model") if k in body}
        for backend in self.by_load():
            try:
                r = await self.client.post(f"{backend.url}/tokenize", json=ask, timeout=5)
            except httpx.HTTPError:
                continue
            if r.status_code == 200:
                tokens = r.json().get("tokens")
                return tokens if isinstance(tokens, list) else None
            return None  # the backend refused the body: the completion will say why
        return None

    async def ranking(self, tokens: list[int] | None) -> tuple[list[Backend], dict[str, int]]:
        """Backends best first, and the prefix tokens the controller says each holds."""
        if tokens:
            headers = {"Authorization": f"Bearer {self.config.admin_token}"} if self.config.admin_token else {}
            body = {
                "tokens_b64": _packed(tokens),
                "candidates": [{"instance_id": b.instance_id, "load": self.load(b)} for b in self.config.backends],
            }
            try:
                r = await self.client.post(
                    f"{self.config.controller_url}/route", json=body, headers=headers,
                    timeout=self.config.route_timeout,
                )  # fmt: skip
                if r.status_code == 200:
                    ranked = r.json()["instances"]
                    self.config.stats["routed"] += 1
                    order = [self.by_id[e["instance_id"]] for e in ranked if e["instance_id"] in self.by_id]
                    return order, {e["instance_id"]: e["matched_tokens"] for e in ranked}
                log.warning("controller /route answered %s: %s", r.status_code, r.text[:200])
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                log.warning("controller /route failed (%s); routing by load", type(exc).__name__)
        self.config.stats["fallback"] += 1
        return self.by_load(), {}

    async def forward(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            return JSONResponse({"error": {"message": "body is not valid JSON"}}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": {"message": "body must be a JSON object"}}, status_code=400)
        order, matched = await self.ranking(await self.tokens(body))
        last_error = "no backend configured"
        for backend in order:
            backend.in_flight += 1
            try:
                r = await self.client.post(
                    f"{backend.url}{request.url.path}", content=raw, headers={"content-type": "application/json"}
                )
            except httpx.HTTPError as exc:
                last_error = f"{backend.instance_id}: {type(exc).__name__}: {exc}"
                log.warning("backend %s failed; trying the next one", last_error)
                continue
            finally:
                backend.in_flight -= 1
            headers = {k: v for k, v in r.headers.items() if k.lower() not in _DROP}
            headers["x-kvstacks-routed-to"] = backend.instance_id
            headers["x-kvstacks-matched-tokens"] = str(matched.get(backend.instance_id, 0))
            return Response(r.content, status_code=r.status_code, headers=headers)
        return JSONResponse({"error": {"message": f"every backend failed; last: {last_error}"}}, status_code=502)

    async def models(self, request: Request) -> Response:
        for backend in self.by_load():
            try:
                r = await self.client.get(f"{backend.url}/v1/models", timeout=5)
                return Response(r.content, status_code=r.status_code, media_type="application/json")
            except httpx.HTTPError:
                continue
        return JSONResponse({"error": {"message": "no backend answers"}}, status_code=502)

    async def health(self, request: Request) -> Response:
        return JSONResponse(
            {
                "status": "ok",
                "backends": {b.instance_id: {"url": b.url, "in_flight": b.in_flight} for b in self.config.backends},
                **self.config.stats,
            }
        )


def create_app(config: RouterConfig) -> Starlette:
    router = Router(config)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        await router.client.aclose()

    app = Starlette(
        routes=[
            Route("/v1/completions", router.forward, methods=["POST"]),
            Route("/v1/chat/completions", router.forward, methods=["POST"]),
            Route("/v1/models", router.models, methods=["GET"]),
            Route("/health", router.health, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.router = router
    return app
