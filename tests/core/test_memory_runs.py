"""A chunk sliced out of a longer KV as its contiguous runs (kvstacks.memory): no copy, every byte in order."""

from __future__ import annotations

import pytest
import torch
from kvstacks.keys import CacheKey
from kvstacks.memory import MemoryObj, contiguous_runs, run_offsets

KEY = CacheKey("m", "kv", 1, 0, b"\x07" * 16)

VIEWS = {
    # the engine's chunks: kv.split(chunk, dim=2), here the third of four
    "token slice": lambda: torch.randn(2, 3, 512, 256).to(torch.float16)[:, :, 256:384],
    "one layer": lambda: torch.randn(2, 1, 512, 128).to(torch.bfloat16)[:, :, 128:384],
    "k only": lambda: torch.randn(2, 4, 300, 96)[0:1, :, 50:250],
    "contiguous": lambda: torch.randn(2, 3, 64, 128).to(torch.float16),
}


@pytest.mark.parametrize("name", list(VIEWS))
def test_runs_hold_the_view_s_bytes_in_order_and_lie_in_its_memory(name: str) -> None:
    data = VIEWS[name]()
    expected = data.contiguous().view(torch.uint8).reshape(-1)
    size, offsets = run_offsets(data)
    width = data.element_size()
    assert size * len(offsets) == data.numel()
    storage = data.untyped_storage()
    for o in offsets:  # every run inside the view's own storage (sent from where it lies)
        start = data.data_ptr() + o * width
        assert storage.data_ptr() <= start and start + size * width <= storage.data_ptr() + storage.nbytes()
    runs = contiguous_runs(data)
    assert [r.data_ptr() for r in runs] == [data.data_ptr() + o * width for o in offsets]
    assert torch.equal(torch.cat([r.reshape(-1).view(torch.uint8) for r in runs]), expected)
    obj = MemoryObj(KEY, data, tuple(data.shape), data.dtype)
    assert b"".join(bytes(run) for run in obj.payload_runs()) == expected.numpy().tobytes()


def test_short_runs_are_not_worth_sending_one_by_one() -> None:
    data = torch.randn(2, 3, 512, 8)[:, :, 100:200]  # 32-byte runs
    assert run_offsets(data) is None and contiguous_runs(data) is None
    obj = MemoryObj(KEY, data, tuple(data.shape), data.dtype)
    (payload,) = obj.payload_runs()  # one gathered copy instead
    assert bytes(payload) == data.contiguous().view(torch.uint8).numpy().tobytes()
