"""Conformance tests for a backend running as a tier of a real :class:`kvstacks.CacheEngine`.

The backend kit (:mod:`kvstacks.testing.backends`) checks the backend alone; this
one checks what the tier around it relies on: capacity and eviction, pins,
compressed chunks, and (for persistent stores) a restart.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from kvstacks.testing.data import bits, random_kv

CHUNK = 16
LAYERS, HIDDEN = 2, 32
#: bytes of one raw fp16 chunk of the shape above
CHUNK_BYTES = 2 * LAYERS * CHUNK * HIDDEN * 2


class TierConformance:
    """Subclass as ``TestMyTier`` and define a ``tier`` fixture: the YAML mapping of one tier.

    Leave out ``capacity``, ``eviction`` and ``compressor``: the kit sets them. The
    backend must be installed (registered through its entry point) or registered by
    your conftest. Each test uses a fresh model name, so a shared store only needs
    to keep models apart. Set ``persistent = True`` if a new engine over the same
    tier configuration must find what an earlier one stored (disk, Redis).
    """

    persistent: bool = False
    #: Compressors the round-trip test stores chunks with (names as registered): add your own.
    compressors: tuple[str, ...] = ("lz4", "zstd")
    #: For a lossy compressor among them: the largest max|decoded - original| / max|original|.
    tolerance: float = 0.0
    #: The eviction policy the capacity test runs with: set your own. With ``lru`` the test
    #: also checks which chunk went; with another, that capacity holds and every chunk kept is intact.
    eviction: str = "lru"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.persistent:  # generate only the tests that apply
            cls.test_restart_finds_stored_chunks = None  # type: ignore[assignment]

    @pytest.fixture
    def tier(self) -> dict[str, Any]:
        pytest.fail(
            f"{type(self).__name__} must define a `tier` fixture returning one tier's YAML mapping, "
            "e.g. {'backend': 'disk', 'path': str(tmp_path)} (see docs/plugin-authors.md, 'Conformance kit')",
            pytrace=False,
        )

    @pytest.fixture
    def kit_model(self) -> str:
        return f"kvstacks-kit-{uuid.uuid4().hex[:12]}"

    def config(self, tier: dict[str, Any], model: str, **tier_overrides: Any) -> dict[str, Any]:
        if not isinstance(tier, dict) or "backend" not in tier:
            pytest.fail(f"the `tier` fixture must return a mapping with a 'backend' key, got {tier!r}", pytrace=False)
        return {"model": model, "chunk_size": CHUNK, "stack": [{**tier, **tier_overrides}]}

    def engine(self, tier: dict[str, Any], model: str, **tier_overrides: Any) -> Any:
        from kvstacks import CacheEngine

        return CacheEngine.from_config(self.config(tier, model, **tier_overrides))

    @pytest.fixture
    def kit_engine(self, tier: dict[str, Any], kit_model: str) -> Iterator[Any]:
        engine = self.engine(tier, kit_model)
        try:
            yield engine
        finally:
            engine.clear()
            engine.close()

    @staticmethod
    def prompt(i: int, chunks: int = 1) -> list[int]:
        return [(i * 7919 + t) % 50_000 for t in range(CHUNK * chunks)]

    # -- tests ------------------------------------------------------------------------

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32],
                             ids=lambda d: str(d).removeprefix("torch."))
    def test_store_retrieve_is_bit_exact(self, kit_engine: Any, dtype: torch.dtype) -> None:
        tokens = self.prompt(1, 3)[:-5]  # two full chunks and a partial one
        kv = random_kv(LAYERS, len(tokens), HIDDEN, dtype, seed=1)
        kit_engine.store(tokens, kv)
        assert kit_engine.lookup(tokens) == len(tokens)
        out, n = kit_engine.retrieve(tokens)
        assert n == len(tokens) and out.dtype == dtype and bits(out) == bits(kv)

    def test_compressed_chunks_round_trip(self, tier: dict[str, Any], kit_model: str) -> None:
        from kvstacks.plugins import registry

        tokens = self.prompt(2, 2)
        kv = random_kv(LAYERS, len(tokens), HIDDEN, torch.bfloat16, seed=2)
        for compressor in self.compressors:
            engine = self.engine(tier, f"{kit_model}-{compressor}", compressor=compressor)
            try:
                engine.store(tokens, kv)
                out, n = engine.retrieve(tokens)
                assert n == len(tokens), f"{compressor}: retrieved {n} of {len(tokens)} tokens"
                if getattr(registry().get("compressors", compressor), "lossless", True):
                    assert bits(out) == bits(kv), f"{compressor} (lossless) changed the bits"
                else:
                    error = float((out.float() - kv.float()).abs().max() / kv.float().abs().max())
                    assert out.shape == kv.shape and error <= self.tolerance, (
                        f"{compressor}: relative error {error:.4f} above tolerance {self.tolerance} "
                        "(set `tolerance` on the test class for a lossy compressor)")
            finally:
                engine.clear()
                engine.close()

    def test_capacity_is_kept_by_evicting(self, tier: dict[str, Any], kit_model: str) -> None:
        engine = self.engine(tier, kit_model, capacity=5 * CHUNK_BYTES, eviction=self.eviction)
        try:
            for i in range(12):
                engine.store(self.prompt(i), random_kv(LAYERS, CHUNK, HIDDEN, torch.float16, seed=i))
            (stats,) = engine.stats().values()
            assert stats["bytes"] <= 5 * CHUNK_BYTES, f"the tier holds {stats['bytes']} bytes over its capacity"
            assert stats["objects"] == 5 and stats["evictions"] == 7, stats
            kept = [i for i in range(12) if engine.lookup(self.prompt(i)) == CHUNK]
            assert len(kept) == 5, f"{self.eviction}: lookups find chunks {kept}, expected 5"
            for i in kept:
                out, n = engine.retrieve(self.prompt(i))
                assert n == CHUNK and bits(out) == bits(random_kv(LAYERS, CHUNK, HIDDEN, torch.float16, seed=i))
            if self.eviction == "lru":
                assert kept == list(range(7, 12)), f"LRU kept {kept}, not the five most recent"
        finally:
            engine.clear()
            engine.close()

    def test_pinned_chunks_are_not_evicted(self, tier: dict[str, Any], kit_model: str) -> None:
        engine = self.engine(tier, kit_model, capacity=3 * CHUNK_BYTES)
        try:
            kv0 = random_kv(LAYERS, CHUNK, HIDDEN, torch.float16, seed=100)
            engine.store(self.prompt(0), kv0)
            assert engine.pin(self.prompt(0)) == CHUNK
            for i in range(1, 10):
                engine.store(self.prompt(i), random_kv(LAYERS, CHUNK, HIDDEN, torch.float16, seed=100 + i))
            out, n = engine.retrieve(self.prompt(0))
            assert n == CHUNK and bits(out) == bits(kv0), "a pinned chunk was evicted"
            engine.unpin(self.prompt(0))
        finally:
            engine.clear()
            engine.close()

    def test_remove_and_clear(self, kit_engine: Any) -> None:
        for i in range(3):
            kit_engine.store(self.prompt(i), random_kv(LAYERS, CHUNK, HIDDEN, torch.float16, seed=200 + i))
        assert kit_engine.remove(self.prompt(0)) == CHUNK
        assert kit_engine.lookup(self.prompt(0)) == 0 and kit_engine.lookup(self.prompt(1)) == CHUNK
        kit_engine.clear()
        assert all(kit_engine.lookup(self.prompt(i)) == 0 for i in range(3))
        (stats,) = kit_engine.stats().values()
        assert stats["objects"] == 0 and stats["bytes"] == 0

    def test_restart_finds_stored_chunks(self, tier: dict[str, Any], kit_model: str) -> None:
        tokens = self.prompt(5, 2)
        kv = random_kv(LAYERS, len(tokens), HIDDEN, torch.float16, seed=300)
        with self.engine(tier, kit_model) as first:
            first.store(tokens, kv)
        second = self.engine(tier, kit_model)
        try:
            out, n = second.retrieve(tokens)
            assert n == len(tokens) and bits(out) == bits(kv), "a new engine did not find what the last one stored"
        finally:
            second.clear()
            second.close()
