"""A chunk file is evidence, not truth: a frame with the right key and a valid checksum whose
metadata lies is a miss, counted as corrupt, removed, never promoted and never raised."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from kvstacks import CacheEngine, frame
from kvstacks.memory import MemoryObj
from kvstacks.testing import bits
from kvstacks_disk import chunk_path

CHUNK, LAYERS, HIDDEN = 256, 2, 8


def stack(root: Path, compressor: str = "none") -> dict:
    return {"model": "liar", "chunk_size": CHUNK, "stack": [
        {"backend": "cpu", "capacity": "16MiB"}, {"backend": "disk", "path": str(root), "compressor": compressor}]}


def lie(key, shape, dtype=torch.float16, compressor="none", payload: bytes | None = None) -> bytes:
    """A well-formed frame (right key, valid checksum) that says ``shape``/``dtype``."""
    if payload is None:
        payload = bytes(math.prod(shape) * torch.empty((), dtype=dtype).element_size())
    data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8)
    return frame.encode(MemoryObj(key, data, tuple(shape), dtype, compressor))


LIES = {
    "300 tokens": lambda key: lie(key, (2, LAYERS, 300, HIDDEN)),
    "100 tokens": lambda key: lie(key, (2, LAYERS, 100, HIDDEN)),
    "0 tokens": lambda key: lie(key, (2, LAYERS, 0, HIDDEN)),
    "3-D shape": lambda key: lie(key, (2, LAYERS, CHUNK * HIDDEN)),
    "uint8": lambda key: lie(key, (2, LAYERS, CHUNK, HIDDEN * 2), torch.uint8),
    "3 layers": lambda key: lie(key, (2, 3, CHUNK, HIDDEN)),
    "another dtype": lambda key: lie(key, (2, LAYERS, CHUNK, HIDDEN // 2), torch.float32),
}


def stored(root: Path, compressor: str = "none"):
    tokens = list(range(3 * CHUNK))
    kv = torch.randn(2, LAYERS, len(tokens), HIDDEN, generator=torch.Generator().manual_seed(5)).half()
    engine = CacheEngine.from_config(stack(root, compressor))
    engine.store(tokens, kv)
    assert engine.flush(30)
    return engine, tokens, kv


@pytest.mark.parametrize("use_out", [False, True], ids=["new tensor", "out="])
@pytest.mark.parametrize("name", list(LIES))
def test_a_lying_chunk_is_a_counted_miss_removed_and_never_promoted(tmp_path, name, use_out):
    # On main: served with the wrong shape and promoted (300/100 tokens, uint8), or raised
    # (RuntimeError with out=, IndexError for a 3-D shape).
    engine, tokens, kv = stored(tmp_path)
    with engine:
        liar = engine.chunk_keys(tokens)[1]
        path = chunk_path(str(tmp_path), liar)
        Path(path).write_bytes(LIES[name](liar))
        engine.clear("cpu")
        out = torch.empty(2, LAYERS, len(tokens), HIDDEN, dtype=torch.float16) if use_out else None
        got, n = engine.retrieve(tokens, out=out)
        assert n == CHUNK, "the chunk before the liar is served, nothing from it on"
        assert got.shape == (2, LAYERS, CHUNK, HIDDEN) and bits(got) == bits(kv[:, :, :CHUNK])
        assert engine.stats()["disk"]["corrupt"] == 1
        assert not os.path.exists(path), "the lying file was not removed"
        assert engine.lookup_tiers(tokens) == {"cpu": CHUNK, "disk": CHUNK}, "the liar was promoted or is still listed"
        assert engine.retrieve(tokens)[1] == CHUNK


@pytest.mark.parametrize("compressor", ["lz4", "zstd"])
def test_a_garbage_compressed_payload_under_a_valid_frame_is_a_counted_miss(tmp_path, compressor):
    # On main: CorruptChunk raised to the caller of retrieve.
    engine, tokens, kv = stored(tmp_path, compressor)
    with engine:
        liar = engine.chunk_keys(tokens)[2]
        path = chunk_path(str(tmp_path), liar)
        garbage = os.urandom(3000)
        Path(path).write_bytes(lie(liar, (2, LAYERS, CHUNK, HIDDEN), compressor=compressor, payload=garbage))
        engine.clear("cpu")
        got, n = engine.retrieve(tokens)
        assert n == 2 * CHUNK and bits(got) == bits(kv[:, :, : 2 * CHUNK])
        assert engine.stats()["disk"]["corrupt"] == 1
        assert not os.path.exists(path)
        assert engine.lookup_tiers(tokens) == {"cpu": 2 * CHUNK, "disk": 2 * CHUNK}


def test_the_first_chunk_lying_about_the_layout_is_caught_by_what_the_engine_stored(tmp_path):
    engine, tokens, kv = stored(tmp_path)
    with engine:
        liar = engine.chunk_keys(tokens)[0]
        Path(chunk_path(str(tmp_path), liar)).write_bytes(LIES["3 layers"](liar))
        engine.clear("cpu")
        assert engine.retrieve(tokens) == (None, 0)
        assert engine.stats()["disk"]["corrupt"] == 1


def test_out_of_another_layout_is_the_callers_mistake_and_removes_nothing(tmp_path):
    engine, tokens, kv = stored(tmp_path)
    with engine:
        engine.clear("cpu")
        wrong = torch.empty(2, LAYERS + 1, len(tokens), HIDDEN, dtype=torch.float16)
        with pytest.raises(Exception, match="out has 3 layers") as info:
            engine.retrieve(tokens, out=wrong)
        assert type(info.value).__name__ == "InvalidInput"
        with pytest.raises(Exception, match="out must be"):
            engine.retrieve(tokens, out=torch.empty(2, LAYERS, len(tokens), HIDDEN, dtype=torch.uint8))
        assert engine.stats()["disk"]["corrupt"] == 0
        got, n = engine.retrieve(tokens)
        assert n == len(tokens) and bits(got) == bits(kv)
