"""kvstacks-nixl: the ``nixl`` transfer channel (chunks memory to memory over NIXL/UCX)."""

from kvstacks import hookimpl

from kvstacks_nixl.channel import NixlChannel

__all__ = ["NixlChannel"]


@hookimpl
def register_transfer_channels(register):
    register(NixlChannel)
