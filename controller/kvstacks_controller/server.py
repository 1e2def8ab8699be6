"""``kvstacks controller``: serve the app with uvicorn."""

from __future__ import annotations

import logging

import click

from kvstacks_controller.settings import Settings


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
    log_level: str,
) -> None:
    """Run the kvstacks controller (LMCache-compatible operator API)."""
    settings = Settings.from_env(
        host=host,
        port=port,
        heartbeat_timeout=heartbeat_timeout,
        worker_timeout=worker_timeout,
        wait=wait,
        max_body_bytes=max_body_bytes,
        max_tokens=max_tokens,
    )
    try:
        settings.check_bind()
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    serve(settings, log_level)
