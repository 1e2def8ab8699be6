"""The compressor interface, and the builtin ``none`` and ``lz4`` compressors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvstacks.errors import CorruptChunk
from kvstacks.memory import MemoryObj


class Compressor:
    """Turns a KV tensor into bytes and back. Register with ``register_compressors``.

    ``compress`` receives a contiguous KV tensor ``[2, layers, tokens, hidden]``;
    ``decompress`` receives the payload with the decoded ``shape`` and ``dtype``
    and must return a tensor of exactly that shape and dtype, or raise
    :class:`~kvstacks.errors.CorruptChunk` for bytes it cannot decode.
    Implementations must be thread-safe: chunks are coded in parallel.
    """

    name: ClassVar[str]
    lossless: ClassVar[bool] = True

    @dataclass
    class Options:
        pass

    def __init__(self, options: Compressor.Options | None = None) -> None:
        self.options = options if options is not None else self.Options()

    def compress(self, kv: torch.Tensor) -> bytes | bytearray | memoryview:
        raise NotImplementedError

    def decompress(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    # The tier calls these two; they wrap the methods above in MemoryObj.
    def encode(self, obj: MemoryObj) -> MemoryObj:
        if obj.compressor != "none":
            obj = self.decode_obj(obj)
        payload = self.compress(obj.data.contiguous())
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if len(payload) else torch.empty(0, dtype=torch.uint8)
        return MemoryObj(obj.key, data, obj.shape, obj.dtype, self.name)

    def decode_obj(self, obj: MemoryObj) -> MemoryObj:
        if obj.compressor == "none":
            return obj
        if obj.compressor != self.name:
            raise CorruptChunk(f"chunk was compressed with {obj.compressor!r}, not {self.name!r}")
        try:
            kv = self.decompress(obj.payload(), obj.shape, obj.dtype)
        except CorruptChunk:
            raise
        except Exception as exc:
            raise CorruptChunk(f"{self.name} could not decode the chunk: {exc}") from exc
        if tuple(kv.shape) != tuple(obj.shape) or kv.dtype != obj.dtype:
            raise CorruptChunk(f"{self.name} decoded {tuple(kv.shape)} {kv.dtype}, expected {obj.shape} {obj.dtype}")
        return MemoryObj(obj.key, kv, obj.shape, obj.dtype)
