"""``cachegen-lossless``: fp16/bf16/fp32 KV split into byte planes, each zstd-compressed.

The high bytes of fp16 KV (sign, exponent, top of the mantissa) repeat a lot;
the low bytes are close to noise. Compressing the planes apart lets zstd find
the redundancy it cannot see in interleaved bytes (about 1.2x on real KV).

Payload: ``"KVBS" u8 version, u8 planes, u32 size of each compressed plane`` then the planes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import zstandard
from kvstacks.compression import Compressor
from kvstacks.errors import ConfigError, CorruptChunk

from kvstacks_cachegen.payload import Reader

MAGIC = b"KVBS"
VERSION = 1
ITEMSIZES = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.uint8: 1, torch.int8: 1}


class ByteSplitZstdCompressor(Compressor):
    """Lossless: byte planes plus zstd."""

    name: ClassVar[str] = "cachegen-lossless"
    lossless: ClassVar[bool] = True

    @dataclass
    class Options:
        #: zstd level (1 is fast and gets nearly all of the gain on KV)
        level: int = 1

    def __init__(self, options: ByteSplitZstdCompressor.Options | None = None) -> None:
        super().__init__(options)
        if not -7 <= self.options.level <= 22:
            raise ConfigError("compressor_options.level", f"zstd levels are -7..22, got {self.options.level}")

    def compress(self, kv: torch.Tensor) -> bytearray:
        itemsize = ITEMSIZES.get(kv.dtype)
        if itemsize is None:
            raise ValueError(f"cachegen-lossless cannot code {kv.dtype}")
        raw = kv.detach().contiguous().cpu().view(torch.uint8).numpy().reshape(-1, itemsize)
        cctx = zstandard.ZstdCompressor(level=self.options.level)
        planes = [cctx.compress(np.ascontiguousarray(raw[:, i])) for i in range(itemsize)]
        head = MAGIC + struct.pack("<BB", VERSION, itemsize) + struct.pack(f"<{itemsize}I", *map(len, planes))
        return bytearray(head + b"".join(planes))

    def decompress(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        itemsize = ITEMSIZES.get(dtype)
        count = 1
        for d in shape:
            count *= d
        if itemsize is None or count > 1 << 31:
            raise CorruptChunk(f"cachegen-lossless cannot produce {tuple(shape)} {dtype}")
        r = Reader(payload)
        magic, version, planes = r.unpack("<4sBB", "header")
        if magic != MAGIC or version != VERSION or planes != itemsize:
            raise CorruptChunk("not a cachegen-lossless payload for this dtype (bad magic, version or planes)")
        sizes = r.unpack(f"<{planes}I", "plane sizes")
        out = np.empty((count, itemsize), dtype=np.uint8)
        dctx = zstandard.ZstdDecompressor()
        for i, size in enumerate(sizes):
            frame = r.take(size, f"plane {i}")
            try:
                # A frame's declared size overrides max_output_size, so check it
                # before zstd allocates what a hostile header asks for.
                declared = zstandard.frame_content_size(frame)
                if declared not in (-1, count):
                    raise CorruptChunk(f"cachegen-lossless plane {i} declares {declared} bytes, expected {count}")
                plane = dctx.decompress(frame, max_output_size=count) if count else b""
            except zstandard.ZstdError as exc:
                raise CorruptChunk(f"cachegen-lossless plane {i} is corrupt: {exc}") from None
            if len(plane) != count:
                raise CorruptChunk(f"cachegen-lossless plane {i} holds {len(plane)} bytes, expected {count}")
            out[:, i] = np.frombuffer(plane, dtype=np.uint8)
        r.done()
        return torch.from_numpy(out.reshape(-1)).view(dtype).reshape(shape)
