"""The disk tier under the real engine: restart, promotion to cpu, corrupt files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from kvstacks import CacheEngine, frame
from kvstacks.memory import MemoryObj
from kvstacks.testing import bits, random_kv
from kvstacks_disk import chunk_path

CHUNK = 16


def tokens_and_kv(seed: int, chunks: int = 4):
    tokens = list(range(seed * 1000, seed * 1000 + chunks * CHUNK))
    return tokens, random_kv(2, len(tokens), 64, seed=seed)


def disk_only(root: Path) -> dict:
    return {"model": "m", "chunk_size": CHUNK, "stack": [{"backend": "disk", "path": str(root)}]}


def test_a_new_engine_finds_what_the_last_one_stored(tmp_path: Path) -> None:
    tokens, kv = tokens_and_kv(1)
    with CacheEngine.from_config(disk_only(tmp_path)) as engine:
        engine.store(tokens, kv)
    with CacheEngine.from_config(disk_only(tmp_path)) as engine:
        assert engine.lookup(tokens) == len(tokens)
        got, n = engine.retrieve(tokens)
        assert n == len(tokens) and bits(got) == bits(kv)
        assert engine.stats()["disk"]["objects"] == 4


def test_cpu_over_disk_promotes_disk_hits(tmp_path: Path) -> None:
    config = {"model": "m", "chunk_size": CHUNK, "stack": [
        {"backend": "cpu", "capacity": "16MiB"}, {"backend": "disk", "path": str(tmp_path)}]}
    tokens, kv = tokens_and_kv(2)
    with CacheEngine.from_config(config) as engine:
        engine.store(tokens, kv)
    with CacheEngine.from_config(config) as engine:  # cpu is empty after a restart; disk is not
        assert engine.lookup_tiers(tokens) == {"cpu": 0, "disk": len(tokens)}
        got, n = engine.retrieve(tokens)
        assert n == len(tokens) and bits(got) == bits(kv)
        assert engine.lookup_tiers(tokens)["cpu"] == len(tokens), "disk hits were not promoted to cpu"
        again, _ = engine.retrieve(tokens)
        assert bits(again) == bits(kv)


def test_a_corrupt_chunk_ends_the_prefix_and_is_removed(tmp_path: Path) -> None:
    tokens, kv = tokens_and_kv(3)
    with CacheEngine.from_config(disk_only(tmp_path)) as engine:
        engine.store(tokens, kv)
        third = engine.chunk_keys(tokens)[2]
    path = chunk_path(str(tmp_path), third)
    with open(path, "r+b") as f:
        f.seek(-20, os.SEEK_END)
        f.write(b"\x00" * 4)
    with CacheEngine.from_config(disk_only(tmp_path)) as engine:
        got, n = engine.retrieve(tokens)
        assert n == 2 * CHUNK, "the chunks before the corrupt one are served, nothing after"
        assert bits(got) == bits(kv[:, :, : 2 * CHUNK])
        assert not os.path.exists(path)
        assert engine.tiers[0].backend.corrupt_count == 1


def test_an_unwritable_path_is_a_config_error_naming_it() -> None:
    with pytest.raises(Exception, match="/proc/self") as info:
        CacheEngine.from_config(disk_only(Path("/proc/self/kvstacks")))
    assert "create it yourself or choose a writable path" in str(info.value)


def test_a_shared_disk_tier_writes_again_what_another_process_removed(tmp_path: Path) -> None:
    # With shared: true another process may clear the directory; on main the tier's index kept
    # listing the files, so storing the prompt again never wrote them back.
    config = {"model": "m", "chunk_size": CHUNK, "stack": [
        {"backend": "cpu", "capacity": "16MiB"}, {"backend": "disk", "path": str(tmp_path), "shared": True}]}
    tokens, kv = tokens_and_kv(3)
    with CacheEngine.from_config(config) as engine:
        engine.store(tokens, kv)
        assert engine.flush(30)
        with CacheEngine.from_config(config) as other:  # another engine on the same directory
            other.clear("disk")
        engine.clear("cpu")
        engine.store(tokens, kv)
        assert engine.flush(30)
        assert engine.lookup_tiers(tokens) == {"cpu": len(tokens), "disk": len(tokens)}
        engine.clear("cpu")
        got, n = engine.retrieve(tokens)
        assert n == len(tokens) and bits(got) == bits(kv)


def count_general_reads(engine: CacheEngine, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths the disk backend read into buffers of its own (not straight into ``out``)."""
    backend = engine.tier("disk").backend
    general: list[str] = []
    read = backend._read

    def counted(path: str, key):
        general.append(path)
        return read(path, key)

    monkeypatch.setattr(backend, "_read", counted)
    return general


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("o_direct", [None, False])
def test_retrieve_into_out_reads_the_payload_straight_there(tmp_path: Path, monkeypatch, dtype, o_direct) -> None:
    config = disk_only(tmp_path)
    config["stack"][0]["o_direct"] = o_direct
    tokens = list(range(4 * CHUNK + 5))  # four whole chunks and a partial one
    kv = random_kv(3, len(tokens), 64, dtype, seed=7)
    with CacheEngine.from_config(config) as engine:
        engine.store(tokens, kv)
    with CacheEngine.from_config(config) as engine:
        general = count_general_reads(engine, monkeypatch)
        out = torch.full((2, 3, len(tokens) + 40, 64), 7.0, dtype=dtype)  # longer than the prompt
        got, n = engine.retrieve(tokens, out=out)
        assert n == len(tokens) and bits(got) == bits(kv)
        assert got.data_ptr() == out.data_ptr() and bool((out[:, :, n:] == 7).all()), "out beyond n was written"
        assert general == [], "every chunk should have been read straight into out"
        assert engine.tier("disk").backend.idle_buffer_bytes == 0, "no read buffer should have been used"
        one = torch.empty(2, 3, CHUNK, 64, dtype=dtype)  # exactly one chunk: one contiguous run
        got, n = engine.retrieve(tokens[:CHUNK], out=one)
        assert n == CHUNK and bits(got) == bits(kv[:, :, :CHUNK]) and general == []


