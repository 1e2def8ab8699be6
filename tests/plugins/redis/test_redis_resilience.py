"""A server that dies, hangs or is not there yet: calls fail fast, close() returns, work resumes."""

from __future__ import annotations

import asyncio

import pytest
from kvstacks.testing import assert_same_obj, free_port, random_key, random_kv, raw_obj
from kvstacks_redis import RedisBackend, RedisUnavailable


def backend(url: str, **options) -> RedisBackend:
    options = {"prefix": "res:", "connect_timeout": 0.5, "timeout": 1.0, "breaker_failures": 2,
               "breaker_backoff": 0.2, "breaker_backoff_max": 0.5, "close_timeout": 1.0, **options}
    return RedisBackend(RedisBackend.Options(url=url, **options))


async def until_answering(b: RedisBackend, key, limit: float = 20.0) -> None:
    """Call until the breaker lets a probe through and the server answers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while True:
        try:
            await b.contains(key)
            return
        except RedisUnavailable:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)


async def assert_fails_fast_while_open(b: RedisBackend, key, calls: int = 100) -> None:
    """With the breaker open no call reaches the network: none adds a failure."""
    assert b.breaker.state == "open"
    failures = b.breaker.failures
    b.breaker.retry_at += 3600  # keep it open for the duration of this check
    try:
        obj = raw_obj(key, random_kv(seed=0))
        attempts = (lambda: b.get(key), lambda: b.contains(key), lambda: b.put(key, obj), lambda: b.remove(key))
        for i in range(calls):
            with pytest.raises(RedisUnavailable, match="circuit breaker open"):
                await attempts[i % 4]()
        with pytest.raises(RedisUnavailable, match="circuit breaker open"):
            await b.batch_contains([key] * 8)
    finally:
        b.breaker.retry_at -= 3600
    assert b.breaker.failures == failures, "a call went to the dead server while the breaker was open"


async def test_server_killed_mid_run_then_restarted(own_redis):
    server = own_redis()
    b = backend(server.url)
    await b.start()
    key = random_key()
    obj = raw_obj(key, random_kv(seed=1))
    await b.put(key, obj)
    assert_same_obj(await b.get(key), obj, "before the kill")

    server.stop()  # SIGKILL
    for _ in range(b.options.breaker_failures):
        with pytest.raises(RedisUnavailable):
            await b.get(key)
    await assert_fails_fast_while_open(b, key)

    server.start()  # same port, empty (nothing is persisted)
    await until_answering(b, key)
    assert b.breaker.state == "closed"
    assert await b.get(key) is None
    await b.put(key, obj)
    assert_same_obj(await b.get(key), obj, "after the restart")
    assert b.breaker.opened >= 1
    await asyncio.wait_for(b.close(), 10)


async def test_server_down_at_start_then_comes_up(own_redis, caplog):
    port = free_port()
    b = backend(f"redis://127.0.0.1:{port}/0")
    await b.start()  # must not raise: the stack comes up without its redis tier
    assert b.breaker.state == "open"
    assert "unreachable at start" in caplog.text
    key = random_key()
    await assert_fails_fast_while_open(b, key)

    own_redis(port=port)
    await until_answering(b, key)
    obj = raw_obj(key, random_kv(seed=2))
    await b.batch_put([(key, obj)])
    assert_same_obj((await b.batch_get([key]))[0], obj, "once the server came up")
    await asyncio.wait_for(b.close(), 10)


async def test_hung_server_times_out_and_close_returns(own_redis):
    server = own_redis()
    b = backend(server.url, timeout=0.5)
    await b.start()
    key = random_key()
    await b.put(key, raw_obj(key, random_kv(seed=3)))
    server.pause()  # SIGSTOP: the socket stays open but nothing answers
    try:
        for _ in range(2):
            with pytest.raises(RedisUnavailable):
                await asyncio.wait_for(b.get(key), 10)
        assert b.breaker.state == "open"
        # close() is bounded by close_timeout; the outer wait_for only turns a hang into a failure
        await asyncio.wait_for(b.close(), 10)
    finally:
        server.resume()
    with pytest.raises(RedisUnavailable, match="closed"):
        await b.get(key)
    await b.close()  # twice is fine


async def test_close_with_calls_in_flight_does_not_hang(own_redis):
    server = own_redis()
    b = backend(server.url, timeout=0.5)
    await b.start()
    keys = [random_key() for _ in range(16)]
    server.pause()
    try:
        calls = [asyncio.ensure_future(b.get(k)) for k in keys]
        await asyncio.sleep(0.05)
        await asyncio.wait_for(b.close(), 10)
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
        assert all(isinstance(r, Exception) for r in results)
    finally:
        server.resume()


async def test_cluster_node_killed_then_back(own_cluster):
    b = backend(own_cluster.url, mode="cluster", breaker_backoff=0.3)
    await b.start()
    keys = [random_key() for _ in range(30)]
    objs = [raw_obj(k, random_kv(seed=i)) for i, k in enumerate(keys)]
    await b.batch_put(list(zip(keys, objs)))
    victim = own_cluster.nodes[1]
    victim.stop()  # a master with no replica: its slots are gone
    with pytest.raises(RedisUnavailable):
        for _ in range(10):  # the slot map may route some calls to live nodes first
            await asyncio.wait_for(b.batch_get(keys), 15)
    for _ in range(b.options.breaker_failures):
        try:
            await asyncio.wait_for(b.batch_contains(keys), 15)
        except RedisUnavailable:
            pass
    await assert_fails_fast_while_open(b, keys[0])

    victim.start()  # same port and nodes.conf: it rejoins with its slots (and no data)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    while True:
        try:
            present = await b.batch_contains(keys)
            break
        except RedisUnavailable:
            assert loop.time() < deadline, "the cluster tier did not resume"
            await asyncio.sleep(0.1)
    assert 0 < sum(present) < len(keys), "the restarted master's keys are gone, the others' kept"
    for key, obj, there in zip(keys, objs, present):
        if there:
            assert_same_obj(await b.get(key), obj, "a key on a surviving node")
    await b.put(keys[0], objs[0])
    assert_same_obj(await b.get(keys[0]), objs[0], "after the node came back")
    await asyncio.wait_for(b.close(), 10)


async def test_calls_queued_for_a_connection_fail_fast_once_the_breaker_opens(own_redis):
    server = own_redis()
    b = backend(server.url, pool_size=1, breaker_failures=1, timeout=0.5, breaker_backoff=60)
    await b.start()
    server.pause()
    try:
        keys = [random_key() for _ in range(10)]
        results = await asyncio.wait_for(asyncio.gather(*(b.get(k) for k in keys), return_exceptions=True), 30)
        assert all(isinstance(r, RedisUnavailable) for r in results), results
        assert b.breaker.failures == 1, "calls queued behind the hung one went to the server after the breaker opened"
        assert sum("circuit breaker open" in str(r) for r in results) == 9
    finally:
        server.resume()
    await b.close()



async def test_sentinel_failover_moves_the_tier_to_the_new_master(sentinel_with_replica):
    setup = sentinel_with_replica
    b = backend(f"redis://127.0.0.1:{setup.sentinel.port}/0", mode="sentinel", service="mymaster",
                breaker_backoff=0.2, breaker_backoff_max=0.5)
    await b.start()
    key = random_key()
    obj = raw_obj(key, random_kv(seed=11))
    await b.put(key, obj)
    setup.master.cli("WAIT", "1", "5000")  # the replica has it before the master dies
    setup.master.stop()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:  # fails (fast, once the breaker opens) until the sentinel promotes the replica
        try:
            got = await b.get(key)
            break
        except RedisUnavailable:
            assert loop.time() < deadline, "the tier never reached the promoted replica"
            await asyncio.sleep(0.1)
    assert_same_obj(got, obj, "read from the promoted replica")
    other = random_key()
    await b.put(other, obj_other := raw_obj(other, random_kv(seed=12)))
    assert_same_obj(await b.get(other), obj_other, "written to the new master")
    await asyncio.wait_for(b.close(), 10)
