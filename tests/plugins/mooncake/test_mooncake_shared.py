"""Two engine processes, each with its own segment, on one master; and what a dead segment owner takes away."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from kvstacks import CacheEngine
from kvstacks.testing import bits, random_kv

PEER = Path(__file__).with_name("peer.py")
CHUNK = 64


def prompt(seed: int, tokens: int) -> list[int]:
    return [seed * 1000 + i for i in range(tokens)]


class Peer:
    def __init__(self, master: str, prefix: str, replicas: int = 1) -> None:
        self.process = subprocess.Popen([sys.executable, str(PEER), master, prefix, str(replicas)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        text=True)
        assert self._read() == "ready"

    def _read(self) -> str:
        line = self.process.stdout.readline().strip()
        if not line:
            raise AssertionError(f"the peer process died (exit code {self.process.poll()})")
        return line

    def ask(self, command: str) -> int:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return int(self._read().split()[1])

    def kill(self) -> None:
        self.process.kill()  # by its PID: SIGKILL, no goodbye to the master
        self.process.wait(timeout=10)

    def quit(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.write("quit\n")
            self.process.stdin.flush()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def engine(master: str, prefix: str, **tier) -> CacheEngine:
    return CacheEngine.from_config({
        "model": "peer-test", "chunk_size": CHUNK,
        "stack": [{"backend": "mooncake", "master": master, "prefix": prefix, "segment_bytes": "64MiB",
                   "local_buffer_bytes": "16MiB", "read_buffer_bytes": "32MiB", "timeout": 2.0, **tier}],
    })


def test_what_one_process_stores_the_other_reads_bit_exactly(mooncake_master):
    prefix = f"shared-{uuid.uuid4().hex[:8]}:"
    peer = Peer(mooncake_master.address, prefix)
    local = engine(mooncake_master.address, prefix)
    try:
        tokens = 5 * CHUNK + 10
        assert peer.ask(f"store 7 {tokens}") == tokens
        assert local.lookup(prompt(7, tokens)) == tokens
        kv, n = local.retrieve(prompt(7, tokens))
        assert n == tokens and bits(kv) == bits(random_kv(2, tokens, 64, torch.float16, seed=7))

        local.store(prompt(8, 3 * CHUNK), random_kv(2, 3 * CHUNK, 64, torch.float16, seed=8))
        local.flush()
        assert peer.ask(f"lookup 8 {3 * CHUNK}") == 3 * CHUNK
        assert peer.ask(f"lookup 9 {CHUNK}") == 0
    finally:
        peer.quit()  # killed, its segment would stay listed for client_ttl and fail the puts placed there
        local.clear()
        local.close()


def test_a_prefix_lookup_is_one_round_trip(mooncake_master):
    local = engine(mooncake_master.address, f"rt-{uuid.uuid4().hex[:8]}:")
    try:
        tokens = 16 * CHUNK
        local.store(prompt(3, tokens), random_kv(2, tokens, 64, torch.float16, seed=3))
        backend = local.tiers[0].backend
        calls: list[str] = []
        real = backend.store

        class Counting:
            def __getattr__(self, name):
                calls.append(name)
                return getattr(real, name)

        backend.store = Counting()
        try:
            assert local.lookup(prompt(3, tokens)) == tokens
            assert local.lookup(prompt(3, tokens) + prompt(4, 4 * CHUNK)) == tokens
        finally:
            backend.store = real
        assert calls == ["batch_is_exist", "batch_is_exist"], calls
    finally:
        local.clear()
        local.close()


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_dead_segment_owner_takes_its_replicas_with_it(own_master, replicas):
    """Chunks whose only copy sat in the killed process's segment become misses (never errors, never
    garbage) and the master forgets them after client_ttl; with two replicas every chunk survives."""
    master = own_master("--client_ttl=2")
    prefix = f"dead-{uuid.uuid4().hex[:8]}:"
    local = engine(master.address, prefix, replica_num=replicas)
    peer = Peer(master.address, prefix, replicas)
    try:
        seeds = range(20, 36)
        for seed in seeds:
            assert peer.ask(f"store {seed} {CHUNK}") == CHUNK
        peer.kill()
        deadline = time.monotonic() + 15
        while True:
            served = 0
            for seed in seeds:
                started = time.monotonic()
                kv, n = local.retrieve(prompt(seed, CHUNK))
                assert time.monotonic() - started < 2.0 + 1.0, "a read from a dead segment outlived the timeout"
                if n:
                    assert bits(kv) == bits(random_kv(2, CHUNK, 64, torch.float16, seed=seed))
                    served += 1
            present = sum(local.lookup(prompt(seed, CHUNK)) == CHUNK for seed in seeds)
            if present == served or time.monotonic() > deadline:
                break
            time.sleep(0.5)  # the master drops the dead client's objects after client_ttl
        assert present == served, "the master still lists chunks nobody can read"
        if replicas == 2:
            assert served == len(seeds), f"with two replicas only {served} of {len(seeds)} chunks survived"
        else:
            assert served < len(seeds), "every chunk survived: none was placed in the dead process's segment"
    finally:
        if peer.process.poll() is None:
            peer.kill()
        local.close()
