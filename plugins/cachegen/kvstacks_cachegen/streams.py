"""Entropy coding of symbol streams with constriction's ANS coder.

One coder call per stream, with one categorical model per stream: a stream is
every symbol of one distribution class, so the coder never sees per-symbol
probability rows (30x slower). This module imports only numpy, constriction
and :mod:`kvstacks_cachegen.quantize`, because the coder worker processes import it too.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import constriction
import numpy as np

from kvstacks_cachegen.quantize import Dequant

#: coder jobs: encode streams, decode streams, encode slabs (:mod:`kvstacks_cachegen.slabs`)
ENCODE, DECODE, SLABS = 1, 2, 3

_ans = constriction.stream.stack.AnsCoder
_categorical = constriction.stream.model.Categorical


class StreamError(ValueError):
    """Bytes that do not decode as the streams they claim to be."""


#: streams of at most this many symbols are coded as pairs of their high parts plus raw low bits
PAIRED_MAX_ALPHABET = 64


def paired(alphabet: int) -> bool:
    """Whether a stream of this alphabet is coded as pairs (see :func:`encode_stream`)."""
    return alphabet <= PAIRED_MAX_ALPHABET and alphabet % 2 == 0


def model_from_counts(counts: np.ndarray) -> object:
    """The categorical model a stream with these integer counts is coded with.

    Encoder and decoder build it identically from the same counts. For paired
    streams it is the model of a pair of high parts (``symbol >> 1``): the
    outer product of their distribution with itself. constriction gives every
    symbol at least the smallest representable probability, so a symbol whose
    count rounded to zero still codes, and hostile counts still make a valid
    (if useless) model.
    """
    probabilities = np.asarray(counts, dtype=np.float64)
    if not probabilities.any():
        probabilities = np.ones_like(probabilities)
    if paired(probabilities.size):
        high = probabilities[0::2] + probabilities[1::2]
        probabilities = np.outer(high, high).ravel()
    return _categorical(probabilities, perfect=False)


@dataclass
class Stream:
    """One class's symbols: counts for its model and, once coded, its words.

    A stream to decode also says how its symbols become values (``dequant``)
    and may name where they go (``out``, 2-D, contiguous).
    """

    counts: np.ndarray  # uint16/uint8 [alphabet]
    symbols: np.ndarray | None = None  # uint8 [n] (to encode)
    words: np.ndarray | None = None  # uint32 [w] (after encoding / to decode)
    size: int = 0  # number of symbols
    dequant: Dequant | None = None
    out: np.ndarray | None = None
    values: np.ndarray | None = None  # 2-D, after decoding (``out`` when given)
    escapes: np.ndarray | None = None  # uint32 positions of escaped values, after decoding


def run(op: int, stream: Stream, model: object | None = None) -> None:
    """Encode a stream's symbols into words, or decode its words into values."""
    if op == ENCODE:
        stream.words = encode_stream(stream.symbols, stream.counts, model)
        return
    symbols = decode_stream(stream.words, stream.size, stream.counts, model)
    stream.values, stream.escapes = stream.dequant.apply(symbols, out=stream.out)


@functools.lru_cache(maxsize=64)
def _split_pairs(half: int) -> np.ndarray:
    """Pair index -> its two high parts, shifted left by one, as two bytes (one uint16)."""
    parts = np.empty((half * half, 2), dtype=np.uint8)
    parts[:, 0] = np.repeat(np.arange(half, dtype=np.uint8) * 2, half)
    parts[:, 1] = np.tile(np.arange(half, dtype=np.uint8) * 2, half)
    return parts.view(np.uint16).reshape(-1)


def encode_stream(symbols: np.ndarray, counts: np.ndarray, model: object | None = None) -> np.ndarray:
    """ANS words of ``symbols`` (one coder call).

    A paired stream stores the symbols' lowest bits raw (``ceil(n / 32)`` words,
    first) and ANS-codes pairs of their high parts: the decoder then runs half
    as many, only slightly costlier, steps (78 vs 61 M values/s measured) for
    about 0.3% more bits, since the lowest bit of a fine grid is nearly uniform.
    """
    if symbols.size == 0:
        return np.zeros(0, dtype=np.uint32)
    model = model or model_from_counts(counts)
    coder = _ans()
    if not paired(len(counts)):
        coder.encode_reverse(symbols.astype(np.int32, copy=False), model)
        return coder.get_compressed()
    n = symbols.size
    sym = symbols.astype(np.uint8, copy=False)
    low = np.zeros(4 * ((n + 31) // 32), dtype=np.uint8)
    packed = np.packbits(sym & 1, bitorder="little")
    low[:packed.size] = packed
    high = sym >> 1
    if n % 2:
        high = np.append(high, np.uint8(0))
    pairs = high[0::2].astype(np.int32)
    pairs *= len(counts) // 2
    pairs += high[1::2]
    coder.encode_reverse(pairs, model)
    return np.concatenate([low.view(np.uint32), coder.get_compressed()])


def decode_stream(words: np.ndarray, size: int, counts: np.ndarray, model: object | None = None) -> np.ndarray:
    """The ``size`` symbols (uint8) coded in ``words``; :class:`StreamError` if they are not a valid stream."""
    if size == 0:
        if words.size:
            raise StreamError("a stream of no symbols carries data")
        return np.zeros(0, dtype=np.uint8)
    model = model or model_from_counts(counts)
    pairs = paired(len(counts))
    low_words = (size + 31) // 32 if pairs else 0
    if words.size < low_words:
        raise StreamError("coded stream is shorter than its raw low bits")
    try:
        coder = _ans(np.ascontiguousarray(words[low_words:], dtype=np.uint32))
        out = coder.decode(model, (size + 1) // 2 if pairs else size)
        consumed = coder.is_empty()
    except ValueError as exc:
        raise StreamError(f"invalid coded stream: {exc}") from None
    if not consumed:
        raise StreamError("coded stream has data left over after its symbols")
    if not pairs:
        return out.astype(np.uint8)
    # One gather splits every pair and leaves room for the low bit: no division pass.
    symbols = np.take(_split_pairs(len(counts) // 2), out).view(np.uint8)[:size]
    low = np.ascontiguousarray(words[:low_words], dtype="<u4").view(np.uint8)
    symbols |= np.unpackbits(low, count=size, bitorder="little")
    return symbols


def class_counts(symbols: np.ndarray, alphabet: int, scale: int = 255) -> np.ndarray:
    """Histogram of ``symbols`` scaled into 1..scale for every symbol seen, 0 for unseen.

    Scaling keeps the table tiny (one byte a symbol for per-chunk tables); a
    seen symbol never rounds to zero, so its code length stays bounded.
    """
    hist = np.bincount(symbols, minlength=alphabet)[:alphabet].astype(np.float64)
    top = hist.max() if hist.size else 0
    if top <= 0:
        return np.zeros(alphabet, dtype=np.uint16 if scale > 255 else np.uint8)
    # hist * scale / top, not hist * (scale / top): the latter rounded the most frequent
    # symbol's count to just above ``scale``, which wrapped to 0 in the cast.
    scaled = np.minimum(np.ceil(hist * scale / top), scale)
    return scaled.astype(np.uint16 if scale > 255 else np.uint8)
