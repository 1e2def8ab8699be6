"""The redis tier under a real CacheEngine: shared between processes, and surviving Redis outages."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import redis
import torch
from kvstacks import CacheEngine, frame
from kvstacks.memory import MemoryObj
from kvstacks.testing import free_port

# Engine process A: reads "store:<seed>" / "check:<seed>" lines and answers "done <line>".
CHILD = textwrap.dedent(
    """
    import json, sys, torch
    from kvstacks import CacheEngine

    def chunk_data(seed):
        tokens = list(range(seed * 1000, seed * 1000 + 100))
        kv = torch.randn(2, 4, 100, 64, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
        return tokens, kv

    with CacheEngine.from_config(json.loads(sys.argv[1])) as engine:
        for line in sys.stdin:
            action, seed = line.strip().split(":")
            tokens, kv = chunk_data(int(seed))
            if action == "store":
                assert engine.store(tokens, kv) == 100
                assert engine.offloader.drain(60)
            else:
                assert engine.lookup_tiers(tokens) == {"cpu": 0, "redis": 100}, engine.lookup_tiers(tokens)
                out, n = engine.retrieve(tokens)
                assert n == 100, n
                assert torch.equal(out.view(torch.int16), kv.view(torch.int16)), "not bit-exact"
            print("done", line.strip(), flush=True)
    print("ok", flush=True)
    """
)


def chunk_data(seed: int) -> tuple[list[int], torch.Tensor]:
    tokens = list(range(seed * 1000, seed * 1000 + 100))
    kv = torch.randn(2, 4, 100, 64, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    return tokens, kv


def stack(url: str, prefix: str, **redis_options) -> dict:
    return {
        "model": "shared-test",
        "chunk_size": 16,
        "stack": [
            {"backend": "cpu", "capacity": "64MiB"},
            {"backend": "redis", "url": url, "prefix": prefix, "connect_timeout": 0.5, "timeout": 2.0,
             "breaker_failures": 2, "breaker_backoff": 0.2, "breaker_backoff_max": 0.5, **redis_options},
        ],
    }


def test_two_engine_processes_read_each_others_chunks(redis_server, tmp_path):
    """Process A (a child) and this process B share one Redis through two separate engines."""
    config = stack(redis_server.url, f"share-{time.time_ns()}:")
    script = tmp_path / "engine_child.py"
    script.write_text(CHILD)
    child = subprocess.Popen([sys.executable, str(script), json.dumps(config)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        child.stdin.write("store:1\n")
        child.stdin.flush()
        line = child.stdout.readline().strip()
        assert line == "done store:1", line + child.stderr.read()

        with CacheEngine.from_config(config) as engine:          # B reads what A wrote
            tokens, kv = chunk_data(1)
            assert engine.lookup_tiers(tokens) == {"cpu": 0, "redis": 100}
            out, n = engine.retrieve(tokens)
            assert n == 100 and torch.equal(out.view(torch.int16), kv.view(torch.int16))
            tokens, kv = chunk_data(2)                            # and writes for A
            engine.store(tokens, kv)
            assert engine.offloader.drain(60)

        out, err = child.communicate("check:2\n", timeout=120)   # A reads what B wrote
        assert child.returncode == 0 and "done check:2" in out and "ok" in out, out + err
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def _kv(seed: int, tokens: int = 64) -> tuple[list[int], torch.Tensor]:
    ids = list(range(seed * 1000, seed * 1000 + tokens))
    return ids, torch.randn(2, 2, tokens, 32, generator=torch.Generator().manual_seed(seed)).half()


def _redis_keys(server, prefix: str) -> int:
    return len([line for line in server.cli("--scan", "--pattern", prefix + "*").splitlines() if line])


def test_engine_keeps_working_while_redis_is_down(own_redis):
    server = own_redis()
    prefix = "outage:"
    with CacheEngine.from_config(stack(server.url, prefix)) as engine:
        t1, kv1 = _kv(1)
        engine.store(t1, kv1)
        assert engine.offloader.drain(30)
        assert _redis_keys(server, prefix) == 4

        server.stop()
        t2, kv2 = _kv(2)
        assert engine.store(t2, kv2) == 64                     # the top tier takes it; the offload fails quietly
        for tokens, kv in ((t1, kv1), (t2, kv2)):
            out, n = engine.retrieve(tokens)
            assert n == 64 and torch.equal(out, kv)
        assert engine.lookup(_kv(3)[0]) == 0                   # a miss, not an exception
        engine.remove(t1, tier="cpu")
        assert engine.retrieve(t1) == (None, 0)                # only in the dead redis: a miss
        assert engine.lookup_tiers(t1) == {"cpu": 0, "redis": 0}
        assert engine.offloader.drain(30)
        stats = engine.stats()["redis"]
        assert stats["errors"] > 0

        server.start()                                          # back, empty
        deadline = time.monotonic() + 30
        seed = 10
        while _redis_keys(server, prefix) == 0:
            assert time.monotonic() < deadline, "offloads to redis did not resume after it came back"
            tokens, kv = _kv(seed)
            engine.store(tokens, kv)
            engine.offloader.drain(30)
            seed += 1
            time.sleep(0.1)
        engine.remove(tokens, tier="cpu")
        out, n = engine.retrieve(tokens)
        assert n == 64 and torch.equal(out, kv), "a chunk stored after the outage must come back from redis"


def test_engine_starts_with_redis_down():
    config = stack(f"redis://127.0.0.1:{free_port()}/0", "absent:")
    with CacheEngine.from_config(config) as engine:
        assert engine.tiers[1].backend.breaker.state == "open"
        tokens, kv = _kv(4)
        assert engine.store(tokens, kv) == 64
        out, n = engine.retrieve(tokens)
        assert n == 64 and torch.equal(out, kv)
        assert engine.lookup_tiers(tokens) == {"cpu": 64, "redis": 0}


def test_a_lying_chunk_in_redis_is_a_counted_miss_and_removed(redis_server):
    # On main: served with 300 tokens' shape (and the backend's corrupt count never reached
    # the tier's statistic).
    prefix = f"liar-{time.time_ns()}:"
    with CacheEngine.from_config(stack(redis_server.url, prefix)) as engine:
        tokens, kv = _kv(7, 48)
        engine.store(tokens, kv)
        assert engine.flush(30)
        liar = engine.chunk_keys(tokens)[1]
        shape = (2, 2, 300, 32)
        lie = MemoryObj(liar, torch.zeros(2 * 2 * 300 * 32 * 2, dtype=torch.uint8), shape, torch.float16)
        name = f"{prefix}{liar.to_string()}"
        client = redis.Redis.from_url(redis_server.url)
        client.set(name, frame.encode(lie))
        engine.clear("cpu")
        out, n = engine.retrieve(tokens)
        assert n == 16 and torch.equal(out, kv[:, :, :16])
        assert engine.stats()["redis"]["corrupt"] == 1
        assert not client.exists(name)
        garbage = bytearray(frame.encode(MemoryObj(liar, kv[:, :, 16:32].contiguous(), (2, 2, 16, 32), torch.float16)))
        garbage[-9] ^= 0xFF  # a flipped payload byte: the checksum fails, the backend drops it
        client.set(name, bytes(garbage))
        assert engine.retrieve(tokens)[1] == 16
        assert engine.stats()["redis"]["corrupt"] == 2, "the backend's corrupt count must reach the tier's"
        client.close()
