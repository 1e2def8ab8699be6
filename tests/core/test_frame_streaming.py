"""A frame made run by run (encode_streamed) and checked as it arrives (RunningCheck)."""

from __future__ import annotations

import pytest
import torch
from kvstacks import frame
from kvstacks.errors import CorruptChunk
from kvstacks.keys import CacheKey
from kvstacks.memory import MemoryObj

KEY = CacheKey("m", "kv", 1, 0, b"\x05" * 16)


def sliced_chunk() -> MemoryObj:
    kv = torch.randn(2, 3, 512, 128).to(torch.bfloat16)[:, :, 128:384]  # runs of 64 KiB
    return MemoryObj(KEY, kv, tuple(kv.shape), kv.dtype)


def test_a_streamed_frame_is_the_frame_and_its_size_is_announced_first() -> None:
    obj = sliced_chunk()
    size, parts = frame.encode_streamed(obj)
    parts = list(parts)
    assert len(parts) == 2 + 6, "header, one run per [k/v, layer] block, checksum"
    joined = b"".join(bytes(p) for p in parts)
    assert len(joined) == size and joined == frame.encode(obj)
    assert torch.equal(frame.decode(joined, expect_key=KEY).data, obj.data)


@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 20])
def test_a_running_check_fed_piecewise_stands_for_the_full_sum(piece: int) -> None:
    encoded = bytearray(frame.encode(sliced_chunk()))
    running = frame.RunningCheck(len(encoded))
    for at in range(0, len(encoded), piece):
        running.update(memoryview(encoded)[at : at + piece])
    assert frame.decode(encoded, expect_key=KEY, running=running).key == KEY


def test_a_running_check_catches_a_changed_byte_and_an_incomplete_one_is_not_trusted() -> None:
    encoded = bytearray(frame.encode(sliced_chunk()))
    encoded[100] ^= 1
    running = frame.RunningCheck(len(encoded))
    running.update(encoded)
    with pytest.raises(CorruptChunk, match="checksum"):
        frame.decode(encoded, running=running)
    partial = frame.RunningCheck(len(encoded))
    partial.update(memoryview(encoded)[:10])
    assert partial.result() is None
    with pytest.raises(CorruptChunk, match="checksum"):
        frame.decode(encoded, running=partial)  # computed in full instead
