"""Conformance tests for compressors (:class:`kvstacks.compression.Compressor`)."""

from __future__ import annotations

import concurrent.futures
import random
from collections.abc import Callable
from typing import Any

import pytest
import torch

from kvstacks import frame
from kvstacks.compression import Compressor
from kvstacks.errors import CorruptChunk
from kvstacks.memory import MemoryObj
from kvstacks.testing.data import bits, random_key, random_kv, raw_obj

KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SHAPES = ((2, 1, 1, 1), (2, 1, 1, 8), (2, 2, 16, 64), (2, 3, 17, 96), (2, 4, 256, 128))


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _run_with_timeout(fn: Callable[[], Any], timeout_s: float) -> Any:
    """Run ``fn`` in a thread; fail the test if it has not returned after ``timeout_s``."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        future = pool.submit(fn)
        try:
            return future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            pytest.fail(f"decoding did not return within {timeout_s}s (a hang on bad input)", pytrace=False)
    finally:
        pool.shutdown(wait=False)


class CompressorConformance:
    """Subclass as ``TestMyCompressor`` and define a ``compressor`` fixture returning an instance.

    Lossless compressors must round-trip bit-exactly. A lossy one sets
    ``tolerance``: the largest allowed ``max|decoded - original| / max|original|``
    for the synthetic KV of :func:`kvstacks.testing.random_kv`.
    """

    #: for lossy compressors: max abs error relative to the tensor's largest magnitude
    tolerance: float = 0.0
    #: dtypes the compressor claims to support
    dtypes: tuple[torch.dtype, ...] = KV_DTYPES
    #: seconds a decode of bad bytes may take before it counts as a hang
    decode_timeout_s: float = 30.0
    #: threads used by the thread-safety test
    threads: int = 4
    #: set True for a compressor that keeps raw KV (like ``none``): its objects are not payloads
    stores_raw: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Generate only the tests that apply, so a run never shows a skip for a test that could not apply.
        super().__init_subclass__(**kwargs)
        if cls.tolerance > 0:
            cls.test_special_values_round_trip_when_lossless = None  # type: ignore[assignment]
        if cls.stores_raw:
            cls.test_payload_of_another_compressor_is_refused = None  # type: ignore[assignment]
            cls.test_wrong_shape_is_refused = None  # type: ignore[assignment]

    @pytest.fixture
    def compressor(self) -> Compressor:
        pytest.fail(
            f"{type(self).__name__} must define a `compressor` fixture that returns a Compressor instance "
            "(see docs/plugin-authors.md, 'Conformance kit')",
            pytrace=False,
        )

    @pytest.fixture
    def kit_compressor(self, compressor: Any) -> Compressor:
        if not isinstance(compressor, Compressor):
            pytest.fail(f"the `compressor` fixture returned {type(compressor).__name__}, not a kvstacks Compressor",
                        pytrace=False)
        if compressor.lossless != (self.tolerance == 0):
            pytest.fail(f"{compressor.name} declares lossless = {compressor.lossless}: "
                        + ("set `tolerance` (> 0) on the test class" if not compressor.lossless
                           else "a lossless compressor's test class must not set `tolerance`"), pytrace=False)
        raw = compressor.encode(raw_obj(random_key(), random_kv(1, 4, 8, self.dtypes[0], seed=1))).compressor == "none"
        if raw != self.stores_raw:
            pytest.fail(f"{compressor.name} {'keeps' if raw else 'does not keep'} raw KV: set stores_raw = {raw} "
                        f"on {type(self).__name__}", pytrace=False)
        return compressor

    # -- helpers ----------------------------------------------------------------------

    def _skip_unsupported(self, dtype: torch.dtype) -> None:
        if dtype not in self.dtypes:
            pytest.skip(f"{dtype} is not in this test class's `dtypes`")

    def assert_decoded(self, compressor: Compressor, decoded: torch.Tensor, original: torch.Tensor) -> None:
        assert isinstance(decoded, torch.Tensor), f"decoded a {type(decoded).__name__}, not a tensor"
        assert tuple(decoded.shape) == tuple(original.shape), f"decoded shape {tuple(decoded.shape)} != {tuple(original.shape)}"
        assert decoded.dtype == original.dtype, f"decoded dtype {decoded.dtype} != {original.dtype}"
        if compressor.lossless:
            assert bits(decoded) == bits(original), f"{compressor.name} declares lossless but changed bits"
            return
        d, o = decoded.float(), original.float()
        assert torch.isfinite(d).all(), f"{compressor.name} decoded non-finite values from finite input"
        peak = o.abs().max().item() or 1.0
        err = (d - o).abs().max().item() / peak
        assert err <= self.tolerance, (
            f"{compressor.name} error {err:.4g} (relative to the largest magnitude) exceeds tolerance {self.tolerance}"
        )

    def _payload(self, compressor: Compressor, dtype: torch.dtype = torch.float16) -> tuple[bytes, tuple[int, ...], torch.dtype]:
        dtype = dtype if dtype in self.dtypes else self.dtypes[0]
        kv = random_kv(2, 32, 64, dtype, seed=11)
        return bytes(compressor.compress(kv)), tuple(kv.shape), dtype

    def _decode_bad(self, compressor: Compressor, payload: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> Any:
        """Decode bytes that may be bad: CorruptChunk (returned) or a tensor of exactly the asked shape."""
        def decode() -> Any:
            try:
                return compressor.decompress(memoryview(payload), shape, dtype)
            except CorruptChunk as exc:
                return exc
            except Exception as exc:  # the contract: nothing but CorruptChunk
                return AssertionError(
                    f"{compressor.name}.decompress raised {type(exc).__name__} ({exc}) on bad bytes; "
                    "it must raise kvstacks.errors.CorruptChunk"
                )

        result = _run_with_timeout(decode, self.decode_timeout_s)
        if isinstance(result, AssertionError):
            raise result
        if not isinstance(result, CorruptChunk):
            assert isinstance(result, torch.Tensor) and tuple(result.shape) == shape and result.dtype == dtype, (
                f"{compressor.name}.decompress returned {type(result).__name__} "
                f"{getattr(result, 'shape', '')} {getattr(result, 'dtype', '')} for bad bytes; it must return "
                f"a tensor of shape {shape} and dtype {dtype} or raise CorruptChunk"
            )
        return result

    # -- declarations -----------------------------------------------------------------

    def test_declares_name_and_losslessness(self, kit_compressor: Compressor) -> None:
        assert isinstance(kit_compressor.name, str) and kit_compressor.name, "a compressor needs a non-empty name"
        assert kit_compressor.name.isascii() and len(kit_compressor.name) < 256, "the name goes in the chunk header"
        assert isinstance(kit_compressor.lossless, bool), "`lossless` must be a bool"
        if not kit_compressor.lossless:
            assert self.tolerance > 0, "a lossy compressor's test class must set `tolerance` (> 0)"

    # -- round trips ------------------------------------------------------------------

    @pytest.mark.parametrize("dtype", KV_DTYPES, ids=_dtype_id)
    @pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
    def test_compress_decompress_round_trip(self, kit_compressor: Compressor, shape: tuple[int, ...],
                                            dtype: torch.dtype) -> None:
        self._skip_unsupported(dtype)
        kv = random_kv(shape[1], shape[2], shape[3], dtype, seed=sum(shape))
        original = kv.clone()
        payload = kit_compressor.compress(kv)
        assert isinstance(payload, (bytes, bytearray, memoryview)), (
            f"compress must return bytes, bytearray or memoryview, got {type(payload).__name__}"
        )
        assert bits(kv) == bits(original), "compress modified its input"
        decoded = kit_compressor.decompress(memoryview(bytes(payload)), tuple(kv.shape), dtype)
        self.assert_decoded(kit_compressor, decoded, original)

    @pytest.mark.parametrize("dtype", KV_DTYPES, ids=_dtype_id)
    def test_encode_frame_decode_round_trip(self, kit_compressor: Compressor, dtype: torch.dtype) -> None:
        """The path a tier takes: encode, chunk frame to bytes and back, decode_obj."""
        self._skip_unsupported(dtype)
        key = random_key()
        kv = random_kv(2, 64, 128, dtype, seed=12)
        obj = raw_obj(key, kv.clone())
        encoded = kit_compressor.encode(obj)
        assert isinstance(encoded, MemoryObj)
        assert encoded.key == key and tuple(encoded.shape) == tuple(kv.shape) and encoded.dtype == dtype
        assert encoded.compressor in (kit_compressor.name, "none"), (
            f"encode produced compressor {encoded.compressor!r}; expected {kit_compressor.name!r}"
        )
        if encoded.compressor != "none":
            assert encoded.data.dtype == torch.uint8 and encoded.data.dim() == 1, "a payload is a 1-D uint8 tensor"
        wire = frame.encode(encoded)
        back = frame.decode(bytes(wire), expect_key=key)  # read-only buffer, as Redis returns
        decoded = kit_compressor.decode_obj(back)
        assert decoded.compressor == "none"
        self.assert_decoded(kit_compressor, decoded.data, kv)
        # Decoding an already decoded object is a no-op, and re-encoding an encoded one works.
        assert kit_compressor.decode_obj(decoded).compressor == "none"
        again = kit_compressor.decode_obj(kit_compressor.encode(encoded))
        self.assert_decoded(kit_compressor, again.data, kv)

    def test_special_values_round_trip_when_lossless(self, kit_compressor: Compressor) -> None:
        for dtype in self.dtypes:
            kv = random_kv(1, 8, 16, dtype, seed=13)
            specials = [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, torch.finfo(dtype).tiny / 4,
                        torch.finfo(dtype).max, torch.finfo(dtype).min]
            kv.view(-1)[: len(specials)] = torch.tensor(specials, dtype=torch.float32).to(dtype)
            decoded = kit_compressor.decompress(memoryview(bytes(kit_compressor.compress(kv))), tuple(kv.shape), dtype)
            self.assert_decoded(kit_compressor, decoded, kv)

    def test_constant_and_zero_chunks(self, kit_compressor: Compressor) -> None:
        for dtype in self.dtypes:
            for kv in (torch.zeros(2, 2, 16, 32, dtype=dtype), torch.full((2, 2, 16, 32), 1.5, dtype=dtype)):
                decoded = kit_compressor.decompress(memoryview(bytes(kit_compressor.compress(kv))), tuple(kv.shape), dtype)
                self.assert_decoded(kit_compressor, decoded, kv)

    # -- bad bytes --------------------------------------------------------------------

    @pytest.mark.parametrize("cut", ["empty", "one-byte", "half", "all-but-one"])
    def test_truncated_payload_raises_corrupt_chunk(self, kit_compressor: Compressor, cut: str) -> None:
        payload, shape, dtype = self._payload(kit_compressor)
        length = {"empty": 0, "one-byte": 1, "half": len(payload) // 2, "all-but-one": len(payload) - 1}[cut]
        result = self._decode_bad(kit_compressor, payload[:length], shape, dtype)
        assert isinstance(result, CorruptChunk), (
            f"{kit_compressor.name} decoded a payload truncated to {length} of {len(payload)} bytes "
            "instead of raising CorruptChunk"
        )

    def test_garbage_payload_never_crashes(self, kit_compressor: Compressor) -> None:
        payload, shape, dtype = self._payload(kit_compressor)
        rng = random.Random(14)
        garbage = [b"\x00" * len(payload), b"\xff" * len(payload), b"\xff" * 7, bytes(rng.randrange(256) for _ in range(9))]
        garbage += [rng.randbytes(n) for n in (len(payload), len(payload) * 2, 3, 4096)]
        for junk in garbage:
            self._decode_bad(kit_compressor, junk, shape, dtype)

    def test_bit_flips_never_crash(self, kit_compressor: Compressor) -> None:
        payload, shape, dtype = self._payload(kit_compressor)
        rng = random.Random(15)
        positions = [0, 1, len(payload) // 2, len(payload) - 1] + [rng.randrange(len(payload)) for _ in range(12)]
        for pos in positions:
            flipped = bytearray(payload)
            flipped[pos] ^= 1 << rng.randrange(8)
            self._decode_bad(kit_compressor, bytes(flipped), shape, dtype)

    def test_appended_bytes_never_crash(self, kit_compressor: Compressor) -> None:
        payload, shape, dtype = self._payload(kit_compressor)
        self._decode_bad(kit_compressor, payload + b"\x00" * 16, shape, dtype)

    def test_payload_of_another_compressor_is_refused(self, kit_compressor: Compressor) -> None:
        key = random_key()
        stranger = MemoryObj(key, torch.zeros(64, dtype=torch.uint8), (2, 1, 4, 4), torch.float16, "kit-stranger")
        with pytest.raises(CorruptChunk):
            kit_compressor.decode_obj(stranger)

    def test_wrong_shape_is_refused(self, kit_compressor: Compressor) -> None:
        """decode_obj checks what decompress returns against the header's shape."""
        key = random_key()
        kv = random_kv(2, 16, 32, self.dtypes[0], seed=16)
        encoded = kit_compressor.encode(raw_obj(key, kv))
        lying = MemoryObj(key, encoded.data, (2, 2, 16, 64), encoded.dtype, encoded.compressor)
        self._decode_bad(kit_compressor, bytes(lying.payload()), lying.shape, lying.dtype)
        try:
            decoded = kit_compressor.decode_obj(lying)
        except CorruptChunk:
            return
        assert tuple(decoded.data.shape) == lying.shape and decoded.data.dtype == lying.dtype, (
            "decode_obj returned a tensor whose shape or dtype differs from the chunk header's"
        )

    # -- threads ----------------------------------------------------------------------

    def test_parallel_compress_from_threads(self, kit_compressor: Compressor) -> None:
        inputs = [random_kv(2, 64, 64, self.dtypes[i % len(self.dtypes)], seed=200 + i) for i in range(self.threads * 4)]
        expected = [kit_compressor.compress(kv) for kv in inputs]

        def round_trip(i: int) -> tuple[int, bytes, torch.Tensor]:
            payload = bytes(kit_compressor.compress(inputs[i]))
            decoded = kit_compressor.decompress(memoryview(payload), tuple(inputs[i].shape), inputs[i].dtype)
            return i, payload, decoded

        with concurrent.futures.ThreadPoolExecutor(max_workers=self.threads) as pool:
            results = list(pool.map(round_trip, list(range(len(inputs))) * 2, timeout=300))
        for i, _payload, decoded in results:
            self.assert_decoded(kit_compressor, decoded, inputs[i])
            if kit_compressor.lossless:
                # Deterministic output is not required, but the decode of a parallel encode must be right
                # and single-threaded payloads must still decode after parallel use.
                again = kit_compressor.decompress(memoryview(bytes(expected[i])), tuple(inputs[i].shape), inputs[i].dtype)
                self.assert_decoded(kit_compressor, again, inputs[i])
