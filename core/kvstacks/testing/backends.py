"""Conformance tests for tier backends (:class:`kvstacks.backend.Backend`)."""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch

try:
    import pytest_asyncio
except ImportError as exc:  # the backend kit's tests are coroutines
    raise ImportError("kvstacks.testing.BackendConformance needs pytest-asyncio: pip install pytest-asyncio") from exc

from kvstacks import frame
from kvstacks.backend import Backend, InProcessBackend
from kvstacks.frame import frame_size
from kvstacks.keys import CacheKey
from kvstacks.memory import MemoryObj
from kvstacks.testing.data import assert_same_obj, opaque_compressed_obj, random_key, random_kv, raw_obj

KV_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _detach(backend: Backend, obj: MemoryObj | None) -> MemoryObj | None:
    """A private copy of a fetched object; ends an in-process backend's lease on it."""
    if obj is None or not isinstance(backend, InProcessBackend):
        return obj
    copy = MemoryObj(obj.key, obj.data.clone(), obj.shape, obj.dtype, obj.compressor)
    backend.release_now(obj)
    return copy


async def _get(backend: Backend, key: CacheKey) -> MemoryObj | None:
    return _detach(backend, await backend.get(key))


async def _batch_get(backend: Backend, keys: list[CacheKey]) -> list[MemoryObj | None]:
    return [_detach(backend, obj) for obj in await backend.batch_get(keys)]


async def _listed(backend: Backend) -> dict[CacheKey, int]:
    return {key: size async for key, size in backend.keys()}


ASYNC_FIXTURE_HINT = (
    "the `backend` fixture is an async function pytest did not run: decorate it with "
    "@pytest_asyncio.fixture (import pytest_asyncio), or set asyncio_mode = \"auto\" in your pytest configuration"
)


