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


def raw_to_float(raw: np.ndarray, code: int) -> np.ndarray:
    """Exact float32 of values stored as raw input-dtype bits (code 1 fp16, 2 bf16, 3 fp32)."""
    if code == 1:
        return raw.view("<f2").astype(np.float32)
    if code == 2:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.view("<f4").astype(np.float32)


def work_dtype(code: int) -> np.dtype:
    """The dtype values are rebuilt in: fp16 for fp16 KV, float32 otherwise (numpy has no bf16)."""
    return np.dtype(np.float16 if code == 1 else np.float32)


class Uncodable(ValueError):
    """A block whose statistics are not finite in fp16 (non-finite or huge inputs): store it raw."""


@dataclass
class Quantized:
    mean: np.ndarray  # float16 [2, L, H]
    std: np.ndarray  # float16 [2, L, H]
    symbols: np.ndarray  # uint8 [2, L, n, H]
    escapes: np.ndarray  # bool [2, L, n, H]


def steps(std16: np.ndarray, clip: float, half_widths: np.ndarray | np.float32) -> np.ndarray:
    """Step sizes from fp16 stds (broadcast against ``half_widths``); a zero std
    gets a tiny step so its values quantize to the mean (exact) or escape (exact).
    Encoder and decoder both get their steps here, so they agree to the bit."""
    step = std16.astype(np.float32) * np.float32(clip) / half_widths
    return np.maximum(step, np.float32(1e-30))


def quantize(x: np.ndarray, bins: list[int], clip: float) -> Quantized:
    """``x`` float32 [2, L, n, H] with n >= 1; :class:`Uncodable` if its means or stds are not finite in fp16.

    Works one (K/V, layer) slice at a time: the temporaries then stay in cache,
    and stay small enough that the allocator reuses them instead of mapping
    (and faulting in) fresh pages for every chunk.
    """
    k_count, layers, n, hidden = x.shape
    mean16 = np.empty((k_count, layers, hidden), dtype=np.float16)
    std16 = np.empty((k_count, layers, hidden), dtype=np.float16)
    symbols = np.empty(x.shape, dtype=np.uint8)
    escapes = np.empty(x.shape, dtype=bool)
    q = np.empty((n, hidden), dtype=np.float32)
    for k in range(k_count):
        for layer, b in enumerate(bins):
            xs = x[k, layer]
            mean16[k, layer] = xs.mean(axis=0)
            std16[k, layer] = xs.std(axis=0)
            if not (np.isfinite(mean16[k, layer]).all() and np.isfinite(std16[k, layer]).all()):
                raise Uncodable("statistics overflow fp16")
            half = np.float32(b // 2 - 1)
            np.subtract(xs, mean16[k, layer].astype(np.float32), out=q)
            q *= np.float32(1.0) / steps(std16[k, layer], clip, half)
            np.rint(q, out=q)
            esc = escapes[k, layer]
            np.greater(np.abs(q), half, out=esc)
            np.copyto(q, half + 1, where=esc)
            q += half
            symbols[k, layer] = q
    return Quantized(mean16, std16, symbols, escapes)


@dataclass
class Dequant:
    """How one coded stream's symbols become values: the stream covers ``C``
    channels, laid out ``[tokens, C]`` (``channels_last``) or ``[C, tokens]``.

    The coder that decodes a stream also dequantizes it, so both processes of
    a split decode do whole streams' work and the caller only places escapes.
    """

    mean16: np.ndarray  # float16 [C]
    std16: np.ndarray  # float16 [C]
    bins: int
    clip: float
    channels_last: bool
    dtype: np.dtype  # float16 for fp16 KV, float32 otherwise

    def shape(self, size: int) -> tuple[int, int]:
        c = self.mean16.size
        rows = size // c if c else 0
        return (rows, c) if self.channels_last else (c, rows)

    def _step_mean(self) -> tuple[np.ndarray, np.ndarray, np.float32]:
        half = np.float32(self.bins // 2 - 1)
        return steps(self.std16, self.clip, half), self.mean16.astype(np.float32), half

    def table(self) -> np.ndarray:
        """Every channel's value of every symbol, flat ``[C * bins]`` in ``dtype``."""
        step, mean, half = self._step_mean()
        levels = np.arange(self.bins, dtype=np.float32) - half
        return (levels[None, :] * step.reshape(-1, 1) + mean.reshape(-1, 1)).astype(self.dtype).reshape(-1)

    def run(self, size: int) -> int:
        """How many symbols in a row of a stream of ``size`` share a channel."""
        return 1 if self.channels_last else max(1, size // max(1, self.mean16.size))

    def apply(self, symbols: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Values of ``symbols`` (1-D, in stream order) as a 2-D array, and the
        stream positions of escapes (whose values the caller overwrites)."""
        c = self.mean16.size
        shape = self.shape(symbols.size)
        sym = symbols.reshape(shape)
        if c * self.bins <= symbols.size:
            # A table of every (channel, symbol) value, then one gather: fewer passes than arithmetic.
            offsets = np.arange(c, dtype=np.int32 if c * self.bins > 1 << 16 else np.uint16) * self.bins
            index = sym + (offsets if self.channels_last else offsets[:, None])
            values = np.take(self.table(), index, out=out)
        else:
            # The same float32 operations as the table, element by element, for short streams.
            step, mean, half = self._step_mean()
            if not self.channels_last:
                step, mean = step[:, None], mean[:, None]
            work = sym.astype(np.float32)
            work -= half
            work *= step
            work += mean
            if out is None:
                out = np.empty(shape, dtype=self.dtype)
            out[...] = work
            values = out
        escapes = np.flatnonzero(symbols == self.bins - 1).astype(np.uint32)
        return values, escapes


def dequantize_block(q: Quantized, bins: list[int], clip: float, dtype: np.dtype) -> np.ndarray:
    """Values of a quantized block [2 or 1, L, n, H] exactly as the decoder
    rebuilds them (escaped positions hold garbage: the caller overwrites them)."""
    values = np.empty(q.symbols.shape, dtype=dtype)
    for k in range(q.symbols.shape[0]):
        for layer, b in enumerate(bins):
            Dequant(q.mean[k, layer], q.std[k, layer], b, clip, True, dtype).apply(
                q.symbols[k, layer].reshape(-1), out=values[k, layer])
    return values
