"""Test backends for the engine's own logic: a dict in memory, and one that fails on demand."""

from __future__ import annotations

import asyncio
import random
import threading
from dataclasses import dataclass

import pytest
from kvstacks import hookimpl
from kvstacks.backend import Backend, InProcessBackend
from kvstacks.memory import MemoryObj
from kvstacks.plugins import load_plugins, pm


class DictBackend(InProcessBackend):
    """In-process: stores a private copy, like the CPU tier does."""

    name = "test-dict"

    def __init__(self, options=None):
        super().__init__(options)
        self.data: dict = {}
        self.lock = threading.Lock()

    def put_now(self, key, obj):
        copy = MemoryObj(key, obj.data.clone(), obj.shape, obj.dtype, obj.compressor)
        with self.lock:
            self.data[key] = copy

    def get_now(self, key):
        return self.data.get(key)

    def contains_now(self, key):
        return key in self.data

    def remove_now(self, key):
        with self.lock:
            return self.data.pop(key, None) is not None

    def keys_now(self):
        return [(k, v.nbytes) for k, v in list(self.data.items())]


STORES: dict[str, dict] = {}


class RemoteDictBackend(Backend):
    """Async, addressed by a store name so two engines can share it; can be switched off."""

    name = "test-remote"
    shared = True

    @dataclass
    class Options:
        store: str = "default"
        delay: float = 0.0
        jitter: bool = False  # each put waits a random part of ``delay``, so writes finish out of order

    def __init__(self, options=None):
        super().__init__(options)
        self.data = STORES.setdefault(self.options.store, {})
        self.down = False
        self.put_error: BaseException | None = None  # raised by every put while set
        self.puts = 0
        self.released = 0
        self._rng = random.Random(7)

    def _check(self):
        if self.down:
            raise ConnectionError("test store is down")

    async def put(self, key, obj):
        self._check()
        if self.put_error is not None:
            raise self.put_error
        await asyncio.sleep(self.options.delay * (self._rng.random() if self.options.jitter else 1))
        self.puts += 1
        self.data[key] = MemoryObj(key, obj.data.clone(), obj.shape, obj.dtype, obj.compressor)

    async def get(self, key):
        self._check()
        return self.data.get(key)

    async def contains(self, key):
        self._check()
        return key in self.data

    async def remove(self, key):
        self._check()
        return self.data.pop(key, None) is not None

    async def keys(self):
        for k, v in list(self.data.items()):
            yield k, v.nbytes

    def release_now(self, obj):
        self.released += 1


class TestBackends:
    @hookimpl
    def register_backends(self, register):
        register(DictBackend)
        register(RemoteDictBackend)


@pytest.fixture(scope="session", autouse=True)
def test_backends():
    load_plugins()
    plugin = TestBackends()
    pm.register(plugin, name="kvstacks-tests")
    yield
    pm.unregister(plugin)


@pytest.fixture
def remote_stores() -> dict[str, dict]:
    """The dicts behind ``test-remote`` tiers, by store name."""
    return STORES
