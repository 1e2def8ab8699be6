"""kvstacks-disk: the ``disk`` tier backend (a checksummed file per chunk)."""

from kvstacks import hookimpl

from kvstacks_disk.backend import DiskBackend
from kvstacks_disk.layout import chunk_path, key_from_name

__all__ = ["DiskBackend", "chunk_path", "key_from_name"]


@hookimpl
def register_backends(register):
    register(DiskBackend)
