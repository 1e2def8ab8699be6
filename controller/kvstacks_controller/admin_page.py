"""The admin page: ``GET /`` renders the fleet on the server (Starlette + Jinja2), no build step.

``GET /`` answers everyone with the page's frame; the fleet itself (workers,
tiers, events) is the fragment ``GET /admin/panel``, rendered on the server and
behind the admin token. With no admin token configured, or with the token in
the request, ``GET /`` renders the fragment inline. The page's small script
fetches the fragment again every few seconds, and sends the lookup, clear and
pin forms to the ordinary API as ``application/json`` with the token the operator
typed (kept in the tab's sessionStorage). No cookie carries the token, so another
site cannot make a browser act with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from kvstacks_controller.cluster import Cluster

REFRESH_SECONDS = 3
RECENT_EVENTS = 20

templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


def _size(n: Any) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _rate(hits: Any, misses: Any) -> str:
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (hits, misses)):
        return "–"
    total = hits + misses
    return f"{100 * hits / total:.0f}%" if total else "–"


templates.env.filters["size"] = _size


def fleet(cluster: Cluster) -> dict[str, Any]:
    """What the panel shows, read from the registry, the index and the executor."""
    registry = cluster.registry
    instances = []
    for instance_id, workers in registry.instances().items():
        rows = []
        for worker in workers:
            info = registry.describe(worker)
            stats = worker.stats if isinstance(worker.stats, dict) else {}
            tiers = []
            for tier in worker.tiers:
                s = stats.get(tier) if isinstance(stats.get(tier), dict) else {}
                hid = worker.holders.get(tier)
                tiers.append(
                    {
                        "name": tier,
                        "backend": s.get("backend", ""),
                        "bytes": s.get("bytes"),
                        "capacity": s.get("capacity"),
                        "objects": s.get("objects", "–"),
                        "indexed": cluster.index.count(hid) if hid is not None else 0,
                        "pins": s.get("pins", "–"),
                        "hit_rate": _rate(s.get("hits"), s.get("misses")),
                    }
                )
            rows.append({"info": info, "tiers": tiers})
        healthy = all(r["info"]["status"] == "healthy" for r in rows)
        instances.append({"instance_id": instance_id, "workers": rows, "healthy": healthy})
    events = list(cluster.executor.events.values())[-RECENT_EVENTS:][::-1]
    return {
        "instances": instances,
        "num_workers": sum(len(i["workers"]) for i in instances),
        "healthy_workers": sum(
            1 for i in instances for w in i["workers"] if w["info"]["status"] == "healthy"
        ),
        "chunks_indexed": len(cluster.index),
        "index": "memory" if cluster.settings.index == "memory" else "redis (shared)",
        "events": [
            {
                "event_id": e.event_id,
                "command": e.command,
                "status": e.status,
                "reason": e.reason,
                "result": e.result,
                "when": time.strftime("%H:%M:%S", time.localtime(e.created)),
            }
            for e in events
        ],
    }


def routes(cluster: Cluster, token_ok: Callable[[Request], bool]) -> list[Route]:
    def allowed(request: Request) -> bool:
        return not cluster.settings.admin_token or token_ok(request)

    async def page(request: Request) -> Response:
        context = {
            "needs_token": bool(cluster.settings.admin_token),
            "refresh_ms": REFRESH_SECONDS * 1000,
            "fleet": fleet(cluster) if allowed(request) else None,
        }
        return templates.TemplateResponse(request, "admin.html", context)

    async def panel(request: Request) -> Response:
        if not allowed(request):
            return Response(
                "missing or wrong bearer token", status_code=401, headers={"WWW-Authenticate": "Bearer"}
            )
        return templates.TemplateResponse(request, "panel.html", {"fleet": fleet(cluster)})

    return [Route("/", page, methods=["GET"]), Route("/admin/panel", panel, methods=["GET"])]
