"""What a controller command is: the class a ``register_commands`` plugin registers.

A command becomes the route ``/<name>``. The controller reads and caps the body,
checks the bearer token its ``auth`` asks for, validates the body against
``request_schema`` (a JSON Schema subset, also published in ``/openapi.json``)
and calls ``run(ctx, body)``. ``run`` returns a JSON-able dict (HTTP 200) or a
Starlette ``Response``; it raises :class:`CommandError` for a 4xx with a reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

#: Who may call a route: ``admin`` needs KVSTACKS_ADMIN_TOKEN (when set), ``worker``
#: needs KVSTACKS_WORKER_TOKEN (when set), ``public`` needs nothing.
AUTH_LEVELS = ("admin", "worker", "public")


class CommandError(Exception):
    """A refusal with an HTTP status and a reason the caller can act on."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.message, **self.extra}


class Command:
    """Base class for controller commands (subclassing it is optional; the attributes are the contract)."""

    name: ClassVar[str]
    methods: ClassVar[tuple[str, ...]] = ("POST",)
    #: Changes state somewhere (documented in the OpenAPI document as ``x-mutating``).
    mutating: ClassVar[bool] = True
    #: One of AUTH_LEVELS, or a mapping from HTTP method to one of them.
    auth: ClassVar[str | Mapping[str, str]] = "admin"
    summary: ClassVar[str] = ""
    #: JSON Schema of the POST body; ``{"$ref": "#/components/schemas/Tokens"}`` is a capped token list.
    request_schema: ClassVar[dict[str, Any] | None] = None
    #: JSON Schema of the 200 answer, for the OpenAPI document.
    response_schema: ClassVar[dict[str, Any] | None] = None

    async def run(self, ctx: Any, body: dict[str, Any]) -> Any:
        raise NotImplementedError


def auth_for(cls: type, method: str) -> str:
    """The auth level a command needs for one HTTP method (``admin`` unless it says otherwise)."""
    auth = getattr(cls, "auth", None)
    if auth is None:
        # The hookspec's older wording: a command that does not mutate may still read
        # fleet data, so it still needs the admin token.
        return "admin"
    if isinstance(auth, Mapping):
        auth = auth.get(method, "admin")
    if auth not in AUTH_LEVELS:
        raise ValueError(f"command {cls.__name__}: auth must be one of {AUTH_LEVELS}, got {auth!r}")
    return auth
