"""``kvstacks controller``: serve the app with uvicorn."""

from __future__ import annotations

import ipaddress
import logging

import click

from kvstacks_controller.settings import DEFAULT_TIER_WEIGHTS, Settings


def serve(settings: Settings, log_level: str = "info") -> None:
    import uvicorn

    from kvstacks_controller.app import create_app

    settings.check_bind()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        access_log=False,
        server_header=False,
        date_header=False,
    )


def _networks(text: str) -> tuple[str, ...]:
    networks = tuple(n.strip() for n in text.split(",") if n.strip())
    for net in networks:
        if net == "any":
            continue
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise click.BadParameter(f"{net!r} is not a network such as 10.0.0.0/8 (or 'any')",
                                     param_hint="--worker-networks") from None
    return networks


@click.command("controller")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind; beyond loopback needs KVSTACKS_ADMIN_TOKEN and KVSTACKS_WORKER_TOKEN.",
)
@click.option("--port", default=9000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--heartbeat-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds without a heartbeat before a worker is unhealthy (its chunks leave lookups).",
)
@click.option(
    "--worker-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds one worker may take to answer a command.",
)
@click.option(
    "--wait",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds a command waits before answering 'pending' with an event id.",
)
@click.option("--max-body-bytes", default=16 << 20, show_default=True, type=click.IntRange(min=1024))
@click.option(
    "--max-tokens",
    default=1 << 20,
    show_default=True,
    type=click.IntRange(min=1),
    help="Longest token list a request may carry.",
)
@click.option(
    "--index",
    default="memory",
    show_default=True,
    envvar="KVSTACKS_CONTROLLER_INDEX",
    help="Where the chunk index and worker registry live: 'memory', or redis://host:port/db "
    "(optionally ?prefix=...) shared by several controller replicas. Env: KVSTACKS_CONTROLLER_INDEX.",
)
@click.option(
    "--tier-weight",
    "tier_weights",
    multiple=True,
    metavar="TIER=WEIGHT",
    help="/route: weight of a chunk held in TIER (repeatable; '*' for any other tier). "
    "Default cpu=1 disk=0.8 *=0.5.",
)
@click.option(
    "--load-weight",
    default=0.5,
    show_default=True,
    type=click.FloatRange(min=0),
    help="/route: how much a candidate's load (0..1) lowers its score.",
)
@click.option(
    "--worker-networks",
    default="127.0.0.0/8,::1/128",
    show_default=True,
    help="Comma list of networks (CIDRs) workers may register addresses in, or 'any'.",
)
@click.option(
    "--monitor-ports",
    "--monitor-port",
    "lmcache_monitor",
    hidden=True,
    help="LMCache's ZMQ ports; kvstacks workers use the API port.",
)
@click.option(
    "--log-level", default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"])
)
def controller_command(
    host: str,
    port: int,
    heartbeat_timeout: float,
    worker_timeout: float,
    wait: float,
    max_body_bytes: int,
    max_tokens: int,
    index: str,
    tier_weights: tuple[str, ...],
    load_weight: float,
    worker_networks: str,
    lmcache_monitor: str | None,
    log_level: str,
) -> None:
    """Run the kvstacks controller (LMCache-compatible operator API)."""
    if lmcache_monitor is not None:
        raise click.UsageError(
            "--monitor-ports/--monitor-port are LMCache's ZMQ ports for workers; kvstacks workers speak HTTP to "
            "the API port (--port), so drop the flag and point each worker's controller.url at it "
            "(kvstacks config from-lmcache translates a worker config; see docs/migrating-from-lmcache.md)"
        )
    weights = dict(DEFAULT_TIER_WEIGHTS)
    for item in tier_weights:
        tier, sep, value = item.partition("=")
        try:
            weights[tier.strip()] = float(value)
        except ValueError:
            raise click.BadParameter(f"expected TIER=WEIGHT, got {item!r}", param_hint="--tier-weight") from None
        if not sep or not tier.strip() or not 0 <= weights[tier.strip()] <= 1000:
            raise click.BadParameter(
                f"expected TIER=WEIGHT with a weight from 0 to 1000, got {item!r}", param_hint="--tier-weight"
            )
    settings = Settings.from_env(
        host=host,
        port=port,
        heartbeat_timeout=heartbeat_timeout,
        worker_timeout=worker_timeout,
        wait=wait,
        max_body_bytes=max_body_bytes,
        max_tokens=max_tokens,
        index=index,
        tier_weights=weights,
        load_weight=load_weight,
        worker_networks=_networks(worker_networks),
    )
    try:
        settings.check_bind()
        settings.check_index()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    serve(settings, log_level)
