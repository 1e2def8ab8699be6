"""Entropy coding of symbol streams: one coder call and one model per stream.

A stream is every symbol of one distribution class, so the coder never sees
per-symbol probability rows (30x slower). Payload version 2 codes streams with
:mod:`kvstacks_cachegen.rans`; version 1's streams (constriction's ANS coder,
pairs of high parts plus raw low bits) still decode here. This module imports
only numpy, numba, constriction and cachegen modules that do too, because the
coder worker processes import it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import constriction
import numpy as np

from kvstacks_cachegen import rans
from kvstacks_cachegen.quantize import Dequant

#: coder jobs: encode streams, decode streams, encode slabs (:mod:`kvstacks_cachegen.slabs`)
ENCODE, DECODE, SLABS = 1, 2, 3

#: a stream's coder, numbered as the payload versions that use it
CONSTRICTION_PAIRS, RANS = 1, 2

_ans = constriction.stream.stack.AnsCoder
_categorical = constriction.stream.model.Categorical


class StreamError(ValueError):
    """Bytes that do not decode as the streams they claim to be."""


#: version 1 coded streams of at most this many symbols as pairs of their high parts plus raw low bits
PAIRED_MAX_ALPHABET = 64


def paired(alphabet: int) -> bool:
    """Whether a version 1 stream of this alphabet was coded as pairs (see :func:`decode_pairs_v1`)."""
    return alphabet <= PAIRED_MAX_ALPHABET and alphabet % 2 == 0


def model_from_counts(counts: np.ndarray, coder: int = RANS) -> object:
    """The model a stream with these integer counts is coded with by ``coder``.

    For :data:`RANS` see :func:`kvstacks_cachegen.rans.model_from_counts`. For
    version 1's coder it is constriction's categorical model; for paired
    streams the model of a pair of high parts (``symbol >> 1``): the
    outer product of their distribution with itself. constriction gives every
    symbol at least the smallest representable probability, so a symbol whose
    count rounded to zero still codes, and hostile counts still make a valid
    (if useless) model.
    """
    if coder == RANS:
        return rans.model_from_counts(counts)
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
    coder: int = RANS  # streams are encoded with RANS; version 1 payloads decode with CONSTRICTION_PAIRS


def run(op: int, stream: Stream, model: object | None = None) -> None:
    """Encode a stream's symbols into words, or decode its words into values."""
    if op == ENCODE:
        stream.words = encode_stream(stream.symbols, stream.counts, model)
        return
    if stream.coder == RANS:
        decode_values(stream, model)
        return
    symbols = decode_pairs_v1(stream.words, stream.size, stream.counts, model)
    stream.values, stream.escapes = stream.dequant.apply(symbols, out=stream.out)


def decode_values(stream: Stream, model: rans.Model | None = None) -> None:
    """Decode a RANS stream straight into its values (one pass: symbols never land in memory)."""
    d = stream.dequant
    if len(stream.counts) != d.bins:
        raise StreamError(f"a stream of {d.bins} bins has {len(stream.counts)} counts")
    model = model or rans.model_from_counts(stream.counts)
    values = stream.out if stream.out is not None else np.empty(d.shape(stream.size), dtype=d.dtype)
    bits = np.uint16 if d.dtype.itemsize == 2 else np.uint32  # numba has no float16: move the bits
    escapes = rans.decode_values(stream.words, stream.size, model, d.table().view(bits), d.run(stream.size),
                                 values.reshape(-1).view(bits))
    if escapes is None:
        raise StreamError("invalid coded stream (its words do not decode to exactly its symbols)")
    stream.values, stream.escapes = values, escapes


@functools.lru_cache(maxsize=64)
def _split_pairs(half: int) -> np.ndarray:
    """Pair index -> its two high parts, shifted left by one, as two bytes (one uint16)."""
    parts = np.empty((half * half, 2), dtype=np.uint8)
    parts[:, 0] = np.repeat(np.arange(half, dtype=np.uint8) * 2, half)
    parts[:, 1] = np.tile(np.arange(half, dtype=np.uint8) * 2, half)
    return parts.view(np.uint16).reshape(-1)


def encode_stream(symbols: np.ndarray, counts: np.ndarray, model: rans.Model | None = None) -> np.ndarray:
    """uint32 words of ``symbols`` (one coder call, :mod:`kvstacks_cachegen.rans`)."""
    return rans.encode(symbols, model or rans.model_from_counts(counts))


def decode_pairs_v1(words: np.ndarray, size: int, counts: np.ndarray, model: object | None = None) -> np.ndarray:
    """The ``size`` symbols (uint8) of a version 1 stream; :class:`StreamError` if it is not valid.

    Version 1 stored a stream of at most 64 symbols as its symbols' lowest bits
    raw (``ceil(n / 32)`` words, first) and pairs of their high parts ANS-coded
    with constriction, the pair model being the outer product of the high
    parts' distribution with itself; larger alphabets were coded one symbol a step.
    """
    if size == 0:
        if words.size:
            raise StreamError("a stream of no symbols carries data")
        return np.zeros(0, dtype=np.uint8)
    model = model or model_from_counts(counts, CONSTRICTION_PAIRS)
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

    Scaling keeps the table tiny (one byte a symbol for per-chunk tables: two
    bytes made the streams 0.03% smaller on real KV and the tables 0.15% of the
    payload bigger); a seen symbol never rounds to zero, so its code length stays bounded.
    """
    hist = np.bincount(symbols, minlength=alphabet)[:alphabet].astype(np.float64)
    top = hist.max() if hist.size else 0
    if top <= 0:
        return np.zeros(alphabet, dtype=np.uint16 if scale > 255 else np.uint8)
    # hist * scale / top, not hist * (scale / top): the latter rounded the most frequent
    # symbol's count to just above ``scale``, which wrapped to 0 in the cast.
    scaled = np.minimum(np.ceil(hist * scale / top), scale)
    return scaled.astype(np.uint16 if scale > 255 else np.uint8)
