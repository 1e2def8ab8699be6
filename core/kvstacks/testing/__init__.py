"""The conformance kit: tests a third-party backend, compressor or eviction policy must pass.

Subclass a ``*Conformance`` class in your test module (name it ``Test...``) and
provide one fixture::

    from kvstacks.testing import BackendConformance

    class TestMyBackend(BackendConformance):
        @pytest_asyncio.fixture
        async def backend(self, tmp_path):
            backend = MyBackend(MyBackend.Options(path=tmp_path))
            await backend.start()
            return backend          # the kit closes it

``TierConformance`` runs a backend as a tier of a real engine (capacity,
eviction, pins, restart). The kit needs pytest and pytest-asyncio (its async
tests are marked, so both ``asyncio_mode = "strict"`` and ``"auto"`` work); the
data helpers (``random_kv``, ``random_key``, ...) need neither, so benchmarks can
import them. See docs/plugin-authors.md.
"""

from kvstacks.testing.data import assert_same_obj, bits, random_key, random_kv, raw_obj

# The kit classes import pytest; load them on first use so the data helpers do not need it.
_LAZY = {
    "BackendConformance": "kvstacks.testing.backends",
    "CompressorConformance": "kvstacks.testing.compressors",
    "EvictionPolicyConformance": "kvstacks.testing.eviction",
    "TierConformance": "kvstacks.testing.stack",
    "free_port": "kvstacks.testing.environment",
    "in_ci": "kvstacks.testing.environment",
    "require": "kvstacks.testing.environment",
    "require_executable": "kvstacks.testing.environment",
    "wait_for": "kvstacks.testing.environment",
}

__all__ = ["assert_same_obj", "bits", "random_key", "random_kv", "raw_obj", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvstacks.testing' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
