"""The engine over the real cpu and disk plugins: what a user of a two-tier stack relies on."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from kvstacks import CacheEngine
from kvstacks.errors import ConfigError
from kvstacks.testing import require

require("kvstacks_cpu")
require("kvstacks_disk")

LAYERS, HIDDEN = 4, 64


def kv_for(n, seed=0, dtype=torch.float16):
    return torch.randn(2, LAYERS, n, HIDDEN, generator=torch.Generator().manual_seed(seed)).to(dtype)


def stack(tmp_path, **top):
    return {"model": "m", "chunk_size": 64, **top, "stack": [
        {"backend": "cpu", "capacity": "64MiB"},
        {"backend": "disk", "path": str(tmp_path / "cache"), "capacity": "256MiB"},
    ]}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_disk_alone_serves_after_cpu_is_emptied_bit_exactly(tmp_path, dtype):
    tokens = list(range(200))
    kv = kv_for(200, dtype=dtype)
    with CacheEngine.from_config(stack(tmp_path)) as engine:
        engine.store(tokens, kv)
        engine.offloader.drain(10)
        engine.clear(tier="cpu")
        assert engine.lookup_tiers(tokens) == {"cpu": 0, "disk": 200}
        out, n = engine.retrieve(tokens)
        assert n == 200 and torch.equal(out.view(torch.uint8), kv.view(torch.uint8))
        assert engine.stats()["disk"]["hits"] == 4
        assert engine.lookup_tiers(tokens)["cpu"] == 200  # promoted back up


def test_a_restart_finds_everything_on_disk(tmp_path):
    with CacheEngine.from_config(stack(tmp_path)) as engine:
        for i in range(5):
            engine.store([i] * 100, kv_for(100, seed=i))
    with CacheEngine.from_config(stack(tmp_path)) as engine:
        assert engine.stats()["disk"]["objects"] == 10
        for i in range(5):
            out, n = engine.retrieve([i] * 100)
            assert n == 100 and torch.equal(out, kv_for(100, seed=i))


def test_a_corrupt_file_is_a_miss_and_is_removed(tmp_path):
    tokens = list(range(128))
    with CacheEngine.from_config(stack(tmp_path)) as engine:
        engine.store(tokens, kv_for(128))
    files = sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert len(files) == 2
    with CacheEngine.from_config(stack(tmp_path)) as engine:
        key0, key1 = engine.chunk_keys(tokens)
        victim = next(p for p in files if key1.chunk_hash.hex() in p.name)
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(data)
        out, n = engine.retrieve(tokens)
        assert n == 64 and torch.equal(out, kv_for(128)[:, :, :64])  # served up to the corrupt chunk
        assert engine.stats()["disk"]["corrupt"] == 1
        assert not victim.exists()


def test_compressed_disk_tier_round_trips(tmp_path):
    cfg = stack(tmp_path)
    cfg["stack"][1]["compressor"] = "lz4"
    tokens = list(range(256))
    with CacheEngine.from_config(cfg) as engine:
        engine.store(tokens, kv_for(256))
        engine.offloader.drain(10)
        engine.clear(tier="cpu")
        out, n = engine.retrieve(tokens)
        assert n == 256 and torch.equal(out, kv_for(256))


def test_unwritable_path_is_a_config_error_naming_the_yaml_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = stack(tmp_path)
    cfg["stack"][1]["path"] = str(blocker / "cache")
    with pytest.raises(ConfigError) as err:
        CacheEngine.from_config(cfg)
    assert str(err.value).startswith("stack[1]")


def test_yaml_stack_and_cli_bench(tmp_path):
    path = tmp_path / "stack.yaml"
    path.write_text(textwrap.dedent(f"""
        model: m
        chunk_size: 64
        stack:
          - backend: cpu
            capacity: 64MiB
          - backend: disk
            path: {tmp_path / 'cache'}
    """))
    result = subprocess.run([sys.executable, "-c", "from kvstacks.cli import main; main()", "bench", "--config", str(path),
                             "--layers", "2", "--hidden", "64", "--chunks", "4", "--repeats", "2", "--json"],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    import json
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report["tiers"]) == {"cpu", "disk"} and report["memcpy_gbps"] > 0
    assert all(row["store_gbps"] > 0 and row["retrieve_gbps"] > 0 for row in report["tiers"].values())
    assert not any((tmp_path / "cache").rglob("*.kvc"))  # the bench removed what it wrote


def test_threads_storing_and_reading_under_eviction_never_see_garbage(tmp_path):
    import threading

    cfg = stack(tmp_path)
    chunk_bytes = 2 * LAYERS * 64 * HIDDEN * 2
    cfg["stack"][0]["capacity"] = 6 * chunk_bytes  # constant eviction in the CPU tier
    errors: list[str] = []
    with CacheEngine.from_config(cfg) as engine:
        def worker(w: int) -> None:
            for i in range(30):
                p = (w * 7 + i) % 12  # prompts shared between threads
                tokens = [p] * 128
                expected = kv_for(128, seed=p)
                engine.store(tokens, expected)
                out, n = engine.retrieve(tokens)
                if n and not torch.equal(out, expected[:, :, :n]):
                    errors.append(f"worker {w} prompt {p}: wrong bytes for {n} tokens")

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors[:3]
        stats = engine.stats()
        assert stats["cpu"]["evictions"] > 0 and stats["cpu"]["bytes"] <= 6 * chunk_bytes


def test_offload_wait_mode_applies_back_pressure_and_loses_nothing(tmp_path):
    cfg = stack(tmp_path, offload={"when_full": "wait", "queue_bytes": "64KiB", "workers": 1})
    with CacheEngine.from_config(cfg) as engine:
        for i in range(20):
            engine.store([i] * 64, kv_for(64, seed=i))
        engine.offloader.drain(30)
        assert engine.stats()["disk"]["objects"] == 20
        assert engine.stats()["disk"]["dropped"] == 0


@pytest.mark.parametrize("mode", ["through", "back"])
def test_what_reaches_disk_is_what_was_stored_while_cpu_buffers_are_recycled(tmp_path, mode):
    # The offload queue holds leases on (write-through) or copies of (write-back) chunks the
    # cpu tier already evicted; their buffers are recycled, with idle buffers capped at the
    # tier's capacity, as the next stores come in. The caller reuses one staging tensor for
    # every store, as the vLLM connector does. Nothing may reach disk but the bytes stored.
    cfg = stack(tmp_path, write_mode=mode, offload={"when_full": "wait"})  # every chunk reaches disk
    chunk_bytes = 2 * LAYERS * 64 * HIDDEN * 2
    cfg["stack"][0]["capacity"] = 3 * chunk_bytes
    staging = torch.empty(2, LAYERS, 128, HIDDEN, dtype=torch.float16)
    with CacheEngine.from_config(cfg) as engine:
        backend = engine.tier("cpu").backend
        for p in range(40):
            staging.copy_(kv_for(128, seed=1000 + p))
            engine.store([p] * 128, staging)
            assert backend.pool.stats().free_bytes <= 3 * chunk_bytes, "idle buffers outgrew the tier's capacity"
        for filler in range(2):  # push the last prompts out of cpu too (write-back demotes on eviction only)
            engine.store([900 + filler] * 128, kv_for(128, seed=filler))
        assert engine.flush(30)
        assert engine.stats()["cpu"]["evictions"] > 0 and engine.stats()["disk"]["dropped"] == 0
        engine.clear(tier="cpu")
        for p in range(40):
            out, n = engine.retrieve([p] * 128, out=staging)
            expected = kv_for(128, seed=1000 + p)
            assert n == 128 and torch.equal(out.view(torch.uint8), expected.view(torch.uint8)), f"prompt {p}"
            engine.clear(tier="cpu")  # every prompt read from disk, not from its promoted copy
