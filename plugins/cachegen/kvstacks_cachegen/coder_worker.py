"""A coder process: encodes or decodes (and dequantizes) streams for its parent.

constriction holds the GIL while it codes, so threads cannot run two coders at
once; a few of these processes can. Run as ``python -m
kvstacks_cachegen.coder_worker FD``, where FD is a file both processes map
(the arena): bulk data (symbols, words, values) moves through it, and only
small binary job descriptions (no pickle) cross the stdin/stdout pipes. The
worker exits when stdin closes.

Job: ``u64 length`` then :data:`JOB_HEAD`, a :data:`STREAM_HEAD` per stream,
each stream's ``alphabet x u16`` counts and, when decoding, its fp16 means
and stds (``channels`` of each). Reply: ``u64 length``, ``u8 status`` (0 ok,
else an error message follows), then a ``u32`` per stream (words written
when encoding, ``0xFFFFFFFF`` if they did not fit; escapes when decoding)
and, when decoding, every stream's escape positions as ``u32``.
"""

from __future__ import annotations

import mmap
import struct
import sys

import numpy as np

from kvstacks_cachegen.quantize import Dequant
from kvstacks_cachegen.streams import ENCODE, Stream, StreamError, run

JOB_HEAD = struct.Struct("<BIQ")  # op, streams, arena bytes
# alphabet, symbols, words (decode), input offset, output offset, output capacity,
# channels (decode), channels last (decode), values are fp32 (decode), clip (decode)
STREAM_HEAD = struct.Struct("<HIIQQQIBBf")
DID_NOT_FIT = 0xFFFFFFFF
DTYPES = (np.dtype(np.float16), np.dtype(np.float32))


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
    pos = JOB_HEAD.size
    heads = []
    for _ in range(count):
        heads.append(STREAM_HEAD.unpack_from(message, pos))
        pos += STREAM_HEAD.size
    space = arena.at(arena_size)
    streams, places = [], []
    for alphabet, size, nwords, at_in, at_out, capacity, channels, last, fp32, clip in heads:
        counts = np.frombuffer(message, dtype="<u2", count=alphabet, offset=pos)
        pos += 2 * alphabet
        if op == ENCODE:
            s = Stream(counts, symbols=space[at_in:at_in + size], size=size)
        else:
            mean = np.frombuffer(message, dtype="<f2", count=channels, offset=pos)
            std = np.frombuffer(message, dtype="<f2", count=channels, offset=pos + 2 * channels)
            pos += 4 * channels
            dtype = DTYPES[fp32]
            words = space[at_in:at_in + 4 * nwords].view("<u4")
            rows = size // channels if channels else 0
            shape = (rows, channels) if last else (channels, rows)
            out = space[at_out:at_out + size * dtype.itemsize].view(dtype).reshape(shape)
            s = Stream(counts, words=words, size=size, dequant=Dequant(mean, std, alphabet, clip, bool(last), dtype),
                       out=out)
        streams.append(s)
        places.append((at_out, capacity))
    tail = []
    results = []
    for s, (at_out, capacity) in zip(streams, places):
        run(op, s)
        if op == ENCODE:
            if s.words.nbytes > capacity:
                results.append(DID_NOT_FIT)
                continue
            space[at_out:at_out + s.words.nbytes] = s.words.view(np.uint8)
            results.append(s.words.size)
        else:
            results.append(s.escapes.size)
            tail.append(s.escapes.astype("<u4").tobytes())
    return b"\0" + struct.pack(f"<{count}I", *results) + b"".join(tail)


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
        except (StreamError, ValueError, struct.error) as exc:
            reply = b"\1" + str(exc).encode()[:1000]
        except BaseException as exc:  # noqa: BLE001 - a coder panic must become an error reply, not a dead pipe
            reply = b"\1" + f"{type(exc).__name__}: {exc}".encode()[:1000]
        stdout.write(struct.pack("<Q", len(reply)))
        stdout.write(reply)
        stdout.flush()


if __name__ == "__main__":
    main()
