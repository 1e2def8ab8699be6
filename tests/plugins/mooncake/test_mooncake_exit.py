"""A process whose Mooncake master went away ends at once, with its own exit status.

Mooncake tears its clients down at exit; against a dead master that retried for 5-15 s a
client (a test session holding a few hung for minutes). The child process here is an engine with
a mooncake tier, closed (its client kept for reuse) or still open; the master is killed while the
child waits, long enough for the client's heartbeat to notice, then the child is told to exit.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
from kvstacks_mooncake import MooncakeBackend

CHILD = textwrap.dedent("""
    import sys
    import torch
    from kvstacks import CacheEngine
    from kvstacks.testing import random_kv

    master, how, status = sys.argv[1], sys.argv[2], int(sys.argv[3])
    tier = {"backend": "mooncake", "master": master, "prefix": sys.argv[4], "segment_bytes": "32MiB",
            "local_buffer_bytes": "16MiB", "read_buffer_bytes": "16MiB", "timeout": 2.0}
    if how == "cpu":  # the baseline: the same process without Mooncake
        tier = {"backend": "cpu", "capacity": "16MiB"}
    engine = CacheEngine.from_config({"model": "exit-test", "chunk_size": 16, "stack": [tier]})
    tokens = list(range(32))
    engine.store(tokens, random_kv(2, 32, 32, torch.float16, seed=1))
    engine.flush()
    assert engine.lookup(tokens) == 32, "the chunk did not reach the tier"
    if how == "closed":
        engine.close()  # keep_client (default): the client stays, for the next tier of this process
    print("ready", flush=True)
    print(" ".join(getattr(engine.tier(tier["backend"]).backend, "_sizes", ())), flush=True)  # Mooncake keys
    sys.stdin.readline()
    print("bye", flush=True)
    sys.exit(status)
""")

#: the master is gone this long before the child exits: the client's heartbeat has failed and retries
GONE_FOR = 3.0
#: "at once": within this of the same process's exit without Mooncake (Mooncake's teardown against a
#: dead master took 5-15 s more; Python's own exit took 1.5-4 s here with load averages of 15-22)
MARGIN = 5.0


def start_child(address: str, how: str, status: int, prefix: str) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", CHILD, address, how, str(status), prefix],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "GLOG_minloglevel": "3"})  # little on stderr: a full pipe would block it
    line = child.stdout.readline().strip()
    if line != "ready":
        child.kill()
        _, err = child.communicate(timeout=30)
        raise AssertionError(f"the child did not start (exit code {child.returncode}): {err[-2000:]}")
    return child


def exit_time(child: subprocess.Popen) -> float:
    started = time.monotonic()
    child.stdin.write("\n")
    child.stdin.flush()
    try:
        child.wait(timeout=120)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        raise
    return time.monotonic() - started


@pytest.fixture(scope="module")
def baseline_exit() -> float:
    """How long the same child takes to exit with a cpu tier only, on this machine now."""
    child = start_child("", "cpu", 0, "")
    time.sleep(GONE_FOR)
    took = exit_time(child)
    assert child.returncode == 0
    return took


@pytest.mark.parametrize("how, status", [("closed", 0), ("open", 3)])
def test_exit_is_prompt_when_the_master_is_gone(own_master, baseline_exit, how, status):
    master = own_master()
    child = start_child(master.address, how, status, f"exit-{uuid.uuid4().hex[:8]}:")
    master.stop()
    time.sleep(GONE_FOR)
    took = exit_time(child)
    out, err = child.communicate(timeout=10)
    assert out.rstrip().endswith("bye")  # what Python printed before exiting is all there
    assert child.returncode == status, err[-2000:]  # the process's own exit status, not Mooncake's
    assert took < baseline_exit + MARGIN, (f"the child took {took:.1f}s to exit with its master gone ({how} tier), "
                                           f"{baseline_exit:.1f}s without Mooncake")


def test_exit_with_the_master_up_unmounts_the_segment(own_master):
    """A kept client whose master answers is torn down at exit: the master forgets its segment at once
    (not after its client_ttl), and with it the chunk that lived there."""
    master = own_master()
    child = start_child(master.address, "closed", 0, f"exit-{uuid.uuid4().hex[:8]}:")
    names = child.stdout.readline().split()
    assert names, "the child named no chunk"
    took = exit_time(child)
    assert child.returncode == 0, child.communicate(timeout=10)[1][-2000:]
    assert took < 30

    async def present() -> list[bool]:
        tier = MooncakeBackend(MooncakeBackend.Options(master=master.address, segment_bytes=0, keep_client=False,
                                                       read_buffer_bytes=16 << 20))
        await tier.start()
        try:
            return await tier._call("lookup", tier._exist_blocking, names)
        finally:
            await tier.close()

    assert asyncio.run(present()) == [False] * len(names)
