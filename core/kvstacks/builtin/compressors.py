"""The builtin compressors: ``none`` (identity), ``lz4`` and ``zstd`` (both lossless).

General-purpose compressors barely shrink fp16 KV: the low byte of each value is
mantissa noise. Splitting the values into byte planes (plane ``i`` holds byte
``i`` of every value) puts the sign and exponent bytes together, where an
entropy coder (zstd's Huffman stage) finds real redundancy; lz4 has no entropy
stage and gains little from it. See docs/compressors.md for measured figures.

``lz4`` and ``zstd`` payloads describe their own layout, so a chunk decodes
with any options (a tier that changes ``byte_split`` still reads old chunks)::

    u8  format version (1)
    u8  planes: 1 (bytes in memory order) or the element size (byte split)
    per plane: u8 mode (0 stored, 1 coded), u32 stored length (little-endian)
    the planes' stored bytes, one after another
"""

from __future__ import annotations

import struct
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import lz4.block
import numpy as np
import torch
import zstandard

from kvstacks.compression import Compressor
from kvstacks.errors import ConfigError, CorruptChunk
from kvstacks.hookspecs import hookimpl
from kvstacks.memory import MemoryObj

_FORMAT_VERSION = 1
_HEAD = struct.Struct("<BB")
_PLANE = struct.Struct("<BI")
_STORED, _CODED = 0, 1


