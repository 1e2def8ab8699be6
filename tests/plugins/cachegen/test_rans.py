"""The rANS stream coder of payload version 2, and version 1 payloads still decoding."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kvstacks.errors import CorruptChunk
from kvstacks_cachegen import rans
from kvstacks_cachegen.compressor import VERSION, CacheGenCompressor
from kvstacks_cachegen.quantize import Dequant
from kvstacks_cachegen.streams import DECODE, Stream, StreamError, class_counts, run

DATA = Path(__file__).parent / "data"


def make(**options) -> CacheGenCompressor:
    options.setdefault("workers", 0)
    return CacheGenCompressor(CacheGenCompressor.Options(**options))


@pytest.mark.parametrize("alphabet", [1, 2, 4, 40, 64, 80, 256])
@pytest.mark.parametrize("n", [1, 2, 3, 1001, 40_000])
def test_round_trip(alphabet, n):
    rng = np.random.default_rng(alphabet * n)
    symbols = np.clip(rng.normal(alphabet / 2, alphabet / 6, size=n), 0, alphabet - 1).astype(np.uint8)
    model = rans.model_from_counts(class_counts(symbols, alphabet))
    words = rans.encode(symbols, model)
    assert words.dtype == np.uint32 and words.size <= n // 2 + 5
    assert np.array_equal(rans.decode(words, n, model), symbols)


def test_size_is_close_to_the_entropy():
    rng = np.random.default_rng(0)
    symbols = np.clip(np.rint(rng.normal(19, 4.75, size=200_000)), 0, 39).astype(np.uint8)
    counts = np.bincount(symbols, minlength=40)
    p = counts[counts > 0] / symbols.size
    entropy_bits = -(p * np.log2(p)).sum() * symbols.size
    words = rans.encode(symbols, rans.model_from_counts(counts))
    assert words.size * 32 <= entropy_bits * 1.001 + 128


def test_unseen_and_hostile_counts_make_valid_models():
    for counts in (np.zeros(8), np.array([0, 0, 5, 0]), np.full(256, 65535)):
        model = rans.model_from_counts(counts)
        assert model.freq.min() >= 1 and model.freq.sum() == rans.TOTAL
        assert model.symbol_of.size == rans.TOTAL
        symbols = np.arange(counts.size, dtype=np.uint8)  # every symbol, seen or not, still codes
        assert np.array_equal(rans.decode(rans.encode(symbols, model), symbols.size, model), symbols)


def test_invalid_words_are_rejected():
    rng = np.random.default_rng(1)
    symbols = rng.integers(0, 32, size=5000).astype(np.uint8)
    model = rans.model_from_counts(class_counts(symbols, 32))
    words = rans.encode(symbols, model)
    assert rans.decode(np.concatenate([words, np.ones(3, np.uint32)]), symbols.size, model) is None  # left over
    assert rans.decode(words[:-5], symbols.size, model) is None  # cut short
    assert rans.decode(words, symbols.size + 1, model) is None  # too few symbols in it
    assert rans.decode(words[:3], symbols.size, model) is None  # no room for the states
    assert rans.decode(np.zeros(0, np.uint32), 0, model) is not None


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=400), st.integers(0, 600))
def test_random_words_never_crash_or_overrun(data, n):
    model = rans.model_from_counts(np.arange(1, 41))
    words = np.frombuffer(data[:len(data) // 4 * 4], dtype=np.uint32)
    out = rans.decode(words, n, model)
    assert out is None or (out.size == n and out.max(initial=0) < 40)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_decoding_dequantizes_as_the_table_does(channels_last, dtype):
    """The fused decode gives the values and escapes Dequant.apply gives for the same symbols."""
    rng = np.random.default_rng(2)
    channels, rows, bins = 24, 50, 32
    mean = rng.normal(size=channels).astype(np.float16)
    std = rng.uniform(0.1, 2, size=channels).astype(np.float16)
    symbols = rng.integers(0, bins, size=channels * rows).astype(np.uint8)
    dequant = Dequant(mean, std, bins, 4.0, channels_last, np.dtype(dtype))
    expected, expected_escapes = dequant.apply(symbols)
    counts = class_counts(symbols, bins)
    stream = Stream(counts, words=rans.encode(symbols, rans.model_from_counts(counts)), size=symbols.size,
                    dequant=dequant)
    run(DECODE, stream)
    assert stream.values.shape == expected.shape
    assert np.array_equal(stream.values.view(np.uint8), expected.view(np.uint8))
    assert np.array_equal(stream.escapes, expected_escapes)
    stream.words = stream.words[:-1]
    with pytest.raises(StreamError):
        run(DECODE, stream)


def test_chunks_are_written_as_version_2():
    kv = torch.randn(2, 3, 64, 32, dtype=torch.float16)
    assert VERSION == 2 and bytes(make().compress(kv))[4] == 2


V1 = json.loads((DATA / "v1-payloads.json").read_text())


@pytest.mark.parametrize("name", sorted(V1))
def test_version_1_payloads_still_decode(name):
    """Payloads written by the version 1 coder (constriction) decode to the very bits
    that coder's own decoder gave; data/make_v1_payloads.py wrote them."""
    case = V1[name]
    options = dict(case["options"])
    if "tables" in options:
        options["tables"] = DATA / options["tables"]
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[case["dtype"]]
    payload = (DATA / f"{name}.bin").read_bytes()
    assert payload[4] == 1
    for workers in (0, 1):  # the large case splits across a coder worker
        got = make(workers=workers, **options).decompress(memoryview(payload), tuple(case["shape"]), dtype)
        bits = got.view(torch.int32 if dtype == torch.float32 else torch.int16).numpy().tobytes()
        assert hashlib.sha256(bits).hexdigest() == case["decoded_sha256"]


def test_unknown_versions_are_a_miss_that_says_which():
    payload = bytearray(make().compress(torch.randn(2, 3, 64, 32, dtype=torch.float16)))
    payload[4] = 3
    with pytest.raises(CorruptChunk, match="version 3.*reads versions 1, 2"):
        make().decompress(memoryview(bytes(payload)), (2, 3, 64, 32), torch.float16)
