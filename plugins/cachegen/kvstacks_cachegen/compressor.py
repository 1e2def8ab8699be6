"""The ``cachegen`` compressor: per-channel quantization plus ANS entropy coding.

Payload layout (little-endian), version 1::

    header   "KVCG" u8 version, u8 mode (0 coded, 1 raw), u8 dtype, u8 flags (1 tables, 2 delta),
             u32 layers, u32 tokens, u32 hidden, 8s table id, u32 sink tokens,
             u32 anchor_every, f32 clip
    mode 1:  the KV bytes as given (non-finite or huge inputs)
    mode 0:  u16 bins per layer
             sink tokens, exact: [2, layers, sinks, hidden] in the input dtype
             per part (anchors then residuals with delta coding, else one body part):
               fp16 mean [2, L, H], fp16 std [2, L, H], u32 escapes, escaped values (input dtype)
             per part coded with per-chunk tables: u8 counts for each (K/V, layer) stream
             u32 words of every stream, then the streams' words (a stream of at most 64
             symbols starts with its raw low bits, ceil(n / 32) words, see streams.encode_stream)

Everything the decoder needs is in the payload and the (payload, shape, dtype)
it is given, except a fitted table file, whose id the header names.
"""

from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from kvstacks.compression import Compressor
from kvstacks.errors import ConfigError, CorruptChunk

from kvstacks_cachegen import coder_pool
from kvstacks_cachegen.payload import Reader, Writer
from kvstacks_cachegen.quantize import Dequant, Uncodable, dequantize_block, quantize
from kvstacks_cachegen.streams import (
    DECODE,
    ENCODE,
    Stream,
    StreamError,
    class_counts,
    model_from_counts,
    run,
)
from kvstacks_cachegen.tables import Tables, load_tables

log = logging.getLogger("kvstacks.cachegen")

MAGIC = b"KVCG"
VERSION = 1
HEADER = struct.Struct("<4sBBBBIII8sIIf")
MODE_CODED, MODE_RAW = 0, 1
FLAG_TABLES, FLAG_DELTA = 1, 2
DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}
ITEMSIZE = {1: 2, 2: 2, 3: 4}
RAW_NUMPY = {1: "<u2", 2: "<u2", 3: "<u4"}

#: bins per layer group (layers split evenly, first group first): earlier
#: layers get more, as in CacheGen. Measured size and quality in docs/cachegen.md.
LEVELS: dict[str, list[int]] = {
    "high": [64, 48, 48],
    "default": [40, 32, 32],
    "low": [24, 20, 20],
}

#: the largest chunk coded (and so the most a hostile header can make a decoder allocate)
MAX_VALUES = 1 << 28

#: parallel coding pays off above this many symbols in a call
PARALLEL_MIN_SYMBOLS = 1 << 17


