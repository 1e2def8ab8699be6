"""The conformance kit itself: it passes a correct implementation and catches broken ones."""

from __future__ import annotations

import socket
import threading
import zlib
from collections import OrderedDict

import pytest
import pytest_asyncio
import torch
from kvstacks import hookimpl
from kvstacks.backend import InProcessBackend
from kvstacks.compression import Compressor
from kvstacks.errors import CorruptChunk
from kvstacks.eviction import EvictionPolicy
from kvstacks.frame import decode, encode
from kvstacks.plugins import pm
from kvstacks.testing import (
    BackendConformance,
    CompressorConformance,
    EvictionPolicyConformance,
    TierConformance,
    free_port,
    random_kv,
    require,
)

pytest_plugins = ["pytester"]


class DictBackend(InProcessBackend):
    """A reference backend: frames in a dict under a lock."""

    name = "kit-dict"

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.frames: dict = {}
        self.lock = threading.Lock()

    def put_now(self, key, obj):
        data = encode(obj)
        with self.lock:
            self.frames[key] = data

    def get_now(self, key):
        with self.lock:
            data = self.frames.get(key)
        if data is None:
            return None
        try:
            return decode(data, expect_key=key)
        except CorruptChunk:
            with self.lock:
                self.frames.pop(key, None)
            return None

    def contains_now(self, key):
        with self.lock:
            return key in self.frames

    def remove_now(self, key):
        with self.lock:
            return self.frames.pop(key, None) is not None

    def keys_now(self):
        with self.lock:
            return [(k, len(v)) for k, v in self.frames.items()]


