"""The ``disk`` backend: one checksummed file per chunk.

Writes go to a uniquely named temp file in the chunk's directory and are renamed
over the final name, so a reader (in this process or another) sees the old chunk,
the new one or none, never a torn one. Each chunk is a ``kvstacks.frame``: a
truncated or damaged file fails its checksum, is removed, counted in
``corrupt_count`` and reported as a miss.

Each put or get is one hop to a worker thread that does the whole job with plain
``os`` calls (encode, write, rename; or read, verify). aiofiles makes a thread
hop per call (open, each write, close, rename), which ``benchmarks/disk_tier.py``
measures as slower for small chunks and no faster for large ones.

Read buffers. ``get`` returns an object whose tensor lives in a buffer of this
backend. The caller owns it; a caller that is done with it (copied it out, and
kept no reference) may call ``release(obj)`` so the next read reuses the buffer
instead of faulting in fresh memory. Without ``release`` the buffer is simply
freed with the object.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvstacks.backend import Backend
from kvstacks.config import Size
from kvstacks.errors import ConfigError, CorruptChunk
from kvstacks.frame import decode, header
from kvstacks.keys import CacheKey
from kvstacks.memory import MemoryObj
from tqdm import tqdm

if TYPE_CHECKING:
    import torch

from kvstacks_disk import direct as io
from kvstacks_disk import layout

log = logging.getLogger("kvstacks.disk")

#: above this many chunks, indexing at start shows a progress bar (on a terminal)
PROGRESS_THRESHOLD = 5000
#: a temp file older than this is a leftover of a crashed writer, removed at start
STALE_TEMP_SECONDS = 3600.0
#: idle buffer bytes kept by default (and at most the tier's capacity): room for the
#: concurrent reads of one long prefix (8 chunks of 32 MiB need 256 MiB and 32 KiB)
DEFAULT_BUFFER_POOL = 512 << 20



class DiskBackend(Backend):
    """Local-disk tier. Capacity and eviction belong to the tier; this only stores."""

    name = "disk"

    @dataclass
    class Options:
        #: directory for the chunks (created if missing, when ``create`` is true)
        path: Path
        #: fsync each chunk and its directory before the rename is reported done
        fsync: bool = False
        #: create ``path`` (and its parents) if it does not exist
        create: bool = True
        #: several processes use this path: lookups then ask the disk, not this process's index
        shared: bool = False
        #: bypass the page cache (O_DIRECT); null: whenever the filesystem supports it
        o_direct: bool | None = None
        #: idle aligned buffers kept for reuse by reads (after ``release``) and direct writes;
        #: null: the tier's capacity, at most ``DEFAULT_BUFFER_POOL``
        buffer_pool: Size | None = None

    @classmethod
    def check_options(cls, options: DiskBackend.Options) -> None:
        """What ``start()`` checks, without creating anything."""
        root = os.path.abspath(os.fspath(options.path))
        if os.path.exists(root):
            if not os.path.isdir(root):
                raise ConfigError("path", f"{root} is not a directory; point path at a directory for the chunk files")
            if not os.access(root, os.W_OK | os.X_OK):
                raise ConfigError("path", f"{root} is not writable; give this user write access (chown/chmod) "
                                          "or choose another path")
            return
        if not options.create:
            raise ConfigError("path", f"{root} does not exist; create it (mkdir -p {root}) or set create: true")
        parent = os.path.dirname(root)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError("path", f"cannot create {root}: {parent} is not a writable directory; "
                                      "create it yourself or choose a writable path")

    @classmethod
    def claims(cls, options: DiskBackend.Options) -> list[str]:
        return [f"directory {os.path.realpath(os.fspath(options.path))}"]

    def __init__(self, options: DiskBackend.Options) -> None:
        super().__init__(options)
        self.root = os.fspath(self.options.path)
        self.shared = self.options.shared
        self.corrupt_count = 0
        self._count_lock = threading.Lock()
        self.direct = False  # decided at start()
        # Sized at start(), when the tier has told us its capacity.
        self._buffers = io.AlignedBuffers(0)

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        self._buffers.limit = self.buffer_pool_limit()
        await asyncio.to_thread(self._check_root)
        wanted = self.options.o_direct
        supported = await asyncio.to_thread(io.supports_direct, self.root)
        if wanted and not supported:
            raise ConfigError("o_direct", f"the filesystem of {self.root} does not support O_DIRECT; "
                              "set o_direct: false (or leave it unset to choose automatically)")
        self.direct = supported if wanted is None else wanted

    async def close(self) -> None:
        self._buffers.limit = 0  # buffers released after close are let go, not kept
        self._buffers.clear()

    def buffer_pool_limit(self) -> int:
        """Most idle bytes the read and write buffers may keep: never more than the tier can hold."""
        if self.options.buffer_pool is not None:
            return int(self.options.buffer_pool)
        capacity = self.capacity
        return DEFAULT_BUFFER_POOL if capacity is None else min(int(capacity), DEFAULT_BUFFER_POOL)

    @property
    def idle_buffer_bytes(self) -> int:
        """Bytes of aligned buffers kept idle for the next read or direct write."""
        return self._buffers.idle_bytes

    def _check_root(self) -> None:
        root = self.root
        if not os.path.exists(root):
            if not self.options.create:
                raise ConfigError("path", f"{root} does not exist; create it (mkdir -p {root}) or set create: true")
            try:
                os.makedirs(root, exist_ok=True)
            except OSError as exc:
                raise ConfigError(
                    "path", f"cannot create {root}: {exc.strerror}; create it yourself or choose a writable path"
                ) from None
        if not os.path.isdir(root):
            raise ConfigError("path", f"{root} is not a directory; point path at a directory for the chunk files")
        probe = os.path.join(root, f".kvstacks-probe.{os.getpid()}.{secrets.token_hex(4)}{layout.TEMP_SUFFIX}")
        try:
            fd = os.open(probe, io.OPEN_WRITE, 0o644)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ConfigError(
                "path", f"{root} is not writable ({exc.strerror}); give this user write access "
                f"(chown/chmod) or choose another path"
            ) from None

    # -- data path ----------------------------------------------------------------

    async def put(self, key: CacheKey, obj: MemoryObj) -> None:
        await asyncio.to_thread(self._write, layout.chunk_path(self.root, key), obj)

    async def get(self, key: CacheKey) -> MemoryObj | None:
        return await asyncio.to_thread(self._read, layout.chunk_path(self.root, key), key)

    async def contains(self, key: CacheKey) -> bool:
        # A stat is microseconds; a thread hop costs more than it saves.
        return os.path.isfile(layout.chunk_path(self.root, key))

    async def remove(self, key: CacheKey) -> bool:
        return await asyncio.to_thread(self._unlink, layout.chunk_path(self.root, key))

    async def release(self, obj: MemoryObj) -> None:
        """The caller is done with ``obj`` from ``get``: its buffer may be reused."""
        self.release_now(obj)

    def release_now(self, obj: MemoryObj) -> None:
        self._buffers.release(obj)

    async def batch_put(self, items: Iterable[tuple[CacheKey, MemoryObj]]) -> None:
        await asyncio.gather(*(self.put(key, obj) for key, obj in items))

    async def batch_get(self, keys: list[CacheKey]) -> list[MemoryObj | None]:
        return list(await asyncio.gather(*(self.get(key) for key in keys)))

    async def batch_get_into(self, keys: list[CacheKey], places: list[torch.Tensor]) -> list[MemoryObj | None]:
        """``batch_get``, reading each uncompressed payload straight into the caller's ``places``."""
        return list(await asyncio.gather(*(
            asyncio.to_thread(self._read_into, layout.chunk_path(self.root, key), key, place)
            for key, place in zip(keys, places)
        )))

    async def batch_contains(self, keys: list[CacheKey]) -> list[bool]:
        root = self.root
        return [os.path.isfile(layout.chunk_path(root, key)) for key in keys]

    async def clear(self) -> None:
        await asyncio.to_thread(self._clear)

    async def keys(self) -> AsyncIterator[tuple[CacheKey, int]]:
        for item in await asyncio.to_thread(self.scan):
            yield item

    # -- the work, in a worker thread ------------------------------------------------

    def _write(self, path: str, obj: MemoryObj) -> None:
        directory, name = os.path.split(path)
        temp = os.path.join(directory, f".{name}.{os.getpid()}.{secrets.token_hex(6)}{layout.TEMP_SUFFIX}")
        flags = io.OPEN_WRITE | (io.O_DIRECT if self.direct else 0)
        try:
            fd = os.open(temp, flags, 0o644)
        except FileNotFoundError:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(temp, flags, 0o644)
        try:
            try:
                io.write_file(fd, obj, self.direct, self._buffers)
                if self.options.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, path)
        except BaseException:
            _unlink_quietly(temp)
            raise
        if self.options.fsync:
            _fsync_dir(directory)

    def _read(self, path: str, key: CacheKey) -> MemoryObj | None:
        read = io.read_file(path, self.direct, self._buffers)
        if read is None:
            return None
        buffer, view, st = read
        try:
            if len(view) != st.st_size:
                raise CorruptChunk(f"file shrank while being read ({len(view)} of {st.st_size} bytes)")
            decoded = decode(view, expect_key=key)
        except CorruptChunk as exc:
            self._buffers.give_back(buffer)
            self._drop_corrupt(path, st, exc)
            return None
        return self._buffers.lend(decoded, buffer)

    def _read_into(self, path: str, key: CacheKey, place: torch.Tensor) -> MemoryObj | None:
        placed = MemoryObj(key, place, tuple(place.shape), place.dtype)
        runs = io.runs(place)
        if runs is None:
            return self._read(path, key)
        read = io.read_into(path, header(placed), runs, self.direct)
        if read is None:
            return None
        outcome, st = read
        if outcome == "read":
            return placed
        if outcome == "corrupt":
            self._drop_corrupt(path, st, CorruptChunk("chunk checksum mismatch"))
            return None
        return self._read(path, key)

    def _drop_corrupt(self, path: str, st: os.stat_result, exc: CorruptChunk) -> None:
        # Another process may have renamed a good chunk over the bad one since we
        # opened it: only unlink the very file we read.
        try:
            now = os.stat(path)
            if (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev):
                os.unlink(path)
        except FileNotFoundError:
            pass
        with self._count_lock:
            self.corrupt_count += 1
        log.warning("disk tier: removed corrupt chunk %s: %s", path, exc)

    @staticmethod
    def _unlink(path: str) -> bool:
        try:
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False

    def _clear(self) -> None:
        for model_path, _ in self._model_dirs():
            for shard in _subdirs(model_path):
                for entry in _entries(shard):
                    if entry.name.endswith(layout.SUFFIX) and not entry.name.startswith("."):
                        _unlink_quietly(entry.path)

    def scan(self) -> list[tuple[CacheKey, int]]:
        """Every chunk on disk with its file size, from directory listings alone."""
        found: list[tuple[CacheKey, int]] = []
        bar: tqdm | None = None
        stale_before = time.time() - STALE_TEMP_SECONDS
        try:
            for model_path, model in self._model_dirs():
                for shard in _subdirs(model_path):
                    before = len(found)
                    for entry in _entries(shard):
                        name = entry.name
                        key = layout.key_from_name(model, name)
                        if key is not None:
                            try:
                                found.append((key, entry.stat().st_size))
                            except FileNotFoundError:
                                pass  # removed by another process meanwhile
                        elif layout.is_temp(name):
                            _remove_if_stale(entry, stale_before)
                    if bar is not None:
                        bar.update(len(found) - before)
                    elif len(found) > PROGRESS_THRESHOLD:
                        bar = tqdm(desc=f"kvstacks disk: indexing {self.root}", unit=" chunks",
                                   initial=len(found), disable=None)
        finally:
            if bar is not None:
                bar.close()
        return found

    def _model_dirs(self) -> list[tuple[str, str]]:
        out = []
        for entry in _entries(self.root):
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                out.append((entry.path, layout.unescape(entry.name)))
            except UnicodeDecodeError:
                continue
        return out


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _entries(path: str) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _subdirs(path: str) -> list[str]:
    return [e.path for e in _entries(path) if e.is_dir(follow_symlinks=False)]


def _remove_if_stale(entry: os.DirEntry, stale_before: float) -> None:
    try:
        if entry.stat().st_mtime < stale_before:
            os.unlink(entry.path)
    except FileNotFoundError:
        pass