def test_retrieve_into_out_falls_back_for_chunks_of_another_layout_and_drops_damaged_ones(tmp_path: Path, monkeypatch) -> None:
    tokens, kv = tokens_and_kv(5)
    with CacheEngine.from_config(disk_only(tmp_path)) as engine:
        engine.store(tokens, kv)
        keys = engine.chunk_keys(tokens)
    # Chunk 1 rewritten as a valid frame of float32 KV (another layout: read the general way,
    # then refused as a lying chunk), chunk 2 damaged in its payload (a corrupt miss).
    lying = chunk_path(str(tmp_path), keys[1])
    wide_kv = kv[:, :, CHUNK:2 * CHUNK].float()
    Path(lying).write_bytes(frame.encode(MemoryObj(keys[1], wide_kv, tuple(wide_kv.shape), torch.float32)))
    damaged = chunk_path(str(tmp_path), keys[2])
    data = bytearray(Path(damaged).read_bytes())
    data[len(data) // 2] ^= 0x10
    Path(damaged).write_bytes(bytes(data))
    with CacheEngine.from_config(disk_only(tmp_path)) as engine:
        general = count_general_reads(engine, monkeypatch)
        out = torch.zeros(2, 2, len(tokens), 64, dtype=torch.float16)
        got, n = engine.retrieve(tokens, out=out)
        assert n == CHUNK and bits(got) == bits(kv[:, :, :CHUNK])
        assert general == [lying]
        assert engine.stats()["disk"]["corrupt"] == 2
        assert not os.path.exists(lying) and not os.path.exists(damaged)

    with CacheEngine.from_config(disk_only(tmp_path)) as engine:
        engine.store(tokens, kv)  # chunk 1 again
        general = count_general_reads(engine, monkeypatch)
        wide = torch.zeros(2, 2, len(tokens), 64, dtype=torch.float16)
        # A caller's out whose tokens are not contiguous rows: nothing to read straight into.
        strided = torch.zeros(2, 2, 64, len(tokens), dtype=torch.float16).transpose(2, 3)
        got, n = engine.retrieve(tokens, out=strided)
        assert n == len(tokens) and bits(got) == bits(kv) and len(general) == 4
        got, n = engine.retrieve(tokens, out=wide)
        assert n == len(tokens) and bits(got) == bits(kv) and len(general) == 4


def test_the_cpu_tier_hashes_what_the_disk_below_writes_and_the_files_are_the_same(tmp_path: Path) -> None:
    """Over a disk tier that stores chunks as they are, the cpu tier computes each chunk's frame
    check as it copies it in and the disk writes that check: the files are the frames of the
    chunks, byte for byte. Over a disk tier that compresses, nothing is hashed ahead."""
    config = {"model": "m", "chunk_size": CHUNK, "stack": [
        {"backend": "cpu", "capacity": "16MiB"}, {"backend": "disk", "path": str(tmp_path)}]}
    tokens, kv = tokens_and_kv(6)
    with CacheEngine.from_config(config) as engine:
        assert engine.tier("cpu").backend.carry_checks
        engine.store(tokens, kv)
        assert engine.flush(30)
        keys = engine.chunk_keys(tokens)
        for i, key in enumerate(keys):
            part = kv[:, :, i * CHUNK : (i + 1) * CHUNK]
            with open(chunk_path(str(tmp_path), key), "rb") as f:
                assert f.read() == frame.encode(MemoryObj(key, part, tuple(part.shape), part.dtype))
        assert engine.stats()["disk"]["corrupt"] == 0
    compressed = {"model": "m", "chunk_size": CHUNK, "stack": [
        {"backend": "cpu", "capacity": "16MiB"}, {"backend": "disk", "path": str(tmp_path / "z"), "compressor": "lz4"}]}
    with CacheEngine.from_config(compressed) as engine:
        assert not engine.tier("cpu").backend.carry_checks
    with CacheEngine.from_config({"model": "m", "chunk_size": CHUNK, "stack": [{"backend": "cpu"}]}) as engine:
        assert not engine.tier("cpu").backend.carry_checks
