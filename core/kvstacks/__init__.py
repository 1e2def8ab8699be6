"""kvstacks: a KV-cache storage layer for LLM serving, as a tier stack of plugins."""

from kvstacks.errors import ConfigError, CorruptChunk, InvalidInput, KVStacksError, PluginError
from kvstacks.hookspecs import hookimpl
from kvstacks.keys import CacheKey, chunk_hashes
from kvstacks.memory import MemoryObj

__all__ = [
    "CacheEngine", "CacheKey", "ConfigError", "CorruptChunk", "InvalidInput", "KVStacksError",
    "MemoryObj", "PluginError", "chunk_hashes", "hookimpl",
]


def __getattr__(name: str):
    # The engine pulls in the plugin machinery; import it only when asked for.
    if name == "CacheEngine":
        from kvstacks.engine import CacheEngine

        return CacheEngine
    raise AttributeError(name)