def layer_bins(groups: list[int], layers: int) -> list[int]:
    return [groups[min(layer * len(groups) // layers, len(groups) - 1)] for layer in range(layers)]


def raw_to_float(raw: np.ndarray, code: int) -> np.ndarray:
    """Exact float32 of values stored as raw input-dtype bits."""
    if code == 1:
        return raw.view("<f2").astype(np.float32)
    if code == 2:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.view("<f4").astype(np.float32)


class CacheGenCompressor(Compressor):
    """Lossy: quantize each channel to a few bins, keep sinks and outliers exact, ANS-code the rest."""

    name: ClassVar[str] = "cachegen"
    lossless: ClassVar[bool] = False

    @dataclass
    class Options:
        #: a preset of bins per layer group: high, default or low
        level: Literal["high", "default", "low"] = "default"
        #: bins per layer group (even, 4..256), overriding ``level``, e.g. [32, 16, 16]
        bins: list[int] | None = None
        #: the bins span +-clip standard deviations of a channel; values past it are stored exactly
        clip: float = 4.0
        #: leading tokens of a sequence kept exact (attention sinks)
        sink_tokens: int = 16
        #: detect: a chunk whose first token looks like a sink (small V norm) starts a sequence;
        #: always: keep sink_tokens exact in every chunk; never: no exact tokens
        sinks: Literal["detect", "always", "never"] = "detect"
        #: delta-code tokens against every Nth (anchor) token; 0 turns it off
        anchor_every: int = 0
        #: a table file from `kvstacks cachegen fit`; without it each chunk carries small tables
        tables: Path | None = None
        #: coder processes (constriction holds the GIL); default: one less than the CPUs, at most 4
        workers: int | None = None

    def __init__(self, options: CacheGenCompressor.Options | None = None) -> None:
        super().__init__(options)
        o = self.options
        groups = o.bins if o.bins is not None else LEVELS[o.level]
        where = "compressor_options"
        if not groups or any(isinstance(b, bool) or not isinstance(b, int) or b % 2 or not 4 <= b <= 256
                             for b in groups):
            raise ConfigError(f"{where}.bins", f"must be a non-empty list of even bin counts in 4..256, got {groups!r}")
        if not (isinstance(o.clip, (int, float)) and math.isfinite(o.clip) and 0 < o.clip <= 64):
            raise ConfigError(f"{where}.clip", f"must be a number of standard deviations in (0, 64], got {o.clip!r}")
        if not 0 <= o.sink_tokens <= 1 << 16:
            raise ConfigError(f"{where}.sink_tokens", f"must be between 0 and 65536, got {o.sink_tokens}")
        if o.anchor_every == 1 or not 0 <= o.anchor_every <= 1 << 16:
            raise ConfigError(f"{where}.anchor_every", f"must be 0 (off) or at least 2, got {o.anchor_every}")
        if o.workers is not None and not 0 <= o.workers <= 64:
            raise ConfigError(f"{where}.workers", f"must be between 0 and 64, got {o.workers}")
        self.groups = list(groups)
        self.clip = float(np.float32(o.clip))
        self.tables: Tables | None = load_tables(Path(o.tables)) if o.tables is not None else None
        if self.tables is not None:
            t = self.tables
            if (o.bins is not None and layer_bins(self.groups, t.layers) != t.bins) or t.clip != self.clip \
                    or t.anchor_every != o.anchor_every:
                raise ConfigError(f"{where}.tables", f"{o.tables} was fitted for bins {t.bins}, clip {t.clip}, "
                                  f"anchor_every {t.anchor_every}; use those options or fit tables for these")
        workers = coder_pool.default_workers() if o.workers is None else o.workers
        self.workers = workers
        self._warned_tables = False

    @property
    def pool(self) -> coder_pool.CoderPool | None:
        """This process's coder workers (looked up each time, so a forked child gets its own)."""
        return coder_pool.shared_pool(self.workers)

    # ---- planning, shared by encoder, decoder and `fit` ----

    def bins_for(self, layers: int) -> list[int]:
        if self.tables is not None and self.tables.layers == layers and self.options.bins is None:
            return list(self.tables.bins)
        return layer_bins(self.groups, layers)

    def sink_count(self, x: np.ndarray) -> int:
        o = self.options
        tokens = x.shape[2]
        if o.sinks == "never" or o.sink_tokens == 0 or tokens == 0:
            return 0
        if o.sinks == "always":
            return min(o.sink_tokens, tokens)
        if tokens < 2:
            return 0
        # An attention-sink token carries a far smaller V than ordinary tokens
        # (measured on SmolLM2: about 0.27x the median), so a chunk whose first
        # token looks like that is the start of a sequence.
        v = x[1, :, :min(tokens, 65)]
        norms = np.sqrt((v.astype(np.float32) ** 2).sum(axis=-1)).mean(axis=0)
        ref = float(np.median(norms[1:]))
        return min(o.sink_tokens, tokens) if ref > 0 and norms[0] < 0.5 * ref else 0

    @staticmethod
    def parts(body_tokens: int, anchor_every: int) -> list[np.ndarray]:
        """Token indices (into the body) of each coded part: anchors then the rest, or all."""
        if anchor_every < 2 or body_tokens == 0:
            return [np.arange(body_tokens)]
        anchors = np.arange(0, body_tokens, anchor_every)
        rest = np.setdiff1d(np.arange(body_tokens), anchors)
        return [anchors, rest]

    def uses_tables(self, layers: int, hidden: int, bins: list[int]) -> bool:
        t = self.tables
        if t is None:
            return False
        if t.matches(layers, hidden, bins, self.clip, self.options.anchor_every):
            return True
        if not self._warned_tables:
            self._warned_tables = True
            log.warning("cachegen tables were fitted for %d layers x %d hidden, not %d x %d; "
                        "coding with per-chunk tables", t.layers, t.hidden, layers, hidden)
        return False

    def quantized_parts(self, x: np.ndarray, bins: list[int], n_sink: int, work: np.dtype = np.float32):
        """Yield ``(last, token index or None, bins, Quantized)`` for each non-empty coded part.

        With delta coding, anchors come first (at twice the bins) and the rest
        are quantized as differences from their anchor as the decoder will see it.
        """
        anchor_every = self.options.anchor_every
        body = x[:, :, n_sink:]
        parts = self.parts(body.shape[2], anchor_every)
        anchors_hat = None
        for p, index in enumerate(parts):
            if index.size == 0:
                continue
            last = p == len(parts) - 1
            part_bins = bins if last else [min(2 * b, 256) for b in bins]
            if len(parts) == 1:
                q = quantize(body, part_bins, self.clip)
                yield last, None, part_bins, q
                continue
            block = body[:, :, index]
            if anchors_hat is not None:
                block = block - anchors_hat[:, :, index // anchor_every]
            q = quantize(block, part_bins, self.clip)
            if p == 0:
                # The anchors exactly as the decoder will rebuild them, in its working dtype.
                anchors_hat = dequantize_block(q, part_bins, self.clip, work).astype(np.float32)
                anchors_hat[q.escapes] = block[q.escapes]
            yield last, index, part_bins, q

    # ---- encode ----

    def compress(self, kv: torch.Tensor) -> bytearray:
        code = DTYPE_CODES.get(kv.dtype)
        if kv.dim() != 4 or kv.shape[0] != 2 or code is None:
            raise ValueError(f"cachegen codes KV [2, layers, tokens, hidden] in fp16/bf16/fp32, got "
                             f"{tuple(kv.shape)} {kv.dtype}")
        if kv.numel() > MAX_VALUES:
            raise ValueError(f"cachegen codes chunks of at most {MAX_VALUES} values, got {kv.numel()}; use smaller chunks")
        kv = kv.detach().contiguous().cpu()
        _, layers, tokens, hidden = kv.shape
        raw = kv.view(torch.int16 if code != 3 else torch.int32).numpy()
        x = kv.numpy() if code == 3 else kv.float().numpy()
        if x.size:
            try:
                return self._compress_coded(x, raw, code)
            except Uncodable:
                pass  # non-finite or huge values: keep the chunk exact
        out = Writer()
        out.pack(HEADER.format, MAGIC, VERSION, MODE_RAW, code, 0, layers, tokens, hidden, bytes(8), 0, 0, 0.0)
        out.add(raw)
        return out.getvalue()

    def _compress_coded(self, x: np.ndarray, raw: np.ndarray, code: int) -> bytearray:
        _, layers, tokens, hidden = x.shape
        out = Writer()
        bins = self.bins_for(layers)
        n_sink = self.sink_count(x)
        anchor_every = self.options.anchor_every
        tabled = self.uses_tables(layers, hidden, bins)
        flags = (FLAG_TABLES if tabled else 0) | (FLAG_DELTA if anchor_every >= 2 else 0)
        table_id = self.tables.table_id if tabled else bytes(8)
        out.pack(HEADER.format, MAGIC, VERSION, MODE_CODED, code, flags, layers, tokens, hidden, table_id,
                 n_sink, anchor_every, self.clip)
        out.add(np.asarray(bins, dtype="<u2"))
        out.add(np.ascontiguousarray(raw[:, :, :n_sink]))
        streams: list[Stream] = []
        counts_sections = []
        work = np.dtype(np.float16 if code == 1 else np.float32)
        halves = [self._encode_half(x[k:k + 1], raw[k:k + 1], bins, n_sink, tabled, work) for k in (0, 1)]
        for (last, qk, esc_k, streams_k), (_, qv, esc_v, streams_v) in zip(*halves):
            out.add(qk.mean)
            out.add(qv.mean)
            out.add(qk.std)
            out.add(qv.std)
            out.pack("<I", esc_k.size + esc_v.size)
            out.add(esc_k)
            out.add(esc_v)
            if streams_k is None:
                streams.extend(self._table_streams(np.concatenate([qk.symbols, qv.symbols])))
            else:
                part_streams = streams_k + streams_v
                counts_sections.append(np.concatenate([s.counts for s in part_streams]))
                streams.extend(part_streams)
        for counts in counts_sections:
            out.add(counts)
        self._code(ENCODE, streams)
        out.add(np.asarray([len(s.words) for s in streams], dtype="<u4"))
        for s in streams:
            out.add(s.words)
        return out.getvalue()

    def _encode_half(self, x: np.ndarray, raw: np.ndarray, bins: list[int], n_sink: int, tabled: bool,
                     work: np.dtype) -> list:
        """Quantize K or V ([1, L, T, H]); per part: (last, Quantized, escaped raw values, streams or None)."""
        body_raw = raw[:, :, n_sink:]
        results = []
        for last, index, part_bins, q in self.quantized_parts(x, bins, n_sink, work):
            part_raw = body_raw if index is None else body_raw[:, :, index]
            streams = None if (last and tabled) else self._layer_streams(q.symbols, part_bins)
            results.append((last, q, part_raw[q.escapes], streams))
        return results

    def _layer_streams(self, symbols: np.ndarray, bins: list[int]) -> list[Stream]:
        streams = []
        for k in range(symbols.shape[0]):
            for layer, b in enumerate(bins):
                sym = symbols[k, layer].reshape(-1)
                streams.append(Stream(class_counts(sym, b), sym, size=sym.size))
        return streams

    def _table_streams(self, symbols: np.ndarray) -> list[Stream]:
        t = self.tables
        rows = np.ascontiguousarray(symbols.transpose(0, 1, 3, 2)).reshape(-1, symbols.shape[2])
        return [Stream(t.classes[c], rows[r].reshape(-1), size=r.size * rows.shape[1])
                for c, r in enumerate(t.class_rows)]

    def _code(self, op: int, streams: list[Stream]) -> None:
        models: dict[int, object] = {}
        table_models = {id(c): m for c, m in zip(self.tables.classes, self.tables.models)} if self.tables else {}

        def here(s: Stream) -> None:
            run(op, s, table_models.get(id(s.counts)) or models.setdefault(id(s.counts), model_from_counts(s.counts)))

        total = sum(s.size for s in streams)
        pool = self.pool
        workers = pool.borrow(pool.size) if pool and total >= PARALLEL_MIN_SYMBOLS else []
        if not workers:
            for s in streams:
                here(s)
            return
        failed: set[int] = set()
        try:
            failed = coder_pool.run_split(op, streams, workers, here)
        finally:
            for w in workers:
                pool.give_back(w, healthy=id(w) not in failed)
        if failed and op == DECODE:
            # A worker died on these bytes; decoding them here could take this process down too.
            raise CorruptChunk("cachegen coder worker died while decoding this chunk")
        for s in streams:
            if s.words is None:  # its worker died, or its words outgrew the worker's room
                here(s)

    # ---- decode ----

    def decompress(self, payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        code = DTYPE_CODES.get(dtype)
        if code is None or len(shape) != 4 or shape[0] != 2:
            raise CorruptChunk(f"cachegen cannot produce {tuple(shape)} {dtype}")
        r = Reader(payload)
        magic, version, mode, pcode, flags, layers, tokens, hidden, table_id, n_sink, anchor_every, clip = \
            r.unpack(HEADER.format, "header")
        if magic != MAGIC:
            raise CorruptChunk("not a cachegen payload (bad magic)")
        if version != VERSION:
            raise CorruptChunk(f"cachegen payload version {version}; this kvstacks-cachegen reads {VERSION}")
        if (2, layers, tokens, hidden) != tuple(shape) or pcode != code:
            raise CorruptChunk(f"cachegen payload is for {(2, layers, tokens, hidden)} dtype code {pcode}, "
                               f"not {tuple(shape)} {dtype}")
        count = 2 * layers * tokens * hidden
        if count > MAX_VALUES:
            raise CorruptChunk(f"cachegen chunk of {count} values exceeds the {MAX_VALUES} it can code")
        if mode == MODE_RAW:
            data = r.array(RAW_NUMPY[code], count, "raw KV")
            r.done()
            return torch.from_numpy(data.copy()).view(dtype).reshape(shape)
        if mode != MODE_CODED or flags & ~(FLAG_TABLES | FLAG_DELTA):
            raise CorruptChunk(f"cachegen payload has unknown mode {mode} or flags {flags}")
        if not (math.isfinite(clip) and 0 < clip <= 64) or n_sink > tokens or anchor_every == 1:
            raise CorruptChunk("cachegen payload header is inconsistent (clip, sinks or anchors)")
        if bool(flags & FLAG_DELTA) != (anchor_every >= 2):
            raise CorruptChunk("cachegen payload header is inconsistent (delta flag)")
        tabled = bool(flags & FLAG_TABLES)
        if tabled and (self.tables is None or self.tables.table_id != bytes(table_id)):
            have = self.tables.table_id.hex() if self.tables else "none"
            raise CorruptChunk(f"chunk was coded with cachegen tables {bytes(table_id).hex()}, this compressor "
                               f"has {have}; configure compressor_options.tables with that file")
        bins = r.array("<u2", layers, "bins").astype(int).tolist()
        if any(b % 2 or not 4 <= b <= 256 for b in bins):
            raise CorruptChunk("cachegen payload has invalid bins")
        if tabled and not self.tables.matches(layers, hidden, bins, clip, anchor_every):
            raise CorruptChunk("cachegen payload does not match its tables' shape or bins")
        sink_raw = r.array(RAW_NUMPY[code], 2 * layers * n_sink * hidden, "sink tokens")
        all_parts = self.parts(tokens - n_sink, anchor_every)
        metas = []
        for p, index in enumerate(all_parts):
            if index.size == 0:
                continue
            n = index.size
            mean = r.array("<f2", 2 * layers * hidden, "means").reshape(2, layers, hidden)
            std = r.array("<f2", 2 * layers * hidden, "stds").reshape(2, layers, hidden)
            if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std >= 0).all()):
                raise CorruptChunk("cachegen payload has statistics no encoder writes (not finite or negative)")
            (n_esc,) = r.unpack("<I", "escape count")
            if n_esc > 2 * layers * n * hidden:
                raise CorruptChunk("cachegen payload claims more escapes than values")
            esc = raw_to_float(r.array(RAW_NUMPY[code], n_esc, "escaped values"), code)
            part_bins = bins if p == len(all_parts) - 1 else [min(2 * b, 256) for b in bins]
            metas.append((p == len(all_parts) - 1, index, n, mean, std, esc, part_bins))
        # fp16 output is written directly; bf16 goes through float32 (numpy has no bf16)
        work = np.dtype(np.float16 if code == 1 else np.float32)
        out = np.empty((2, layers, tokens, hidden), dtype=work)
        one_part = len(all_parts) == 1
        blocks, streams_by_part = [], []
        for last, index, n, mean, std, esc, part_bins in metas:
            # A single untabled part decodes straight into ``out``; others are placed after.
            block = out[:, :, n_sink:] if one_part and not (last and tabled) else \
                np.empty((2, layers, n, hidden), dtype=work)
            blocks.append(block)
            if last and tabled:
                t = self.tables
                part = [Stream(t.classes[c], size=rows.size * n,
                               dequant=Dequant(mean.reshape(-1)[rows], std.reshape(-1)[rows], len(t.classes[c]),
                                               clip, False, work))
                        for c, rows in enumerate(t.class_rows)]
            else:
                part = [Stream(None, size=n * hidden, out=block[k, layer],
                               dequant=Dequant(mean[k, layer], std[k, layer], b, clip, True, work))
                        for k in range(2) for layer, b in enumerate(part_bins)]
            streams_by_part.append(part)
        for (last, *_), part in zip(metas, streams_by_part):
            if last and tabled:
                continue
            for s in part:
                s.counts = r.array(np.uint8, s.dequant.bins, "stream tables")
        streams = [s for part in streams_by_part for s in part]
        words = r.array("<u4", len(streams), "stream sizes")
        if int(words.astype(np.int64).sum()) * 4 != r.remaining():
            raise CorruptChunk("cachegen stream sizes do not match the payload length")
        for s, w in zip(streams, words.tolist()):
            s.words = r.array("<u4", w, "stream")
        r.done()
        try:
            self._code(DECODE, streams)
        except StreamError as exc:
            raise CorruptChunk(f"cachegen stream is corrupt: {exc}") from None
        out[:, :, :n_sink] = raw_to_float(sink_raw, code).reshape(2, layers, n_sink, hidden)
        anchors_hat = None
        for (last, index, n, mean, std, esc, part_bins), part, block in zip(metas, streams_by_part, blocks):
            if last and tabled:
                positions = self._place_table_streams(part, block)
            else:
                positions = None
            if anchors_hat is not None:
                block += anchors_hat[:, :, index // anchor_every]
            self._fill_escapes(part, block, positions, esc)
            if not one_part:
                if index is all_parts[0]:
                    anchors_hat = block
                out[:, :, n_sink + index] = block
            elif last and tabled:
                out[:, :, n_sink:] = block
        return torch.from_numpy(out) if code != 2 else torch.from_numpy(out).to(dtype)

    def _place_table_streams(self, part: list[Stream], block: np.ndarray) -> np.ndarray:
        """Put tables-coded streams ([rows of a class, n]) into ``block`` [2, L, n, H];
        return their escapes' positions in ``block``, in order."""
        _, layers, n, hidden = block.shape
        rows = np.empty((2 * layers * hidden, n), dtype=block.dtype)
        positions = []
        for s, r_idx in zip(part, self.tables.class_rows):
            rows[r_idx] = s.values
            row, token = np.divmod(s.escapes.astype(np.int64), n)
            row = r_idx[row]
            positions.append(((row // hidden) * n + token) * hidden + row % hidden)
        block[...] = rows.reshape(2, layers, hidden, n).transpose(0, 1, 3, 2)
        return np.sort(np.concatenate(positions)) if positions else np.zeros(0, dtype=np.int64)

    @staticmethod
    def _fill_escapes(part: list[Stream], block: np.ndarray, positions: np.ndarray | None, esc: np.ndarray) -> None:
        """Overwrite escaped values with the exact ones, which the payload lists in block order."""
        found = positions.size if positions is not None else sum(s.escapes.size for s in part)
        if found != esc.size:
            raise CorruptChunk(f"cachegen payload lists {esc.size} escaped values, its streams code {found}")
        if positions is not None:
            block.flat[positions] = esc
            return
        first = 0
        for s in part:
            if s.escapes.size:
                s.values.flat[s.escapes] = esc[first:first + s.escapes.size]
                first += s.escapes.size
