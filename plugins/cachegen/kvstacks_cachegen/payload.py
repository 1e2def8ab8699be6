"""Bounds-checked reading and writing of the cachegen payload's fields.

Every length read from a payload is checked against the bytes that remain
before anything is allocated, so hostile or truncated input fails with
:class:`~kvstacks.errors.CorruptChunk` instead of a crash, a huge allocation
or a hang.
"""

from __future__ import annotations

import struct

import numpy as np
from kvstacks.errors import CorruptChunk


class Reader:
    def __init__(self, payload: memoryview | bytes) -> None:
        self.buf = memoryview(payload).cast("B")
        self.pos = 0

    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.remaining():
            raise CorruptChunk(f"cachegen payload is truncated: {what} needs {n} bytes, {self.remaining()} left")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def array(self, dtype: np.dtype | type, count: int, what: str) -> np.ndarray:
        dtype = np.dtype(dtype).newbyteorder("<")
        raw = self.take(count * dtype.itemsize, what)
        return np.frombuffer(raw, dtype=dtype, count=count)

    def done(self) -> None:
        if self.remaining():
            raise CorruptChunk(f"cachegen payload has {self.remaining()} unexpected trailing bytes")


class Writer:
    def __init__(self) -> None:
        self.parts: list[bytes | memoryview] = []
        self.size = 0

    def pack(self, fmt: str, *values: object) -> None:
        self.add(struct.pack(fmt, *values))

    def add(self, data: bytes | memoryview | np.ndarray) -> None:
        if isinstance(data, np.ndarray):
            data = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
        self.parts.append(data)
        self.size += len(data)

    def getvalue(self) -> bytearray:
        out = bytearray(self.size)
        pos = 0
        for part in self.parts:
            out[pos:pos + len(part)] = part
            pos += len(part)
        return out
