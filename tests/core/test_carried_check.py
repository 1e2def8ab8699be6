"""A frame check computed while a chunk is copied in (frame.copy_checked) and carried by the
object (MemoryObj.check): the frame's bytes are the same with it and without it."""

from __future__ import annotations

import pytest
import torch
from kvstacks import frame
from kvstacks.errors import CorruptChunk
from kvstacks.keys import CacheKey
from kvstacks.memory import MemoryObj

KEY = CacheKey("m", "kv", 1, 0, b"\x07" * 16)


def sources() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    long = torch.randn(2, 3, 1200, 256, generator=g).to(torch.float16)
    return {
        # 600 tokens x 256 x 2 B = 300 KiB runs: a block and a short block per run
        "sliced, runs over a block": long[:, :, 300:900],
        "contiguous, several blocks": long[:, :, :700].contiguous(),
        "sliced, short runs (gathered by torch)": long[:, :, 5:9],
        "tiny": torch.randn(2, 1, 3, 5, generator=g).to(torch.bfloat16),
        "float32 sliced": torch.randn(2, 2, 400, 128, generator=g)[:, :, 100:300],
    }


@pytest.mark.parametrize("name", list(sources()))
def test_copy_checked_copies_exactly_and_the_frames_are_identical(name: str) -> None:
    src = sources()[name]
    plain = MemoryObj(KEY, src, tuple(src.shape), src.dtype)
    dst = torch.empty(src.shape, dtype=src.dtype)
    copied = MemoryObj(KEY, dst, tuple(src.shape), src.dtype)
    copied.check = frame.copy_checked(dst, src, frame.header(copied))
    assert torch.equal(dst, src)
    expected = frame.encode(plain)  # hashed the usual way, from memory
    assert frame.encode(copied) == expected
    assert b"".join(bytes(p) for p in frame.encode_parts(copied)) == expected
    size, parts = frame.encode_streamed(copied)
    streamed = b"".join(bytes(p) for p in parts)
    assert streamed == expected and size == len(expected)
    assert torch.equal(frame.decode(streamed, expect_key=KEY).data, dst)


def test_a_compressed_payload_carries_its_check_too() -> None:
    data = torch.randint(0, 256, (5001,), dtype=torch.uint8)
    plain = MemoryObj(KEY, data, (2, 2, 16, 64), torch.float16, "lz4")
    dst = torch.empty_like(data)
    copied = MemoryObj(KEY, dst, (2, 2, 16, 64), torch.float16, "lz4")
    copied.check = frame.copy_checked(dst, data, frame.header(copied))
    assert frame.encode(copied) == frame.encode(plain)


def test_a_stale_carried_check_makes_the_frame_fail_never_pass_other_bytes() -> None:
    src = sources()["sliced, runs over a block"]
    dst = torch.empty(src.shape, dtype=src.dtype)
    obj = MemoryObj(KEY, dst, tuple(src.shape), src.dtype)
    obj.check = frame.copy_checked(dst, src, frame.header(obj))
    dst[1, 2, 599, 255] += 1  # the bytes change; the check was not cleared (a bug somewhere)
    for encoded in (frame.encode(obj), b"".join(bytes(p) for p in frame.encode_streamed(obj)[1])):
        with pytest.raises(CorruptChunk, match="checksum"):
            frame.decode(encoded, expect_key=KEY)
    obj.check = None  # cleared, as whoever changes the bytes must: the frame is right again
    assert torch.equal(frame.decode(frame.encode(obj), expect_key=KEY).data, dst)
