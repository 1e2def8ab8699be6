"""The disk tier under the real engine: restart, promotion to cpu, corrupt files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from kvstacks import CacheEngine
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
