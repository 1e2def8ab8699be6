"""``python -m kvstacks_router --controller URL --backend ID=URL --backend ID=URL [--port 8000]``."""

from __future__ import annotations

import argparse
import os

from kvstacks_router.proxy import Backend, RouterConfig, create_app


def parse_backend(text: str) -> Backend:
    instance_id, sep, url = text.partition("=")
    if not sep or not instance_id or not url.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(f"expected INSTANCE_ID=http://host:port, got {text!r}")
    return Backend(instance_id, url.rstrip("/"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="kvstacks-router",
        description="An OpenAI-compatible proxy that sends each request to the instance the kvstacks "
        "controller ranks first for its prompt (POST /route). KVSTACKS_ADMIN_TOKEN is sent to the controller.",
    )
    parser.add_argument("--controller", required=True, help="the controller, http://host:port")
    parser.add_argument(
        "--backend", action="append", type=parse_backend, required=True, metavar="ID=URL",
        help="an OpenAI-compatible server and the instance_id it reports to the controller (repeat)",
    )  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-in-flight", type=int, default=8, help="requests at which a backend's load is 1.0")
    parser.add_argument("--route-timeout", type=float, default=0.05, help="seconds to wait for /route")
    args = parser.parse_args(argv)
    ids = [b.instance_id for b in args.backend]
    if len(set(ids)) != len(ids):
        parser.error("--backend: each instance_id once")

    import uvicorn

    config = RouterConfig(
        controller_url=args.controller.rstrip("/"),
        backends=args.backend,
        admin_token=os.environ.get("KVSTACKS_ADMIN_TOKEN") or None,
        max_in_flight=args.max_in_flight,
        route_timeout=args.route_timeout,
    )
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
