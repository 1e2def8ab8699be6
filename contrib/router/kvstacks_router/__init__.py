"""An example KV-aware router for a kvstacks fleet (see contrib/router/README.md)."""

from kvstacks_router.proxy import Backend, RouterConfig, create_app

__all__ = ["Backend", "RouterConfig", "create_app"]
