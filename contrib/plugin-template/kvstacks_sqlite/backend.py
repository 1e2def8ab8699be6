"""A tier backend storing chunk frames as rows of one SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from kvstacks import frame
from kvstacks.backend import Backend
from kvstacks.errors import ConfigError, CorruptChunk
from kvstacks.keys import CacheKey
from kvstacks.memory import MemoryObj


class SqliteBackend(Backend):
    name = "sqlite"

    @dataclass
    class Options:
        path: Path  # required: the YAML must say where

    async def start(self) -> None:
        try:
            self.options.path.parent.mkdir(parents=True, exist_ok=True)
            # One connection used from one worker thread at a time: SQLite calls block, so they
            # run off the event loop, and the lock keeps them in order.
            self._db = sqlite3.connect(self.options.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS chunks (key TEXT PRIMARY KEY, frame BLOB NOT NULL)")
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError("path", f"cannot open {self.options.path}: {exc}; pick a writable path") from None
        self._lock = asyncio.Lock()

    async def _run(self, sql: str, *args: object) -> list[tuple]:
        async with self._lock:
            return await asyncio.to_thread(lambda: self._db.execute(sql, args).fetchall())

    async def close(self) -> None:
        if getattr(self, "_db", None) is not None:
            self._db.close()
            self._db = None

    async def put(self, key: CacheKey, obj: MemoryObj) -> None:
        await self._run("INSERT OR REPLACE INTO chunks VALUES (?, ?)", key.to_string(), frame.encode(obj))

    async def get(self, key: CacheKey) -> MemoryObj | None:
        rows = await self._run("SELECT frame FROM chunks WHERE key = ?", key.to_string())
        if not rows:
            return None
        try:
            return frame.decode(rows[0][0], expect_key=key)
        except CorruptChunk:
            await self.remove(key)  # a corrupt chunk is a miss, and is not kept
            return None

    async def contains(self, key: CacheKey) -> bool:
        return bool(await self._run("SELECT 1 FROM chunks WHERE key = ?", key.to_string()))

    async def remove(self, key: CacheKey) -> bool:
        rows = await self._run("DELETE FROM chunks WHERE key = ? RETURNING 1", key.to_string())
        return bool(rows)

    async def clear(self) -> None:
        await self._run("DELETE FROM chunks")

    async def keys(self) -> AsyncIterator[tuple[CacheKey, int]]:
        for text, size in await self._run("SELECT key, length(frame) FROM chunks"):
            yield CacheKey.from_string(text), size
