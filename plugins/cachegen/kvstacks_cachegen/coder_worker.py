"""A coder process: encodes slabs and decodes (and dequantizes) streams for its parent.

constriction holds the GIL while it codes, so threads cannot run two coders at
once; a few of these processes can. Run as ``python -m
kvstacks_cachegen.coder_worker FD``, where FD is a file both processes map
(the arena): bulk data (KV values, symbols, words) moves through it, and only
small binary job descriptions (no pickle) cross the stdin/stdout pipes. The
worker exits when stdin closes.

Job: ``u64 length`` then :data:`JOB_HEAD`. To decode: a :data:`STREAM_HEAD`
per stream, each stream's ``alphabet x u16`` counts, fp16 means and stds
(``channels`` of each). To encode: :data:`SLAB_JOB`, then a :data:`SLAB_HEAD`
per slab. Reply: ``u64 length``, ``u8 status`` (0 ok, 2 the chunk cannot be
coded, else an error message follows), then when decoding a ``u32`` escape
count per stream and every stream's escape positions as ``u32``; when
encoding, per slab ``u8 parts`` and per part :data:`PART_HEAD`, fp16 means,
fp16 stds, escape positions, counts, with the part's words (or symbols, 4-byte
aligned) written one after another from the slab's output offset.
"""

from __future__ import annotations

import mmap
import struct
import sys

import numpy as np

from kvstacks_cachegen.quantize import Dequant, Uncodable
from kvstacks_cachegen.slabs import Slab, encode_slab
from kvstacks_cachegen.streams import DECODE, ENCODE, SLABS, Stream, StreamError, run

JOB_HEAD = struct.Struct("<BIQ")  # op, streams or slabs, arena bytes
# alphabet, symbols, words, input offset, output offset, output capacity,
# channels, channels last, values are fp32, clip, coder (streams.RANS or CONSTRICTION_PAIRS)
STREAM_HEAD = struct.Struct("<HIIQQQIBBfB")
SLAB_JOB = struct.Struct("<fIBB")  # clip, anchor_every, input dtype code, fitted tables code the last part
SLAB_HEAD = struct.Struct("<IIHQQQ")  # tokens, hidden, bins, input offset, output offset, output capacity
PART_HEAD = struct.Struct("<HII")  # counts (0: symbols were written, not words), escapes, words or symbols
OK, FAILED, UNCODABLE = 0, 1, 2
DID_NOT_FIT = 0xFFFFFFFF
DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
RAW_DTYPES = {1: np.dtype("<i2"), 2: np.dtype("<i2"), 3: np.dtype("<i4")}


def read_exact(stream, n: int) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = stream.readinto(view[got:])
        if not k:
            return None
        got += k
    return bytes(buf)


