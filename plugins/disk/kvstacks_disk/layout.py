"""Where a chunk lives on disk, and how its key is read back from the file name.

``<root>/<model>/<h0h1>/<hash>.<world_size>.<rank>.<kv_format>.kvc``

The whole key is in the path, so a restart lists keys with ``os.scandir`` and never
opens a file. ``model`` and ``kv_format`` are escaped to ``[A-Za-z0-9_-]`` plus
``%XX``, so no name can contain a separator, a dot or be ``.``/``..``. One level of
256 shard directories (first hash byte) keeps directories small up to millions
of chunks while a restart with few chunks scans few directories.
"""

from __future__ import annotations

import os
from urllib.parse import quote, unquote

from kvstacks.keys import CacheKey

SUFFIX = ".kvc"
#: temp files are ``.<chunk name>.<pid>.<random>.tmp`` in the chunk's own directory
TEMP_SUFFIX = ".tmp"


def escape(text: str) -> str:
    if not text:
        return "%"  # never produced by quoting, which always writes %XX
    return quote(text, safe="-_").replace(".", "%2E").replace("~", "%7E")


def unescape(name: str) -> str:
    return "" if name == "%" else unquote(name, errors="strict")


def model_dir(root: str, model: str) -> str:
    return os.path.join(root, escape(model))


def chunk_name(key: CacheKey) -> str:
    return f"{key.chunk_hash.hex()}.{key.world_size}.{key.rank}.{escape(key.kv_format)}{SUFFIX}"


def chunk_path(root: str, key: CacheKey) -> str:
    digest = key.chunk_hash.hex()
    shard = digest[:2].ljust(2, "_")
    return os.path.join(root, escape(key.model), shard, chunk_name(key))


def key_from_name(model: str, name: str) -> CacheKey | None:
    """The key of a chunk file ``name`` under the (unescaped) ``model``; None if not ours."""
    if not name.endswith(SUFFIX) or name.startswith("."):
        return None
    parts = name[: -len(SUFFIX)].split(".")
    if len(parts) != 4:
        return None
    digest, world_size, rank, kv_format = parts
    try:
        key = CacheKey(model, unescape(kv_format), int(world_size), int(rank), bytes.fromhex(digest))
    except (ValueError, UnicodeDecodeError):
        return None
    # int() and fromhex() forgive spellings ("1_0", " 1") the writer never produces.
    return key if chunk_name(key) == name else None


def is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)
