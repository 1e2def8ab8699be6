"""Per-channel quantization of a KV block to small symbols, with escapes.

Each (K/V, layer, channel) gets its chunk-local mean and standard deviation
(stored as fp16, so encoder and decoder use the very same numbers). A value is
coded as ``round((x - mean) / step)`` with ``step = std * clip / m`` for the
layer's ``bins = 2 * m + 2``: symbols ``0 .. 2m`` are the levels and symbol
``2m + 1`` is an escape. A value past ``clip`` standard deviations escapes and
is stored exactly in the input dtype, so heavy tails and attention-sink
outliers cost a few exact values instead of a wide, coarse grid for everyone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: fp16 statistics must stay finite; inputs beyond this are stored raw.
STAT_LIMIT = 6.0e4


@dataclass
class Quantized:
    mean: np.ndarray  # float16 [2, L, H]
    std: np.ndarray  # float16 [2, L, H]
    symbols: np.ndarray  # int32 [2, L, n, H] (the coder's symbol type, so no conversion pass)
    escapes: np.ndarray  # bool [2, L, n, H]


def layer_half_widths(bins: list[int]) -> np.ndarray:
    """``m`` per layer as float32 [1, L, 1, 1] for broadcasting."""
    return (np.asarray(bins, dtype=np.float32) // 2 - 1).reshape(1, -1, 1, 1)


def steps(std16: np.ndarray, clip: float, half_widths: np.ndarray) -> np.ndarray:
    """Step sizes [2, L, 1, H] from fp16 stds; a zero std gets a tiny step so its
    values quantize to the mean (exact) or escape (exact)."""
    std = std16.astype(np.float32)[:, :, None, :]
    step = std * np.float32(clip) / half_widths
    return np.maximum(step, np.float32(1e-30))


def quantize(x: np.ndarray, bins: list[int], clip: float) -> Quantized:
    """``x`` float32 [2, L, n, H] with n >= 1, all finite and below ``STAT_LIMIT``."""
    mean16 = x.mean(axis=2).astype(np.float16)
    std16 = x.std(axis=2).astype(np.float16)
    half = layer_half_widths(bins)
    step = steps(std16, clip, half)
    q = x - mean16.astype(np.float32)[:, :, None, :]
    q *= np.float32(1.0) / step
    np.rint(q, out=q)
    ok = np.abs(q) <= half
    escapes = ~ok
    np.copyto(q, half + 1, where=escapes)
    q += half
    return Quantized(mean16, std16, q.astype(np.int32), escapes)


def dequantize(symbols: np.ndarray, mean16: np.ndarray, std16: np.ndarray, bins: list[int],
               clip: float) -> tuple[np.ndarray, np.ndarray]:
    """float32 values and the escape mask for ``symbols`` [2, L, n, H]."""
    half = layer_half_widths(bins)
    step = steps(std16, clip, half)
    values = symbols.astype(np.float32)
    values -= half
    values *= step
    values += mean16.astype(np.float32)[:, :, None, :]
    escapes = symbols == (2 * half + 1).astype(symbols.dtype)
    return values, escapes