class TestDictBackend(BackendConformance):
    in_process = True
    large_object_bytes = 1 << 20

    @pytest_asyncio.fixture
    async def backend(self):
        backend = DictBackend()
        await backend.start()
        return backend

    def corrupt(self, backend, key):
        data = bytearray(backend.frames[key])
        data[len(data) // 2] ^= 0xFF
        backend.frames[key] = bytes(data)


class ZlibCompressor(Compressor):
    """A reference lossless compressor with a length check."""

    name = "kit-zlib"

    def compress(self, kv):
        return zlib.compress(kv.contiguous().view(torch.uint8).numpy().tobytes(), 1)

    def decompress(self, payload, shape, dtype):
        try:
            raw = zlib.decompress(payload)
        except zlib.error as exc:
            raise CorruptChunk(f"zlib: {exc}") from exc
        t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
        expected = torch.empty(shape, dtype=dtype)
        if t.numel() != expected.numel() * expected.element_size():
            raise CorruptChunk("wrong length")
        return t.view(dtype).view(shape)


class TestZlibCompressor(CompressorConformance):
    @pytest.fixture
    def compressor(self):
        return ZlibCompressor()


class HalfPrecisionCompressor(ZlibCompressor):
    """A reference lossy compressor: stores fp16."""

    name = "kit-half"
    lossless = False

    def compress(self, kv):
        return super().compress(kv.to(torch.float16))

    def decompress(self, payload, shape, dtype):
        return super().decompress(payload, shape, torch.float16).to(dtype)


class TestLossyCompressor(CompressorConformance):
    tolerance = 0.01

    @pytest.fixture
    def compressor(self):
        return HalfPrecisionCompressor()


class OrderedFifo(EvictionPolicy):
    """A reference policy. (A plain dict with next(iter()) would be quadratic: deleted slots are rescanned.)"""

    name = "kit-ordered-fifo"

    def __init__(self, options=None):
        super().__init__(options)
        self.order: OrderedDict = OrderedDict()

    def insert(self, key, size):
        self.order.setdefault(key, size)

    def access(self, key):
        pass

    def remove(self, key):
        self.order.pop(key, None)

    def pop_victim(self):
        if not self.order:
            return None
        return self.order.popitem(last=False)[0]

    def __len__(self):
        return len(self.order)

    def __contains__(self, key):
        return key in self.order


class TestReferencePolicy(EvictionPolicyConformance):
    @pytest.fixture
    def policy(self):
        return OrderedFifo()


# -- the helpers ------------------------------------------------------------------------


def test_free_port_is_bindable():
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_require_returns_module():
    assert require("zlib") is zlib


def test_require_skips_outside_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require("kvstacks_no_such_module_xyz")


def test_require_fails_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require("kvstacks_no_such_module_xyz", hint="pip install nothing")


def test_random_kv_is_deterministic_and_shaped():
    a = random_kv(3, 20, 48, torch.bfloat16, seed=5)
    assert a.shape == (2, 3, 20, 48) and a.dtype == torch.bfloat16 and a.is_contiguous()
    assert torch.equal(a, random_kv(3, 20, 48, torch.bfloat16, seed=5))
    assert not torch.equal(a, random_kv(3, 20, 48, torch.bfloat16, seed=6))
    assert torch.isfinite(a.float()).all()


# -- the kit catches broken implementations ------------------------------------------------

BROKEN = {
    "backend_loses_dtype": """
import pytest, pytest_asyncio, torch
from kvstacks.backend import InProcessBackend
from kvstacks.memory import MemoryObj
from kvstacks.testing import BackendConformance

class Lossy(InProcessBackend):
    name = "lossy"
    def __init__(self, o=None):
        super().__init__(o); self.d = {}
    def put_now(self, k, obj):
        data = obj.data.float() if obj.compressor == "none" else obj.data
        self.d[k] = MemoryObj(k, data.to(torch.float16) if obj.compressor == "none" else data, obj.shape, torch.float16 if obj.compressor == "none" else obj.dtype, obj.compressor)
    def get_now(self, k): return self.d.get(k)
    def contains_now(self, k): return k in self.d
    def remove_now(self, k): return self.d.pop(k, None) is not None
    def keys_now(self): return [(k, v.nbytes) for k, v in self.d.items()]

class TestLossy(BackendConformance):
    in_process = True
    large_object_bytes = 1 << 16
    @pytest_asyncio.fixture
    async def backend(self):
        return Lossy()
""",
    "compressor_raises_valueerror": """
import pytest, torch
from kvstacks.compression import Compressor
from kvstacks.testing import CompressorConformance

class Raw(Compressor):
    name = "raw-bad"
    def compress(self, kv): return kv.contiguous().view(torch.uint8).numpy().tobytes()
    def decompress(self, payload, shape, dtype):
        return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype).view(shape)

class TestRaw(CompressorConformance):
    @pytest.fixture
    def compressor(self): return Raw()
""",
    "policy_pops_removed_keys": """
import pytest
from kvstacks.eviction import EvictionPolicy
from kvstacks.testing import EvictionPolicyConformance

class Sticky(EvictionPolicy):
    name = "sticky"
    def __init__(self, o=None):
        super().__init__(o); self.q = []
    def insert(self, k, s): self.q.append(k)
    def access(self, k): pass
    def remove(self, k): pass
    def pop_victim(self): return self.q.pop(0) if self.q else None
    def __len__(self): return len(self.q)
    def __contains__(self, k): return k in self.q

class TestSticky(EvictionPolicyConformance):
    large_n = 1000
    @pytest.fixture
    def policy(self): return Sticky()
""",
    "tier_backend_drops_writes": """
import pytest
from kvstacks import hookimpl
from kvstacks.backend import InProcessBackend
from kvstacks.plugins import load_plugins, pm
from kvstacks.testing import TierConformance

class Forgetful(InProcessBackend):
    name = "kit-forgetful"
    def put_now(self, k, obj): pass
    def get_now(self, k): return None
    def contains_now(self, k): return False
    def remove_now(self, k): return False
    def keys_now(self): return []

class Plugin:
    @hookimpl
    def register_backends(self, register):
        register(Forgetful)

load_plugins()
pm.register(Plugin(), name="kit-forgetful-plugin")

class TestForgetful(TierConformance):
    @pytest.fixture
    def tier(self):
        return {"backend": "kit-forgetful"}
""",
}


def test_kit_fails_broken_implementations(pytester):
    # One subprocess for every case: starting Python with torch is the slow part.
    pytester.makepyfile(**{f"test_{case}": source for case, source in BROKEN.items()})
    pytester.makepyfile(test_missing_fixture="""
from kvstacks.testing import EvictionPolicyConformance
class TestNothing(EvictionPolicyConformance):
    pass
""")
    pytester.makepyfile(test_plain_async_fixture="""
import pytest
from kvstacks.testing import BackendConformance
from kvstacks_cpu.backend import CpuBackend
class TestPlainAsync(BackendConformance):
    in_process = True
    @pytest.fixture
    async def backend(self):
        return CpuBackend()
""")
    result = pytester.runpytest_subprocess("-q", "-rfE", "-p", "no:cacheprovider", "-o", "asyncio_mode=strict")
    out = result.stdout.str()
    assert "decorate it with @pytest_asyncio.fixture (import pytest_asyncio)" in out
    for case in BROKEN:
        assert f"FAILED test_{case}.py::" in out, f"the kit did not catch {case}:\n{out[-3000:]}"
    assert "must define a `policy` fixture" in out
    # The broken backend keeps bytes intact for compressed objects, so not every test fails:
    # the kit pinpoints what is wrong instead of failing wholesale.
    assert "passed" in out


class TestDictTier(TierConformance):
    """The engine-level kit over the conftest's in-memory backend."""

    @pytest.fixture
    def tier(self):
        return {"backend": "test-dict"}


class ScanningLFU(EvictionPolicy):
    """O(n) pop_victim written as a Python loop: the cost test must catch it."""

    name = "kit-scanning-lfu"

    def __init__(self, options=None):
        super().__init__(options)
        self.counts: dict = {}

    def insert(self, key, size):
        self.counts.setdefault(key, 0)

    def access(self, key):
        if key in self.counts:
            self.counts[key] += 1

    def remove(self, key):
        self.counts.pop(key, None)

    def pop_victim(self):
        best = None
        for key, count in self.counts.items():
            if best is None or count < self.counts[best]:
                best = key
        if best is not None:
            del self.counts[best]
        return best

    def __len__(self):
        return len(self.counts)

    def __contains__(self, key):
        return key in self.counts


def test_cost_check_catches_a_scanning_policy():
    kit = EvictionPolicyConformance()
    with pytest.raises(AssertionError, match="not O\\(1\\)"):
        kit.test_cost_per_operation_does_not_grow(ScanningLFU())
    kit.test_cost_per_operation_does_not_grow(OrderedFifo())  # and passes an O(1) one


class ListLRU(EvictionPolicy):
    """O(n) in C only (``key in list``, ``list.pop(0)``): invisible to the step count, caught by the scaling test."""

    name = "kit-list-lru"

    def __init__(self, options=None):
        super().__init__(options)
        self.order: list = []

    def insert(self, key, size):
        if key not in self.order:
            self.order.append(key)

    def access(self, key):
        if key in self.order:
            self.order.remove(key)
            self.order.append(key)

    def remove(self, key):
        if key in self.order:
            self.order.remove(key)

    def pop_victim(self):
        return self.order.pop(0) if self.order else None

    def __len__(self):
        return len(self.order)

    def __contains__(self, key):
        return key in self.order


def test_scaling_check_catches_a_linear_policy_within_seconds():
    import time

    kit = EvictionPolicyConformance()
    started = time.perf_counter()
    with pytest.raises((AssertionError, pytest.fail.Exception), match="not O\\(1\\)"):
        kit.test_time_per_operation_does_not_grow_with_size(ListLRU())
    assert time.perf_counter() - started < 20
    kit.test_time_per_operation_does_not_grow_with_size(OrderedFifo())  # and passes an O(1) one


class CountingFifo(OrderedFifo):
    name = "kit-counting-fifo"
    victims = 0

    def pop_victim(self):
        victim = super().pop_victim()
        if victim is not None:
            type(self).victims += 1
        return victim


class CountingZlib(ZlibCompressor):
    name = "kit-counting-zlib"
    encoded = 0

    def compress(self, kv):
        type(self).encoded += 1
        return super().compress(kv)


class OwnPolicyAndCompressor:
    @hookimpl
    def register_eviction_policies(self, register):
        register(CountingFifo)

    @hookimpl
    def register_compressors(self, register):
        register(CountingZlib)


def test_tier_kit_runs_with_the_plugins_own_policy_and_compressor():
    class TestOwn(TierConformance):
        eviction = "kit-counting-fifo"
        compressors = ("kit-counting-zlib",)

    plugin = OwnPolicyAndCompressor()
    pm.register(plugin, name="kit-own")
    try:
        kit = TestOwn()
        kit.test_capacity_is_kept_by_evicting({"backend": "test-dict"}, "kit-own-1")
        kit.test_compressed_chunks_round_trip({"backend": "test-dict"}, "kit-own-2")
    finally:
        pm.unregister(plugin)
    assert CountingFifo.victims == 7
    assert CountingZlib.encoded >= 2
