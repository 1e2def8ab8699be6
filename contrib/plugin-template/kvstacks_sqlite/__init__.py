"""kvstacks-sqlite: an example plugin registering one tier backend."""

from kvstacks import hookimpl

from kvstacks_sqlite.backend import SqliteBackend


@hookimpl
def register_backends(register):
    register(SqliteBackend)