class Arena:
    """This process's map of the shared file, remapped when the parent grows it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = 0
        self.map: mmap.mmap | None = None

    def at(self, size: int) -> np.ndarray:
        if size != self.size:
            self.map = mmap.mmap(self.fd, size) if size else None
            self.size = size
        return np.frombuffer(self.map, dtype=np.uint8) if self.map is not None else np.zeros(0, np.uint8)


def run_job(message: bytes, arena: Arena) -> bytes:
    op, count, arena_size = JOB_HEAD.unpack_from(message, 0)
    space = arena.at(arena_size)
    if op == SLABS:
        return encode_slabs(message, count, space)
    if op not in (ENCODE, DECODE):
        raise ValueError(f"unknown job {op}")
    pos = JOB_HEAD.size
    heads = []
    for _ in range(count):
        heads.append(STREAM_HEAD.unpack_from(message, pos))
        pos += STREAM_HEAD.size
    if op == ENCODE:
        return encode_streams(message, pos, heads, space)
    streams = []
    for alphabet, size, nwords, at_in, at_out, _, channels, last, fp32, clip, coder in heads:
        counts = np.frombuffer(message, dtype="<u2", count=alphabet, offset=pos)
        mean = np.frombuffer(message, dtype="<f2", count=channels, offset=pos + 2 * alphabet)
        std = np.frombuffer(message, dtype="<f2", count=channels, offset=pos + 2 * alphabet + 2 * channels)
        pos += 2 * alphabet + 4 * channels
        dequant = Dequant(mean, std, alphabet, clip, bool(last), DTYPES[fp32])
        out = space[at_out:at_out + size * dequant.dtype.itemsize].view(dequant.dtype).reshape(dequant.shape(size))
        words = space[at_in:at_in + 4 * nwords].view("<u4")
        streams.append(Stream(counts, words=words, size=size, dequant=dequant, out=out, coder=coder))
    for s in streams:
        run(DECODE, s)
    return bytes([OK]) + struct.pack(f"<{count}I", *(s.escapes.size for s in streams)) + \
        b"".join(s.escapes.astype("<u4").tobytes() for s in streams)


def encode_streams(message: bytes, pos: int, heads: list[tuple], space: np.ndarray) -> bytes:
    """Streams of symbols (fitted-table classes) to words; a stream whose words outgrow
    their room is reported as :data:`DID_NOT_FIT` for the caller to code."""
    sizes = []
    for alphabet, size, _, at_in, at_out, capacity, *_ in heads:
        counts = np.frombuffer(message, dtype="<u2", count=alphabet, offset=pos)
        pos += 2 * alphabet
        s = Stream(counts, symbols=space[at_in:at_in + size], size=size)
        run(ENCODE, s)
        if s.words.nbytes > capacity:
            sizes.append(DID_NOT_FIT)
            continue
        space[at_out:at_out + s.words.nbytes] = s.words.view(np.uint8)
        sizes.append(s.words.size)
    return bytes([OK]) + struct.pack(f"<{len(heads)}I", *sizes)


def encode_slabs(message: bytes, count: int, space: np.ndarray) -> bytes:
    clip, anchor_every, code, tabled = SLAB_JOB.unpack_from(message, JOB_HEAD.size)
    raw = RAW_DTYPES.get(code)
    if raw is None:
        raise ValueError(f"unknown dtype code {code}")
    pos = JOB_HEAD.size + SLAB_JOB.size
    reply = [bytes([OK])]
    for _ in range(count):
        tokens, hidden, bins, at_in, at_out, capacity = SLAB_HEAD.unpack_from(message, pos)
        pos += SLAB_HEAD.size
        body = space[at_in:at_in + raw.itemsize * tokens * hidden].view(raw).reshape(tokens, hidden)
        slab = Slab(body, bins)
        encode_slab(slab, code, clip, anchor_every, bool(tabled))
        reply.append(bytes([len(slab.parts)]))
        cursor, end = at_out, at_out + capacity
        for part in slab.parts:
            data = part.words.view(np.uint8) if part.counts is not None else part.symbols
            if cursor + data.size > end:
                raise ValueError("a slab's output outgrew its room in the arena")
            space[cursor:cursor + data.size] = data
            cursor += -(-data.size // 4) * 4
            counts = part.counts if part.counts is not None else np.zeros(0, np.uint8)
            reply += [PART_HEAD.pack(counts.size, part.escapes.size, part.words.size if part.counts is not None
                                     else part.symbols.size),
                      part.mean16.astype("<f2").tobytes(), part.std16.astype("<f2").tobytes(),
                      part.escapes.astype("<u4").tobytes(), counts.tobytes()]
    return b"".join(reply)


def main() -> None:
    arena = Arena(int(sys.argv[1]))
    stdin = sys.stdin.buffer.raw if hasattr(sys.stdin.buffer, "raw") else sys.stdin.buffer
    stdout = sys.stdout.buffer
    while True:
        head = read_exact(stdin, 8)
        if head is None:
            return
        (length,) = struct.unpack("<Q", head)
        message = read_exact(stdin, length)
        if message is None:
            return
        try:
            reply = run_job(message, arena)
        except Uncodable:
            reply = bytes([UNCODABLE])
        except (StreamError, ValueError, struct.error) as exc:
            reply = bytes([FAILED]) + str(exc).encode()[:1000]
        except BaseException as exc:  # noqa: BLE001 - a coder panic must become an error reply, not a dead pipe
            reply = bytes([FAILED]) + f"{type(exc).__name__}: {exc}".encode()[:1000]
        stdout.write(struct.pack("<Q", len(reply)))
        stdout.write(reply)
        stdout.flush()


if __name__ == "__main__":
    main()
