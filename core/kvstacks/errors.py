"""The exceptions kvstacks raises to its users."""

from __future__ import annotations


class KVStacksError(Exception):
    """Base class of every error kvstacks raises on purpose."""


class ConfigError(KVStacksError, ValueError):
    """A stack configuration is wrong. ``path`` names the YAML location."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


class InvalidInput(KVStacksError, ValueError):
    """Tokens or KV passed to the engine are unusable; the message says why."""


class CorruptChunk(KVStacksError):
    """Stored bytes failed validation (bad magic, truncated, checksum mismatch).

    Engines treat it as a miss and remove the object; it is never served.
    """


class PermanentError(KVStacksError):
    """A backend failure that retrying cannot fix (the operator must act); never retried.

    Backends may raise it; ``OSError`` with ``ENOSPC``, ``EROFS``, ``EACCES``... counts as
    permanent too (see ``kvstacks.faults``).
    """


class TierFull(KVStacksError):
    """A tier cannot make room (everything left is pinned or in use)."""


class PluginError(KVStacksError):
    """A plugin is broken or two plugins conflict; the message names distributions."""
