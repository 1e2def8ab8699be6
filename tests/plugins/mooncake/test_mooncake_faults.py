"""A master that is not there yet, dies or hangs: the engine goes on with its other tiers, every call is
bounded by the tier's timeout, close() returns, and work resumes when the master is back."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import torch
from kvstacks import CacheEngine
from kvstacks.testing import assert_same_obj, bits, random_key, random_kv, raw_obj
from kvstacks_mooncake import MooncakeBackend, MooncakeUnavailable

CHUNK = 16
TIMEOUT = 1.0
FAST = {"connect_timeout": TIMEOUT, "timeout": TIMEOUT, "breaker_failures": 2, "breaker_backoff": 0.2,
        "breaker_backoff_max": 0.5, "close_timeout": 2.0, "segment_bytes": "32MiB", "local_buffer_bytes": "16MiB",
        "read_buffer_bytes": "16MiB"}


def stack(master: str) -> CacheEngine:
    return CacheEngine.from_config({
        "model": f"faults-{uuid.uuid4().hex[:8]}", "chunk_size": CHUNK,
        "offload": {"retries": 1, "backoff_s": 0.01},
        "stack": [{"backend": "cpu", "capacity": "4MiB"},
                  {"backend": "mooncake", "master": master, "prefix": f"f-{uuid.uuid4().hex[:8]}:", **FAST}],
    })


def prompt(i: int) -> list[int]:
    return [i * 100 + t for t in range(2 * CHUNK)]


def kv(i: int) -> torch.Tensor:
    return random_kv(2, 2 * CHUNK, 32, torch.float16, seed=i)


def bounded(fn, *args, limit: float = TIMEOUT + 1.5):
    started = time.monotonic()
    result = fn(*args)
    took = time.monotonic() - started
    assert took < limit, f"{getattr(fn, '__name__', fn)} took {took:.2f}s with the master away (timeout {TIMEOUT}s)"
    return result


def until_in_mooncake(engine: CacheEngine, first: int, limit: float = 25.0) -> int:
    """Store fresh prompts until one reaches the mooncake tier; return its index."""
    deadline = time.monotonic() + limit
    i = first
    while time.monotonic() < deadline:
        bounded(engine.store, prompt(i), kv(i))
        engine.flush(5)
        if engine.lookup_tiers(prompt(i))["mooncake"] == 2 * CHUNK:
            return i
        i += 1
        time.sleep(0.2)
    raise AssertionError(f"nothing reached the mooncake tier within {limit}s of the master coming back")


def check_serves_from_cpu(engine: CacheEngine, i: int) -> None:
    out, n = bounded(engine.retrieve, prompt(i))
    assert n == 2 * CHUNK and bits(out) == bits(kv(i))


def test_master_down_at_start_then_comes_up(own_master):
    master = own_master(start=False)
    engine = bounded(stack, master.address, limit=TIMEOUT + 3)  # comes up without its mooncake tier
    try:
        for i in range(3):
            assert bounded(engine.store, prompt(i), kv(i)) == 2 * CHUNK
            check_serves_from_cpu(engine, i)
            assert bounded(engine.lookup, prompt(1000 + i)) == 0
        assert engine.stats()["mooncake"]["objects"] == 0
        master.start()
        i = until_in_mooncake(engine, 10)
        backend = engine.tier("mooncake").backend
        assert backend.breaker.state == "closed" and backend.store is not None
        engine.clear("cpu")  # serve it from mooncake
        out, n = engine.retrieve(prompt(i))
        assert n == 2 * CHUNK and bits(out) == bits(kv(i))
    finally:
        bounded(engine.close, limit=5)


def test_master_killed_mid_run_then_restarted(own_master):
    master = own_master()
    engine = stack(master.address)
    try:
        engine.store(prompt(0), kv(0))
        engine.flush(5)
        assert engine.lookup_tiers(prompt(0))["mooncake"] == 2 * CHUNK
        master.stop()  # SIGKILL
        for i in range(1, 6):
            assert bounded(engine.store, prompt(i), kv(i)) == 2 * CHUNK
            check_serves_from_cpu(engine, i)
            check_serves_from_cpu(engine, 0)
            assert bounded(engine.lookup, prompt(2000 + i)) == 0
        assert engine.stats()["mooncake"]["errors"] + engine.stats()["mooncake"]["dropped"] > 0
        master.start()  # same port, empty: a new master knows none of the old objects
        until_in_mooncake(engine, 10)
    finally:
        bounded(engine.close, limit=5)


async def test_hung_master_fails_calls_within_the_timeout_and_close_returns(own_master):
    master = own_master()
    b = MooncakeBackend(MooncakeBackend.Options(master=master.address, prefix="hung:", **{
        k: v if not isinstance(v, str) else {"32MiB": 32 << 20, "16MiB": 16 << 20}[v] for k, v in FAST.items()}))
    await b.start()
    key = random_key()
    obj = raw_obj(key, random_kv(seed=1))
    await b.put(key, obj)
    assert_same_obj(await b.get(key), obj, "before the pause")
    master.pause()  # SIGSTOP: connections stay open, nothing answers
    try:
        loop = asyncio.get_running_loop()
        other = random_key()
        for call in (lambda: b.contains(other), lambda: b.put(other, raw_obj(other, random_kv(seed=2))),
                     lambda: b.remove(key)):
            started = loop.time()
            with pytest.raises(MooncakeUnavailable):
                await call()
            assert loop.time() - started < TIMEOUT + 0.5
        assert b.breaker.state == "open"
        started = loop.time()
        with pytest.raises(MooncakeUnavailable, match="circuit breaker open"):
            await b.get(key)
        assert loop.time() - started < 0.05, "with the breaker open a call must not wait"
        started = loop.time()
        await b.close()
        assert loop.time() - started < b.options.close_timeout + 0.5
    finally:
        master.resume()