def _kv_bytes(kv: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 array, without a copy when it is contiguous."""
    return kv.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _expected_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[int, int]:
    count = 1
    for dim in shape:
        count *= dim
    itemsize = torch.empty((), dtype=dtype).element_size()
    return count * itemsize, itemsize


def _split_planes(raw: np.ndarray, itemsize: int) -> list[np.ndarray]:
    """Plane ``i`` holds byte ``i`` (in memory order) of every value."""
    if itemsize == 2 and sys.byteorder == "little":
        # Shifts and narrowing casts run contiguously: about 4x faster than a strided gather.
        values = raw.view(np.uint16)
        return [values.astype(np.uint8), (values >> 8).astype(np.uint8)]
    by_value = raw.reshape(-1, itemsize)
    return [np.ascontiguousarray(by_value[:, i]) for i in range(itemsize)]


class NoCompressor(Compressor):
    """Stores the KV as it is. ``encode`` and ``decode_obj`` return the object itself (no copy)."""

    name = "none"
    lossless = True

    def compress(self, kv: torch.Tensor) -> memoryview:
        return memoryview(_kv_bytes(kv))

    def decompress(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes, _ = _expected_nbytes(shape, dtype)
        if len(payload) != nbytes:
            raise CorruptChunk(f"raw payload holds {len(payload)} bytes; shape {shape} of {dtype} needs {nbytes}")
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        # A copy: the payload may be a read-only buffer (bytes from a socket) the caller reuses.
        return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype).view(shape)

    def encode(self, obj: MemoryObj) -> MemoryObj:
        if obj.compressor == "none":
            return obj
        raise CorruptChunk(f"cannot store a {obj.compressor!r} chunk raw without its compressor; decode it first")


class _PlaneCompressor(Compressor):
    """Shared by ``lz4`` and ``zstd``: byte planes, each coded or stored, in the layout above."""

    lossless = True

    def _byte_split(self) -> bool:
        return bool(getattr(self.options, "byte_split", False))

    def _code(self, data: np.ndarray) -> bytes | bytearray:
        raise NotImplementedError

    def _uncode(self, data: memoryview, size: int) -> bytes | bytearray:
        """Decode one plane of exactly ``size`` bytes; raise CorruptChunk otherwise."""
        raise NotImplementedError

    def compress(self, kv: torch.Tensor) -> bytearray:
        raw = _kv_bytes(kv)
        itemsize = kv.element_size()
        if self._byte_split() and itemsize > 1 and raw.size:
            planes = _split_planes(raw, itemsize)
        else:
            planes = [raw]
        parts: list[tuple[int, bytes | bytearray | np.ndarray]] = []
        for plane in planes:
            coded = self._code(plane) if plane.size else b""
            # Noise planes (low mantissa bytes) do not shrink: storing them saves decode time too.
            parts.append((_CODED, coded) if len(coded) < plane.size else (_STORED, plane))
        out = bytearray(_HEAD.size + _PLANE.size * len(parts) + sum(len(memoryview(p)) for _, p in parts))
        _HEAD.pack_into(out, 0, _FORMAT_VERSION, len(parts))
        offset = _HEAD.size
        for mode, data in parts:
            _PLANE.pack_into(out, offset, mode, len(memoryview(data)))
            offset += _PLANE.size
        for _, data in parts:
            view = memoryview(data).cast("B")
            out[offset : offset + len(view)] = view
            offset += len(view)
        return out

    def decompress(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        view = memoryview(payload).cast("B")
        nbytes, itemsize = _expected_nbytes(shape, dtype)
        if len(view) < _HEAD.size:
            raise CorruptChunk(f"{self.name} payload is truncated ({len(view)} bytes)")
        version, nplanes = _HEAD.unpack_from(view, 0)
        if version != _FORMAT_VERSION:
            raise CorruptChunk(f"{self.name} payload format {version} is unknown (this kvstacks reads {_FORMAT_VERSION})")
        if nplanes not in (1, itemsize):
            raise CorruptChunk(f"{self.name} payload has {nplanes} byte planes; {dtype} values have {itemsize} bytes")
        offset = _HEAD.size + _PLANE.size * nplanes
        if len(view) < offset:
            raise CorruptChunk(f"{self.name} payload is truncated (plane table)")
        table = [_PLANE.unpack_from(view, _HEAD.size + _PLANE.size * i) for i in range(nplanes)]
        if offset + sum(length for _, length in table) != len(view):
            raise CorruptChunk(f"{self.name} payload length does not match its plane table (truncated or padded)")
        plane_size = nbytes // nplanes
        planes = []
        for mode, length in table:
            stored = view[offset : offset + length]
            offset += length
            if mode == _STORED:
                if length != plane_size:
                    raise CorruptChunk(f"{self.name} stored plane holds {length} bytes, expected {plane_size}")
                planes.append(stored)
            elif mode == _CODED:
                if plane_size == 0:
                    raise CorruptChunk(f"{self.name} payload codes an empty plane")
                plane = self._uncode(stored, plane_size)
                if len(plane) != plane_size:
                    raise CorruptChunk(f"{self.name} plane decoded to {len(plane)} bytes, expected {plane_size}")
                planes.append(plane)
            else:
                raise CorruptChunk(f"{self.name} plane mode {mode} is unknown")
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        if nplanes == 1:
            only = planes[0]
            # Coded planes come back as fresh writable buffers; a stored one is the caller's payload.
            flat = only if isinstance(only, bytearray) else bytearray(only)
        else:
            joined = np.empty((nbytes // itemsize, itemsize), dtype=np.uint8)
            for i, plane in enumerate(planes):
                joined[:, i] = np.frombuffer(plane, dtype=np.uint8)
            flat = joined.reshape(-1)
        return torch.frombuffer(flat, dtype=torch.uint8).view(dtype).view(shape)

    def encode(self, obj: MemoryObj) -> MemoryObj:
        if obj.compressor != "none":
            obj = self.decode_obj(obj)
        payload = self.compress(obj.data)
        # compress returns a fresh bytearray: wrap it rather than copy it as the base class does.
        data = torch.frombuffer(payload, dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8)
        return MemoryObj(obj.key, data, obj.shape, obj.dtype, self.name)


class LZ4Compressor(_PlaneCompressor):
    """lz4 block compression, optionally on byte planes. Fast, and on fp16 KV nearly 1.0x."""

    name = "lz4"

    @dataclass
    class Options:
        #: code each byte of the values as a separate plane (sign/exponent bytes together)
        byte_split: bool = False
        #: lz4 acceleration: 1 compresses best; larger trades ratio for speed
        acceleration: int = 1

        def __post_init__(self) -> None:
            if not 1 <= self.acceleration <= 65537:
                raise ConfigError("acceleration",
                                  f"lz4 acceleration must be between 1 and 65537, got {self.acceleration}")

    def _code(self, data: np.ndarray) -> bytes | bytearray:
        acceleration = self.options.acceleration
        return lz4.block.compress(data, mode="fast" if acceleration > 1 else "default", acceleration=acceleration,
                                  store_size=False, return_bytearray=True)

    def _uncode(self, data: memoryview, size: int) -> bytes | bytearray:
        try:
            return lz4.block.decompress(data, uncompressed_size=size, return_bytearray=True)
        except lz4.block.LZ4BlockError as exc:
            raise CorruptChunk(f"lz4 could not decode a plane: {exc}") from exc


class ZstdCompressor(_PlaneCompressor):
    """zstd, on byte planes by default: the best lossless ratio here, at about a few hundred MB/s."""

    name = "zstd"

    @dataclass
    class Options:
        #: code each byte of the values as a separate plane (sign/exponent bytes together)
        byte_split: bool = True
        #: zstd level: negative levels are faster, higher levels compress more but slowly
        level: int = 1

        def __post_init__(self) -> None:
            if not -7 <= self.level <= 22:
                raise ConfigError("level", f"zstd level must be between -7 and 22, got {self.level}")

    def __init__(self, options: ZstdCompressor.Options | None = None) -> None:
        super().__init__(options)
        # zstandard contexts are not thread-safe and chunks are coded from several threads.
        self._local = threading.local()

    def _context(self, attr: str, make: Callable[[], object]) -> object:
        ctx = getattr(self._local, attr, None)
        if ctx is None:
            ctx = make()
            setattr(self._local, attr, ctx)
        return ctx

    def _code(self, data: np.ndarray) -> bytes | bytearray:
        cctx = self._context("cctx", lambda: zstandard.ZstdCompressor(level=self.options.level, write_checksum=False))
        return cctx.compress(data)  # type: ignore[attr-defined]

    def _uncode(self, data: memoryview, size: int) -> bytes | bytearray:
        try:
            declared = zstandard.frame_content_size(data)
        except zstandard.ZstdError as exc:
            raise CorruptChunk(f"zstd plane has no valid frame header: {exc}") from exc
        if declared != size:
            raise CorruptChunk(f"zstd plane declares {declared} bytes, expected {size}")
        dctx = self._context("dctx", zstandard.ZstdDecompressor)
        try:
            return dctx.decompress(data, max_output_size=size)  # type: ignore[attr-defined]
        except zstandard.ZstdError as exc:
            raise CorruptChunk(f"zstd could not decode a plane: {exc}") from exc


@hookimpl
def register_compressors(register) -> None:
    for compressor in (NoCompressor, LZ4Compressor, ZstdCompressor):
        register(compressor)
