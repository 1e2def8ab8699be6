"""Entropy coding of symbol streams with constriction's ANS coder.

One coder call per stream, with one categorical model per stream: a stream is
every symbol of one distribution class, so the coder never sees per-symbol
probability rows (30x slower). This module imports only numpy and
constriction, because the coder worker processes import it too.
"""

from __future__ import annotations

from dataclasses import dataclass

import constriction
import numpy as np

_ans = constriction.stream.stack.AnsCoder
_categorical = constriction.stream.model.Categorical


class StreamError(ValueError):
    """Bytes that do not decode as the streams they claim to be."""


def model_from_counts(counts: np.ndarray) -> object:
    """A categorical model from integer counts, built identically by encoder and decoder.

    constriction gives every symbol at least the smallest representable
    probability, so a symbol whose count rounded to zero still codes, and
    hostile counts still make a valid (if useless) model.
    """
    probabilities = np.asarray(counts, dtype=np.float64)
    if not probabilities.any():
        probabilities = np.ones_like(probabilities)
    return _categorical(probabilities, perfect=False)


@dataclass
class Stream:
    """One class's symbols: counts for its model and, once coded, its words."""

    counts: np.ndarray  # uint16/uint8 [alphabet]
    symbols: np.ndarray | None = None  # int32 or uint8 [n] (before encoding / after decoding)
    words: np.ndarray | None = None  # uint32 [w] (after encoding / before decoding)
    size: int = 0  # number of symbols


def encode_stream(symbols: np.ndarray, counts: np.ndarray, model: object | None = None) -> np.ndarray:
    if symbols.size == 0:
        return np.zeros(0, dtype=np.uint32)
    coder = _ans()
    coder.encode_reverse(symbols.astype(np.int32, copy=False), model or model_from_counts(counts))
    return coder.get_compressed()


def decode_stream(words: np.ndarray, size: int, counts: np.ndarray, model: object | None = None) -> np.ndarray:
    if size == 0:
        if words.size:
            raise StreamError("a stream of no symbols carries data")
        return np.zeros(0, dtype=np.int32)
    try:
        coder = _ans(np.ascontiguousarray(words, dtype=np.uint32))
        out = coder.decode(model or model_from_counts(counts), size)
        consumed = coder.is_empty()
    except ValueError as exc:
        raise StreamError(f"invalid coded stream: {exc}") from None
    if not consumed:
        raise StreamError("coded stream has data left over after its symbols")
    return out


def class_counts(symbols: np.ndarray, alphabet: int, scale: int = 255) -> np.ndarray:
    """Histogram of ``symbols`` scaled into 1..scale for every symbol seen, 0 for unseen.

    Scaling keeps the table tiny (one byte a symbol for per-chunk tables); a
    seen symbol never rounds to zero, so its code length stays bounded.
    """
    hist = np.bincount(symbols, minlength=alphabet)[:alphabet].astype(np.float64)
    top = hist.max() if hist.size else 0
    if top <= 0:
        return np.zeros(alphabet, dtype=np.uint16 if scale > 255 else np.uint8)
    scaled = np.ceil(hist * (scale / top))
    return scaled.astype(np.uint16 if scale > 255 else np.uint8)