class BackendConformance:
    """Subclass as ``TestMyBackend`` and define a ``backend`` fixture returning a *started* backend.

    The kit closes the backend after each test (so ``close`` must tolerate a second
    call if your fixture closes it too). Each test uses fresh random keys, so a
    shared store (Redis, Mooncake) may hold other data, but the backend must only
    list and clear what it wrote itself.

    Optional: define ``corrupt(self, backend, key)`` (sync or async) that damages the
    stored bytes of ``key``; the kit then checks that a corrupt chunk is a miss. Set
    ``in_process = True`` for an ``InProcessBackend`` (the kit checks you did), and
    ``frames = True`` for a backend that stores ``kvstacks.frame`` frames (the kit then
    checks that it sends the check an object carries, ``MemoryObj.check``).
    """

    #: set True for an InProcessBackend: adds the thread and lease tests of its sync ``*_now`` methods
    in_process: bool = False
    #: set True if the backend stores kvstacks frames: a stale carried check must then be a miss
    frames: bool = False
    #: objects written at once by the concurrency tests
    concurrency: int = 64
    #: size of the one large object the kit stores (a 2x32x256x1024 fp16 chunk is 32 MiB)
    large_object_bytes: int = 8 << 20
    #: how much more than ``obj.nbytes`` ``keys()`` may report for one object (frame header, alignment)
    size_overhead_bytes: int = 64 << 10

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Generate only the tests that apply, so a run never shows a skip for a test that could not apply.
        super().__init_subclass__(**kwargs)
        if getattr(cls, "corrupt", None) is None:
            cls.test_corrupt_chunk_is_a_miss = None  # type: ignore[assignment]
        if not cls.in_process:
            cls.test_threads_on_in_process_backend = None  # type: ignore[assignment]
            cls.test_leased_object_survives_removal_and_reuse = None  # type: ignore[assignment]

    @pytest.fixture
    def backend(self) -> Backend:
        pytest.fail(
            f"{type(self).__name__} must define a `backend` fixture that returns a started Backend "
            "(see docs/plugin-authors.md, 'Conformance kit')",
            pytrace=False,
        )

    @pytest.fixture
    def kit_backend_value(self, request: pytest.FixtureRequest) -> Any:
        """The ``backend`` fixture's value, asked for here so a plain async fixture gets the fix named.

        pytest refuses an ``async def`` fixture no plugin handles with its own
        message; in strict mode that is what a missing ``@pytest_asyncio.fixture`` gives.
        """
        try:
            backend = request.getfixturevalue("backend")
        except pytest.fail.Exception as exc:
            if "async fixture" not in str(exc):
                raise
            backend = None
        if backend is None or inspect.iscoroutine(backend) or inspect.isasyncgen(backend):
            if inspect.iscoroutine(backend):
                backend.close()  # never awaited: say nothing more about it
            pytest.fail(ASYNC_FIXTURE_HINT, pytrace=False)
        return backend

    @pytest_asyncio.fixture
    async def kit_backend(self, kit_backend_value: Any) -> AsyncIterator[Backend]:
        backend = kit_backend_value
        if not isinstance(backend, Backend):
            pytest.fail(f"the `backend` fixture returned {type(backend).__name__}, not a kvstacks Backend",
                        pytrace=False)
        if isinstance(backend, InProcessBackend) != self.in_process:
            pytest.fail(f"{type(backend).__name__} {'is' if isinstance(backend, InProcessBackend) else 'is not'} an "
                        f"InProcessBackend: set in_process = {isinstance(backend, InProcessBackend)} on "
                        f"{type(self).__name__}", pytrace=False)
        try:
            yield backend
        finally:
            await backend.close()

    # -- single objects ---------------------------------------------------------------

    @pytest.mark.asyncio
    @pytest.mark.parametrize("dtype", KV_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
    async def test_put_get_round_trip_is_bit_exact(self, kit_backend: Backend, dtype: torch.dtype) -> None:
        key = random_key()
        obj = raw_obj(key, random_kv(2, 16, 64, dtype, seed=1))
        expected = raw_obj(key, obj.data.clone())
        await kit_backend.put(key, obj)
        assert_same_obj(await _get(kit_backend, key), expected, f"{dtype} round trip")

    @pytest.mark.asyncio
    async def test_special_float_values_survive(self, kit_backend: Backend) -> None:
        key = random_key()
        kv = random_kv(1, 8, 16, torch.float16, seed=2)
        kv.view(-1)[:6] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 6e-8, 65504.0])
        obj = raw_obj(key, kv)
        await kit_backend.put(key, obj)
        assert_same_obj(await _get(kit_backend, key), raw_obj(key, kv.clone()), "NaN, inf, -0.0, subnormal")

    @pytest.mark.asyncio
    async def test_compressed_payload_round_trip(self, kit_backend: Backend) -> None:
        key = random_key()
        obj = opaque_compressed_obj(key)
        expected = MemoryObj(key, obj.data.clone(), obj.shape, obj.dtype, obj.compressor)
        await kit_backend.put(key, obj)
        assert_same_obj(await _get(kit_backend, key), expected, "compressed (uint8 payload) object")

    @pytest.mark.asyncio
    async def test_large_object_round_trip(self, kit_backend: Backend) -> None:
        key = random_key()
        hidden = 1024
        tokens = max(1, self.large_object_bytes // (2 * 2 * 2 * hidden))
        obj = raw_obj(key, random_kv(2, tokens, hidden, torch.float16, seed=3))
        await kit_backend.put(key, obj)
        assert_same_obj(await _get(kit_backend, key), obj, f"{obj.nbytes} byte object")

    @pytest.mark.asyncio
    async def test_missing_key(self, kit_backend: Backend) -> None:
        key = random_key()
        assert await _get(kit_backend, key) is None
        assert await kit_backend.contains(key) is False
        assert await kit_backend.remove(key) is False

    @pytest.mark.asyncio
    async def test_contains(self, kit_backend: Backend) -> None:
        key, other = random_key(), random_key()
        await kit_backend.put(key, raw_obj(key, random_kv(seed=4)))
        assert await kit_backend.contains(key) is True
        assert await kit_backend.contains(other) is False

    @pytest.mark.asyncio
    async def test_remove_returns_whether_present(self, kit_backend: Backend) -> None:
        key, kept = random_key(), random_key()
        await kit_backend.put(key, raw_obj(key, random_kv(seed=5)))
        await kit_backend.put(kept, raw_obj(kept, random_kv(seed=6)))
        assert await kit_backend.remove(key) is True
        assert await _get(kit_backend, key) is None
        assert await kit_backend.contains(key) is False
        assert await kit_backend.remove(key) is False
        assert await kit_backend.contains(kept) is True, "remove() took another key with it"

    @pytest.mark.asyncio
    async def test_overwrite_same_key(self, kit_backend: Backend) -> None:
        key = random_key()
        await kit_backend.put(key, raw_obj(key, random_kv(2, 16, 64, torch.float16, seed=7)))
        # A different shape, dtype and compressor: nothing of the first object may remain.
        second = opaque_compressed_obj(key, payload_len=777, seed=8)
        await kit_backend.put(key, second)
        assert_same_obj(await _get(kit_backend, key), second, "after overwrite")
        third = raw_obj(key, random_kv(1, 4, 32, torch.float32, seed=9))
        await kit_backend.put(key, third)
        assert_same_obj(await _get(kit_backend, key), third, "after second overwrite")

    @pytest.mark.asyncio
    async def test_keys_differing_only_in_rank_or_model_are_distinct(self, kit_backend: Backend) -> None:
        base = random_key()
        variants = [
            base,
            CacheKey(base.model, base.kv_format, 2, 1, base.chunk_hash),
            CacheKey(base.model + "-other", base.kv_format, base.world_size, base.rank, base.chunk_hash),
        ]
        objs = [raw_obj(k, random_kv(seed=10 + i)) for i, k in enumerate(variants)]
        for key, obj in zip(variants, objs):
            await kit_backend.put(key, obj)
        for key, obj in zip(variants, objs):
            assert_same_obj(await _get(kit_backend, key), obj, f"key {key}")

    # -- listing and clearing ---------------------------------------------------------

    @pytest.mark.asyncio
    async def test_keys_lists_every_object_with_its_size(self, kit_backend: Backend) -> None:
        objs = {}
        for i in range(5):
            key = random_key()
            objs[key] = raw_obj(key, random_kv(1, 8 + i, 32, torch.float16, seed=20 + i))
        key = random_key()
        objs[key] = opaque_compressed_obj(key, payload_len=1234)
        for key, obj in objs.items():
            await kit_backend.put(key, obj)
        removed = next(iter(objs))
        await kit_backend.remove(removed)
        listed = await _listed(kit_backend)
        assert removed not in listed, "keys() lists a removed key"
        for key, obj in objs.items():
            if key is removed:
                continue
            assert key in listed, f"keys() does not list {key}"
            size = listed[key]
            assert isinstance(size, int), f"keys() must yield (CacheKey, int), got size {size!r}"
            assert obj.nbytes <= size <= frame_size(obj) + self.size_overhead_bytes, (
                f"keys() says {key} takes {size} bytes; the object holds {obj.nbytes} payload bytes "
                f"(frame {frame_size(obj)})"
            )

    @pytest.mark.asyncio
    async def test_clear_removes_what_it_wrote(self, kit_backend: Backend) -> None:
        keys = [random_key() for _ in range(6)]
        for i, key in enumerate(keys):
            await kit_backend.put(key, raw_obj(key, random_kv(seed=30 + i)))
        await kit_backend.clear()
        for key in keys:
            assert await kit_backend.contains(key) is False, f"{key} survived clear()"
            assert await _get(kit_backend, key) is None
        listed = await _listed(kit_backend)
        assert not set(keys) & set(listed), "keys() still lists cleared keys"
        # Still usable afterwards.
        key = random_key()
        obj = raw_obj(key, random_kv(seed=40))
        await kit_backend.put(key, obj)
        assert_same_obj(await _get(kit_backend, key), obj, "put after clear")

    # -- batches ----------------------------------------------------------------------

    @pytest.mark.asyncio
    async def test_batches_preserve_order_and_report_misses(self, kit_backend: Backend) -> None:
        present = [random_key() for _ in range(5)]
        objs = {key: raw_obj(key, random_kv(1, 4, 16, torch.bfloat16, seed=50 + i)) for i, key in enumerate(present)}
        await kit_backend.batch_put(list(objs.items()))
        missing = [random_key() for _ in range(3)]
        order = [missing[0], present[3], present[0], missing[1], present[4], present[1], present[2], missing[2]]
        got = await _batch_get(kit_backend, order)
        assert len(got) == len(order), f"batch_get returned {len(got)} results for {len(order)} keys"
        for key, obj in zip(order, got):
            if key in objs:
                assert_same_obj(obj, objs[key], f"batch_get position of {key}")
            else:
                assert obj is None, "batch_get must return None for a missing key"
        flags = await kit_backend.batch_contains(order)
        assert list(flags) == [key in objs for key in order]
        assert all(type(flag) is bool for flag in flags), "batch_contains must return bools"

    @pytest.mark.asyncio
    async def test_batch_get_into_gives_the_stored_bytes_placed_or_not(self, kit_backend: Backend) -> None:
        # The engine hands each chunk's place in the caller's out (a strided slice); a backend
        # may read straight there (data is the place) or return its own object, never other bytes.
        keys = [random_key() for _ in range(3)]
        kv = random_kv(2, 3 * 8, 32, torch.float16, seed=65)
        objs = [raw_obj(k, kv[:, :, 8 * i:8 * (i + 1)].clone()) for i, k in enumerate(keys)]
        await kit_backend.batch_put(list(zip(keys, objs)))
        out = torch.zeros(2, 2, 3 * 8 + 8, 32, dtype=torch.float16)
        order = [keys[0], random_key(), keys[2]]
        places = [out[:, :, 0:8], out[:, :, 8:16], out[:, :, 16:24]]
        got = await kit_backend.batch_get_into(order, places)
        assert len(got) == 3 and got[1] is None, "batch_get_into must return None for a missing key"
        for obj, expected, place in ((got[0], objs[0], places[0]), (got[2], objs[2], places[2])):
            assert obj is not None
            if obj.data is place:
                assert_same_obj(MemoryObj(obj.key, place.clone(), obj.shape, obj.dtype), expected, "read into place")
            else:
                assert_same_obj(_detach(kit_backend, obj), expected, "batch_get_into, not placed")

    @pytest.mark.asyncio
    async def test_empty_batches(self, kit_backend: Backend) -> None:
        await kit_backend.batch_put([])
        assert list(await _batch_get(kit_backend, [])) == []
        assert list(await kit_backend.batch_contains([])) == []

    @pytest.mark.asyncio
    async def test_batch_put_accepts_a_generator(self, kit_backend: Backend) -> None:
        keys = [random_key() for _ in range(3)]
        objs = [raw_obj(k, random_kv(seed=60 + i)) for i, k in enumerate(keys)]
        await kit_backend.batch_put((k, o) for k, o in zip(keys, objs))
        for got, obj in zip(await _batch_get(kit_backend, keys), objs):
            assert_same_obj(got, obj, "batch_put from a generator")

    # -- corruption -------------------------------------------------------------------

    @pytest.mark.asyncio
    async def test_corrupt_chunk_is_a_miss(self, kit_backend: Backend) -> None:
        corrupt = self.corrupt  # type: ignore[attr-defined]
        key, neighbour = random_key(), random_key()
        await kit_backend.put(key, raw_obj(key, random_kv(seed=70)))
        neighbour_obj = raw_obj(neighbour, random_kv(seed=71))
        await kit_backend.put(neighbour, neighbour_obj)
        await _maybe_await(corrupt(kit_backend, key))
        assert await _get(kit_backend, key) is None, "a corrupt chunk was served instead of being a miss"
        assert await kit_backend.contains(key) is False, "a corrupt chunk must be removed when get() finds it"
        assert await _get(kit_backend, key) is None
        assert_same_obj(await _get(kit_backend, neighbour), neighbour_obj, "an intact neighbour of a corrupt chunk")
        fresh = raw_obj(key, random_kv(seed=72))
        await kit_backend.put(key, fresh)
        assert_same_obj(await _get(kit_backend, key), fresh, "rewriting a key that was corrupt")

    # -- carried frame checks ----------------------------------------------------------

    @pytest.mark.asyncio
    @pytest.mark.parametrize("sliced", [False, True], ids=["contiguous", "sliced"])
    async def test_a_carried_check_never_serves_other_bytes(self, kit_backend: Backend, sliced: bool) -> None:
        """An object may carry its frame check (``MemoryObj.check``, computed where its bytes
        were copied in). A right one gives the object back; a stale one (the bytes changed
        after it was computed) gives a miss (counted corrupt) or the bytes put, never others."""
        def carrying(key: CacheKey, seed: int) -> MemoryObj:
            kv = random_kv(2, 512 if sliced else 256, 128, torch.float16, seed=seed)
            if sliced:  # 64 KiB runs of [k/v, layer] blocks, as a chunk cut out of a longer KV lies
                kv = kv[:, :, 128:384]
            obj = raw_obj(key, kv)
            obj.check = int.from_bytes(frame.checksum(frame.header(obj), *obj.payload_runs()), "little")
            return obj

        key, stale_key = random_key(), random_key()
        right = carrying(key, 90)
        await kit_backend.put(key, right)
        assert_same_obj(await _get(kit_backend, key), right, "an object carrying its frame check")
        stale = carrying(stale_key, 91)
        stale.data[1, 1, 3, 4] += 1  # changed after its check was computed, which it still carries
        corrupt_before = kit_backend.corrupt_count
        await kit_backend.put(stale_key, stale)
        got = await _get(kit_backend, stale_key)
        if self.frames:
            assert got is None, "a frame sent with a stale carried check was served"
            assert kit_backend.corrupt_count > corrupt_before, "a frame failing its check must count as corrupt"
        elif got is not None:
            assert_same_obj(got, stale, "an object whose carried check is stale")

    # -- concurrency ------------------------------------------------------------------

    @pytest.mark.asyncio
    async def test_concurrent_puts_and_gets(self, kit_backend: Backend) -> None:
        n = self.concurrency
        keys = [random_key() for _ in range(n)]
        objs = [raw_obj(k, random_kv(1, 8, 64, torch.float16, seed=100 + i)) for i, k in enumerate(keys)]
        await asyncio.gather(*(kit_backend.put(k, o) for k, o in zip(keys, objs)))
        got = await asyncio.gather(*(_get(kit_backend, k) for k in keys))
        for obj, back in zip(objs, got):
            assert_same_obj(back, obj, "concurrent put then get")
        # Mixed: half the keys removed while the others are read and new ones written.
        new_keys = [random_key() for _ in range(n // 2)]
        new_objs = [raw_obj(k, random_kv(1, 8, 64, torch.float16, seed=300 + i)) for i, k in enumerate(new_keys)]
        results = await asyncio.gather(
            *(kit_backend.remove(k) for k in keys[: n // 2]),
            *(_get(kit_backend, k) for k in keys[n // 2 :]),
            *(kit_backend.put(k, o) for k, o in zip(new_keys, new_objs)),
        )
        assert all(r is True for r in results[: n // 2]), "remove() of present keys must return True"
        for obj, back in zip(objs[n // 2 :], results[n // 2 : n]):
            assert_same_obj(back, obj, "get while other keys change")
        for key, obj in zip(new_keys, new_objs):
            assert_same_obj(await _get(kit_backend, key), obj, "put concurrent with other operations")

    @pytest.mark.asyncio
    async def test_concurrent_overwrites_are_never_torn(self, kit_backend: Backend) -> None:
        key = random_key()
        versions = [raw_obj(key, random_kv(2, 32, 64, torch.float16, seed=400 + i)) for i in range(4)]
        ops = []
        for round_ in range(self.concurrency // 4):
            ops.append(kit_backend.put(key, versions[round_ % len(versions)]))
            ops.append(_get(kit_backend, key))
        results = await asyncio.gather(*ops)
        candidates = {bytes(v.payload()) for v in versions}
        for got in results[1::2]:
            if got is not None:
                assert bytes(got.payload()) in candidates, "a get saw a mix of two writes (torn object)"
        final = await _get(kit_backend, key)
        assert final is not None and bytes(final.payload()) in candidates

    @pytest.mark.asyncio
    async def test_threads_on_in_process_backend(self, kit_backend: Backend) -> None:
        backend: InProcessBackend = kit_backend
        shared = random_key()
        shared_versions = [raw_obj(shared, random_kv(1, 16, 32, torch.float16, seed=500 + i)) for i in range(2)]
        candidates = {bytes(v.payload()) for v in shared_versions}
        errors: list[str] = []
        start = threading.Barrier(2)

        def worker(index: int) -> None:
            try:
                start.wait()
                for i in range(200):
                    key = random_key()
                    obj = raw_obj(key, random_kv(1, 4, 16, torch.float16, seed=index * 1000 + i))
                    backend.put_now(key, obj)
                    back = backend.get_now(key)
                    if back is None or bytes(back.payload()) != bytes(obj.payload()):
                        errors.append(f"thread {index}: lost or changed its own key {key}")
                    if back is not None:
                        backend.release_now(back)
                    if not backend.contains_now(key):
                        errors.append(f"thread {index}: contains_now is False for a key it just put")
                    if i % 2 and backend.remove_now(key) is not True:
                        errors.append(f"thread {index}: remove_now of its own key did not return True")
                    backend.put_now(shared, shared_versions[index])
                    seen = backend.get_now(shared)
                    if seen is None or bytes(seen.payload()) not in candidates:
                        errors.append(f"thread {index}: the shared key held a torn or missing object")
                    if seen is not None:
                        backend.release_now(seen)
                    backend.keys_now()
            except Exception as exc:  # report, don't lose it in the thread
                errors.append(f"thread {index} raised {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a thread is stuck (deadlock?)"
        assert not errors, "\n".join(errors[:10])
        listed = dict(backend.keys_now())
        kept = [k for k in listed if k.model == shared.model]
        assert shared in listed
        assert len(kept) >= 200, f"expected the 200 keys the threads kept (plus the shared one), found {len(kept)}"

    @pytest.mark.asyncio
    async def test_leased_object_survives_removal_and_reuse(self, kit_backend: Backend) -> None:
        """An object from ``get_now`` keeps its bytes until ``release_now``, whatever happens meanwhile."""
        backend: InProcessBackend = kit_backend
        key = random_key()
        kv = random_kv(2, 16, 64, torch.float16, seed=600)
        backend.put_now(key, raw_obj(key, kv.clone()))
        leased = backend.get_now(key)
        assert leased is not None
        expected = bytes(leased.payload())
        assert backend.remove_now(key) is True
        # Same-sized objects are what a pool or slab allocator would hand the freed bytes to.
        others = [random_key() for _ in range(32)]
        for i, other in enumerate(others):
            backend.put_now(other, raw_obj(other, random_kv(2, 16, 64, torch.float16, seed=601 + i)))
        backend.put_now(key, raw_obj(key, random_kv(2, 16, 64, torch.float16, seed=700)))
        assert bytes(leased.payload()) == expected, "a leased object's bytes were reused before release_now"
        backend.release_now(leased)
        for other in others:
            backend.remove_now(other)
