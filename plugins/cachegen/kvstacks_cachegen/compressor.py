"""The ``cachegen`` compressor: per-channel quantization plus ANS entropy coding.

Payload layout (little-endian), version 2::

    header   "KVCG" u8 version, u8 mode (0 coded, 1 raw), u8 dtype, u8 flags (1 tables, 2 delta),
             u32 layers, u32 tokens, u32 hidden, 8s table id, u32 sink tokens,
             u32 anchor_every, f32 clip
    mode 1:  the KV bytes as given (non-finite or huge inputs)
    mode 0:  u16 bins per layer
             sink tokens, exact: [2, layers, sinks, hidden] in the input dtype
             per part (anchors then residuals with delta coding, else one body part):
               fp16 mean [2, L, H], fp16 std [2, L, H], u32 escapes, escaped values (input dtype)
             per part coded with per-chunk tables: u8 counts for each (K/V, layer) stream
             u32 words of every stream, then the streams' words (rANS, see rans.py)

Version 1 differs only in the streams: words of constriction's ANS coder, a
stream of at most 64 symbols starting with its raw low bits (see
streams.decode_pairs_v1). It still decodes; chunks are written as version 2.

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
from kvstacks_cachegen.coder_worker import SLAB_JOB
from kvstacks_cachegen.payload import Reader, Writer
from kvstacks_cachegen.quantize import Dequant, Uncodable, raw_to_float, work_dtype
from kvstacks_cachegen.slabs import Slab, encode_slab, token_parts
from kvstacks_cachegen.streams import (
    CONSTRICTION_PAIRS,
    DECODE,
    ENCODE,
    RANS,
    SLABS,
    Stream,
    StreamError,
    model_from_counts,
    run,
)
from kvstacks_cachegen.tables import Tables, load_tables

log = logging.getLogger("kvstacks.cachegen")

MAGIC = b"KVCG"
VERSION = 2
#: payload versions this decoder reads, and the stream coder of each
READS = {1: CONSTRICTION_PAIRS, 2: RANS}
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

    def sink_count(self, x: np.ndarray, tokens: int | None = None) -> int:
        """Exact tokens at the start of a chunk of ``tokens`` (default: all of ``x``,
        [2, L, T, H]; ``x`` needs only the first 65 of them)."""
        o = self.options
        tokens = x.shape[2] if tokens is None else tokens
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

    # ---- encode ----

    def compress(self, kv: torch.Tensor) -> bytearray:
        code = DTYPE_CODES.get(kv.dtype)
        if kv.dim() != 4 or kv.shape[0] != 2 or code is None:
            raise ValueError(f"cachegen codes KV [2, layers, tokens, hidden] in fp16/bf16/fp32, got "
                             f"{tuple(kv.shape)} {kv.dtype}")
        if kv.numel() > MAX_VALUES:
            raise ValueError(f"cachegen codes chunks of at most {MAX_VALUES} values, got {kv.numel()}; use smaller chunks")
        kv = kv.detach().cpu()
        _, layers, tokens, hidden = kv.shape
        # numpy, not torch, copies and converts: torch's OpenMP threads spin for a while
        # after each parallel op, and that spinning took a core from the coder workers.
        raw = np.ascontiguousarray(kv.view(torch.int16 if code != 3 else torch.int32).numpy())
        if raw.size:
            try:
                return self._compress_coded(raw, code)
            except Uncodable:
                pass  # non-finite or huge values: keep the chunk exact
        out = Writer()
        out.pack(HEADER.format, MAGIC, VERSION, MODE_RAW, code, 0, layers, tokens, hidden, bytes(8), 0, 0, 0.0)
        out.add(raw)
        return out.getvalue()

    def _compress_coded(self, raw: np.ndarray, code: int) -> bytearray:
        _, layers, tokens, hidden = raw.shape
        out = Writer()
        bins = self.bins_for(layers)
        n_sink = self.sink_count(raw_to_float(raw[:, :, :65], code), tokens)
        anchor_every = self.options.anchor_every
        tabled = self.uses_tables(layers, hidden, bins)
        flags = (FLAG_TABLES if tabled else 0) | (FLAG_DELTA if anchor_every >= 2 else 0)
        table_id = self.tables.table_id if tabled else bytes(8)
        out.pack(HEADER.format, MAGIC, VERSION, MODE_CODED, code, flags, layers, tokens, hidden, table_id,
                 n_sink, anchor_every, self.clip)
        out.add(np.asarray(bins, dtype="<u2"))
        out.add(np.ascontiguousarray(raw[:, :, :n_sink]))
        raw_body = raw[:, :, n_sink:]
        slabs = [Slab(raw_body[k, layer], b) for k in range(2) for layer, b in enumerate(bins)]
        self._code_slabs(slabs, code, tabled)
        all_parts = token_parts(tokens - n_sink, anchor_every)
        coded = [(p == len(all_parts) - 1, index) for p, index in enumerate(all_parts) if index.size]
        counts_sections, word_lists = [], []
        for p, (last, index) in enumerate(coded):
            parts = [slab.parts[p] for slab in slabs]
            out.add(np.stack([part.mean16 for part in parts]))
            out.add(np.stack([part.std16 for part in parts]))
            escaped = []
            for i, part in enumerate(parts):
                part_raw = raw_body[i // layers, i % layers]
                if len(all_parts) > 1:
                    part_raw = part_raw[index]
                escaped.append(part_raw.reshape(-1)[part.escapes])
            out.pack("<I", sum(e.size for e in escaped))
            for e in escaped:
                out.add(e)
            if last and tabled:
                symbols = np.stack([part.symbols for part in parts]).reshape(2, layers, index.size, hidden)
                table_streams = self._table_streams(symbols)
                self._code(ENCODE, table_streams)
                word_lists.append(table_streams)
            else:
                counts_sections.append(np.concatenate([part.counts for part in parts]))
                word_lists.append(parts)
        for counts in counts_sections:
            out.add(counts)
        coded_words = [item.words for items in word_lists for item in items]
        out.add(np.asarray([len(w) for w in coded_words], dtype="<u4"))
        for w in coded_words:
            out.add(w)
        return out.getvalue()

    def _table_streams(self, symbols: np.ndarray) -> list[Stream]:
        t = self.tables
        rows = np.ascontiguousarray(symbols.transpose(0, 1, 3, 2)).reshape(-1, symbols.shape[2])
        return [Stream(t.classes[c], rows[r].reshape(-1), size=r.size * rows.shape[1])
                for c, r in enumerate(t.class_rows)]

    def _borrow(self, items: list) -> list[coder_pool.CoderWorker]:
        pool = self.pool
        return pool.borrow(pool.size) if pool and sum(s.size for s in items) >= PARALLEL_MIN_SYMBOLS else []

    def _split(self, op: int, items: list, workers: list[coder_pool.CoderWorker], here, context: bytes = b"") -> set[int]:
        """Code ``items`` across this thread and ``workers``; give the workers back, then raise any error."""
        failed: set[int] = set()
        try:
            failed, error = coder_pool.run_split(op, items, workers, here, context)
        finally:
            for w in workers:
                self.pool.give_back(w, healthy=id(w) not in failed)
        if error is not None:
            raise error
        return failed

    def _code_slabs(self, slabs: list[Slab], code: int, tabled: bool) -> None:
        """Quantize and code every slab (K/V, layer), split across this thread and the coder workers."""
        anchor_every = self.options.anchor_every

        def here(slab: Slab) -> None:
            encode_slab(slab, code, self.clip, anchor_every, tabled)

        workers = self._borrow(slabs)
        if workers:
            context = SLAB_JOB.pack(self.clip, anchor_every, code, tabled)
            try:
                self._split(SLABS, slabs, workers, here, context)
            except StreamError as exc:  # a worker could not code its slabs: this thread codes them
                log.warning("cachegen coder worker failed to encode (%s); coding in the calling thread", exc)
        for slab in slabs:
            if slab.parts is None:  # never run, or its worker died or failed
                here(slab)

    def _code(self, op: int, streams: list[Stream]) -> None:
        models: dict[int, object] = {}
        coder = streams[0].coder if streams else RANS
        table_models = {id(c): m for c, m in zip(self.tables.classes, self.tables.models(coder))} if self.tables \
            else {}

        def here(s: Stream) -> None:
            model = table_models.get(id(s.counts))
            if model is None:
                model = models.get(id(s.counts))
            if model is None:
                model = models[id(s.counts)] = model_from_counts(s.counts, s.coder)
            run(op, s, model)

        workers = self._borrow(streams)
        failed = self._split(op, streams, workers, here) if workers else set()
        if failed and op == DECODE:
            # A worker died on these bytes; decoding them here could take this process down too.
            raise CorruptChunk("cachegen coder worker died while decoding this chunk")
        for s in streams:
            if (s.words if op == ENCODE else s.values) is None:
                here(s)  # never run, its worker died, or its words outgrew the worker's room

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
        if version not in READS:
            raise CorruptChunk(f"cachegen payload version {version}; this kvstacks-cachegen reads versions "
                               f"{', '.join(map(str, READS))}")
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
        all_parts = token_parts(tokens - n_sink, anchor_every)
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
        work = work_dtype(code)
        out = np.empty((2, layers, tokens, hidden), dtype=work)
        one_part = len(all_parts) == 1
        blocks, streams_by_part = [], []
        for last, _index, n, mean, std, _esc, part_bins in metas:
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
            s.coder = READS[version]
        r.done()
        try:
            self._code(DECODE, streams)
        except StreamError as exc:
            raise CorruptChunk(f"cachegen stream is corrupt: {exc}") from None
        out[:, :, :n_sink] = raw_to_float(sink_raw, code).reshape(2, layers, n_sink, hidden)
        anchors_hat = None
        for (last, index, _n, _mean, _std, esc, _part_bins), part, block in zip(metas, streams_by_part, blocks):
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
        if code == 2:
            # float32 -> bf16, rounding to nearest even, in numpy (see compress on torch's threads)
            bits = out.view(np.uint32)
            out = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
            return torch.from_numpy(out).view(torch.bfloat16)
        return torch.from_numpy(out)

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
