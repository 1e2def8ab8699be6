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
eviction, pins, restart). Needs pytest and pytest-asyncio (the kit's async tests are marked, so both
``asyncio_mode = "strict"`` and ``"auto"`` work). See docs/plugin-authors.md.
"""

from kvstacks.testing.backends import BackendConformance
from kvstacks.testing.compressors import CompressorConformance
from kvstacks.testing.data import assert_same_obj, bits, random_key, random_kv, raw_obj
from kvstacks.testing.environment import free_port, in_ci, require, require_executable
from kvstacks.testing.eviction import EvictionPolicyConformance
from kvstacks.testing.stack import TierConformance

__all__ = [
    "BackendConformance", "CompressorConformance", "EvictionPolicyConformance",
    "assert_same_obj", "bits", "free_port", "in_ci", "random_key", "random_kv", "raw_obj",
    "require", "require_executable", "TierConformance",
]
