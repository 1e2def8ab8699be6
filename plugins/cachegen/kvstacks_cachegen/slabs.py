"""Encoding one slab, a (K/V, layer) of a chunk: quantize its parts, then count and ANS-code them.

The slab is the unit an encode is split into across the calling thread and the
coder workers (as the stream is for decode), so that quantization, which is
most of encoding, runs on every core. Every slab is coded alone, so the bytes
do not depend on who coded it. This module imports only numpy, constriction
and the cachegen modules below it, because the coder workers run it too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from kvstacks_cachegen.quantize import Quantized, dequantize_block, quantize, raw_to_float, work_dtype
from kvstacks_cachegen.streams import class_counts, encode_stream


def token_parts(body_tokens: int, anchor_every: int) -> list[np.ndarray]:
    """Token indices (into the body) of each coded part: anchors then the rest, or all."""
    if anchor_every < 2 or body_tokens == 0:
        return [np.arange(body_tokens)]
    anchors = np.arange(0, body_tokens, anchor_every)
    rest = np.setdiff1d(np.arange(body_tokens), anchors)
    return [anchors, rest]


def part_bins(bins: list[int], last: bool) -> list[int]:
    """Anchors get twice the bins: every other token is coded against them."""
    return bins if last else [min(2 * b, 256) for b in bins]


def quantize_parts(body: np.ndarray, bins: list[int], clip: float, anchor_every: int,
                   work: np.dtype) -> Iterator[tuple[bool, np.ndarray | None, list[int], Quantized]]:
    """Yield ``(last, token index or None, bins, Quantized)`` for each non-empty part of ``body`` [K, L, n, H].

    With delta coding, anchors come first and the rest are quantized as
    differences from their anchor as the decoder will rebuild it.
    """
    parts = token_parts(body.shape[2], anchor_every)
    anchors_hat = None
    for p, index in enumerate(parts):
        if index.size == 0:
            continue
        last = p == len(parts) - 1
        pbins = part_bins(bins, last)
        if len(parts) == 1:
            yield last, None, pbins, quantize(body, pbins, clip)
            continue
        block = body[:, :, index]
        if anchors_hat is not None:
            block = block - anchors_hat[:, :, index // anchor_every]
        q = quantize(block, pbins, clip)
        if p == 0:
            # The anchors exactly as the decoder will rebuild them, in its working dtype.
            anchors_hat = dequantize_block(q, pbins, clip, work).astype(np.float32)
            anchors_hat[q.escapes] = block[q.escapes]
        yield last, index, pbins, q


@dataclass
class SlabPart:
    """One coded part of a slab: its statistics, escapes, and words (or symbols for fitted tables)."""

    mean16: np.ndarray  # float16 [H]
    std16: np.ndarray  # float16 [H]
    escapes: np.ndarray  # uint32 positions in the part's [tokens, H] block
    counts: np.ndarray | None = None  # uint8 [bins]: the stream's per-chunk table
    words: np.ndarray | None = None  # uint32
    symbols: np.ndarray | None = None  # uint8 [tokens * H], when fitted tables code this part


@dataclass
class Slab:
    body: np.ndarray  # raw input-dtype bits [tokens, H] (the chunk's body for one K/V and layer)
    bins: int
    parts: list[SlabPart] | None = None  # once coded

    @property
    def size(self) -> int:
        return self.body.size


def encode_slab(slab: Slab, code: int, clip: float, anchor_every: int, tabled: bool) -> None:
    """Fill ``slab.parts`` (``code``: the input dtype, 1 fp16, 2 bf16, 3 fp32). With
    ``tabled`` the last part keeps its symbols for the caller, which codes them by
    fitted class across slabs. Raises :class:`~kvstacks_cachegen.quantize.Uncodable`
    for non-finite statistics."""
    slab.parts = []
    body = raw_to_float(slab.body, code)[None, None]
    for last, _, (b,), q in quantize_parts(body, [slab.bins], clip, anchor_every, work_dtype(code)):
        symbols = q.symbols[0, 0].reshape(-1)
        part = SlabPart(q.mean[0, 0], q.std[0, 0], np.flatnonzero(q.escapes[0, 0]).astype(np.uint32))
        if last and tabled:
            part.symbols = symbols
        else:
            part.counts = class_counts(symbols, b)
            part.words = encode_stream(symbols, part.counts)
        slab.parts.append(part)
