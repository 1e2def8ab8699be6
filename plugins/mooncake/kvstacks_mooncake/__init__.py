"""kvstacks-mooncake: the ``mooncake`` tier backend, on a Mooncake Store shared by many processes."""

from kvstacks import hookimpl

from kvstacks_mooncake.backend import MooncakeBackend
from kvstacks_mooncake.client import MooncakeError, MooncakeUnavailable

__all__ = ["MooncakeBackend", "MooncakeError", "MooncakeUnavailable"]


@hookimpl
def register_backends(register) -> None:
    register(MooncakeBackend)
